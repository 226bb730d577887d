"""CUDA graphs behind the UNetRunner seam: one captured graph per input shape, replayed for every call.

DF-RISE calls the UNet with the same shapes over and over (whole chunks of `batch_size` masks), which is what a
CUDA graph wants: the ~1,000 kernel launches of an SD1.5 UNet call become one launch, so the GPU no longer waits
on Python and the launch queue at small batches. The bench owns this for now; if the numbers earn it a place in
the engine it becomes a UNetRunner backend (runner.py), and these lines move there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difflens.engine.runner import UNetRunner

WARMUP_CALLS = 3  # eager calls on a side stream before capture: cuDNN/cuBLAS pick their algorithms there


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    latents: torch.Tensor  # the static inputs the graph reads, and the output it writes
    timestep: torch.Tensor
    embeds: torch.Tensor
    out: torch.Tensor


class GraphedRunner(UNetRunner):
    """A UNetRunner whose no-grad calls replay CUDA graphs (CUDA only).

    The first call with a new (latents, embeds) shape and dtype captures a graph over the eager UNet; later calls
    copy their inputs into the graph's static tensors and replay it. All graphs share one memory pool. DF-CAM and
    the attention maps use `self.unet` directly, eager, as with every backend.
    """

    def __init__(self, unet: Any) -> None:
        super().__init__(unet, "eager")
        self.backend = "cuda_graph"
        self.captures = 0
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._pool: Any = None

    def raw(self, latents: torch.Tensor, timestep: int | torch.Tensor, embeds: torch.Tensor,
            added: Any = None) -> torch.Tensor:
        """UNet output. latents: (N, C, h, w); embeds: (N, L, D); timestep: int or 0-dim tensor. -> (N, C, h, w).
        SD-family UNets only (no added conditioning)."""
        if added is not None:
            raise ValueError("GraphedRunner graphs SD-family UNet calls; this one carries added conditioning")
        if torch.is_grad_enabled():
            raise RuntimeError("GraphedRunner replays inference graphs: call it under torch.no_grad()")
        key = (tuple(latents.shape), tuple(embeds.shape), latents.dtype, latents.device)
        g = self._graphs.get(key) or self._capture(key, latents, timestep, embeds)
        g.latents.copy_(latents)
        g.embeds.copy_(embeds)
        if isinstance(timestep, torch.Tensor):
            g.timestep.copy_(timestep.reshape(()))
        else:
            g.timestep.fill_(timestep)
        g.graph.replay()
        return g.out.clone()  # the next replay overwrites g.out

    def _capture(self, key: tuple[Any, ...], latents: torch.Tensor, timestep: int | torch.Tensor,
                 embeds: torch.Tensor) -> _Graph:
        if latents.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device; the latents are on {latents.device}")
        x, e = latents.clone(), embeds.contiguous().clone()
        t = torch.as_tensor(timestep, device=latents.device).reshape(()).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.unet(x, t, encoder_hidden_states=e, return_dict=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]
        self._pool = graph.pool()
        self._graphs[key] = _Graph(graph, x, t, e, out)
        self.captures += 1
        return self._graphs[key]
