"""A device out of memory, on a CPU: a UNet runner whose calls raise torch.OutOfMemoryError (the class a CUDA
allocation failure raises: torch.cuda.OutOfMemoryError is it) as a GPU's would, at the UNet-call seam."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difflens.engine.runner import UNetRunner

MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB (injected)"


class OutOfMemoryRunner(UNetRunner):
    """raw() raises torch.OutOfMemoryError for a call of more than `limit` samples, or one `fails(latents,
    timestep)` picks; `sizes` records the samples of every call tried, failed ones included."""

    def __init__(self, unet: Any, limit: int, fails: Callable[[torch.Tensor, Any], bool] | None = None) -> None:
        super().__init__(unet)
        self.limit, self.fails = limit, fails
        self.sizes: list[int] = []

    def raw(self, latents: torch.Tensor, timestep: int | torch.Tensor, embeds: torch.Tensor,
            added: Any = None) -> torch.Tensor:
        self.sizes.append(int(latents.shape[0]))
        if latents.shape[0] > self.limit or (self.fails is not None and self.fails(latents, timestep)):
            raise torch.OutOfMemoryError(MESSAGE)
        return super().raw(latents, timestep, embeds, added)


def batched(latents: torch.Tensor, timestep: Any) -> bool:
    """Whether a raw() call is a worker's shared DF-RISE batch (one timestep per sample), not a denoising call."""
    return isinstance(timestep, torch.Tensor) and timestep.dim() == 1
