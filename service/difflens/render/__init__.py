"""Pictures of an Explanation: overlays, strips, GIFs, token maps, explanation.npz and a self-contained report.

numpy and PIL only; the engine never imports this package.
"""

from __future__ import annotations

from difflens.render.maps import display_map, overlay
from difflens.render.outputs import write_outputs

__all__ = ["display_map", "overlay", "write_outputs"]
