"""difflens: generate images with a diffusers Stable-Diffusion-format model and explain every step.

The Python API in one call::

    from difflens import explain
    exp = explain("models/shapes", "a large red circle in the center", methods=("rise", "cam", "attn"))
    exp.image          # (H, W, 3) uint8 numpy array
    exp.steps[0].maps  # {"rise": (h, w) tensor, ...}
"""

from __future__ import annotations

from typing import Any

__all__ = ["explain"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `import difflens` (and the CLI's --help) does not pay for importing torch.
    if name == "explain":
        from difflens.engine.api import explain

        return explain
    raise AttributeError(name)
