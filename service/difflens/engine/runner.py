"""UNet backends (eager, torch.compile, a remote UNet such as a Triton server's) behind one call that does
classifier-free guidance in one batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from difflens.engine.options import BACKENDS, Backend, check_choice
from difflens.errors import InvalidArgument

log = logging.getLogger(__name__)

# The UNet somewhere else (backend "triton": difflens.triton.client.TritonUNet): latents (N, C, h, w), timesteps
# (N,), embeds (N, L, D) -> the UNet's output (N, C, h, w), on the latents' device and dtype. engine/ only calls it.
RemoteUNet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# A family's added conditioning beside the prompt embeddings, batch-first like them: SDXL's
# {"text_embeds": (N, P), "time_ids": (N, 6)}; None for SD. Every UNet call of the engine carries it.
Added = Mapping[str, torch.Tensor]
# How a family calls its denoiser (engine/families.py): (module, latents (N, C, h, w), timestep int or (N,),
# embeds (N, L, D), added or None) -> the prediction (N, C, h, w). The one place that knows the call's signature.
DenoiserCall = Callable[[Any, torch.Tensor, Any, torch.Tensor, "Added | None"], torch.Tensor]


def unet_call(unet: Any, latents: torch.Tensor, timestep: int | torch.Tensor, embeds: torch.Tensor,
              added: Added | None = None) -> torch.Tensor:
    """A UNet2DConditionModel's prediction (SD, SDXL). latents: (N, C, h, w); embeds: (N, L, D); added: SDXL's
    text_embeds (N, P) and time_ids (N, 6), or None (then not passed at all, so the call is SD's as before)."""
    if added is None:
        return unet(latents, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
    return unet(latents, timestep, encoder_hidden_states=embeds, added_cond_kwargs=dict(added), return_dict=False)[0]


class UNetRunner:
    """Runs the UNet for the sampler and the explainers.

    `unet` stays the eager module: hooks and attention processors are installed on it (DF-CAM, attention maps
    always run eager, on this process's copy of the weights). `backend` selects what the batched no-grad calls use
    (denoising and DF-RISE); "triton" sends them to `remote`, with no fallback: its errors are the job's.

    A guided call that runs out of device memory is made again in halves (see `guided`), unless `halve_on_oom` is
    off (a worker's job runner, whose DF-RISE calls go to shared batches that halve themselves).
    """

    halve_on_oom = True

    def __init__(self, unet: Any, backend: Backend = "eager", remote: RemoteUNet | None = None,
                 call: DenoiserCall = unet_call) -> None:
        check_choice("unet_backend", backend, BACKENDS)
        if (backend == "triton") != (remote is not None):
            raise InvalidArgument("unet_backend", "the triton backend, and it alone, takes a remote UNet")
        self.unet = unet
        self.call = call
        self.fits: dict[tuple[int, ...], int] = {}  # latent shape -> latents per guided call, after an OOM error
        self.requested_backend = backend
        self.backend: str = backend
        self._fn: Any = unet
        self.remote = remote
        if backend == "compile":
            try:
                self._fn = torch.compile(unet, dynamic=False)
            except Exception as e:  # noqa: BLE001 - any failure to compile means: run eager
                self._fall_back(e)

    def _fall_back(self, err: BaseException) -> None:
        log.warning("torch.compile unavailable for the UNet (%s: %s); falling back to eager",
                     type(err).__name__, err)
        self._fn = self.unet
        self.backend = "eager"

    def raw(self, latents: torch.Tensor, timestep: int | torch.Tensor, embeds: torch.Tensor,
            added: Added | None = None) -> torch.Tensor:
        """UNet output. latents: (N, C, h, w); embeds: (N, L, D); timestep: int or (N,); added: the family's added
        conditioning, (N, ...) each, or None. -> (N, C, h, w)."""
        if self.remote is not None:
            if added is not None:  # the Triton contract carries latents, timesteps and embeddings only
                raise InvalidArgument("unet_backend", "the triton backend serves UNets without added conditioning "
                                                      "(SD); this model's family needs it: use eager or compile")
            t = torch.as_tensor(timestep, device=latents.device)
            return self.remote(latents, t.expand(latents.shape[0]) if t.dim() == 0 else t, embeds)
        if self._fn is not self.unet:
            try:
                return self.call(self._fn, latents, timestep, embeds, added)
            except Exception as e:  # noqa: BLE001 - compile errors surface on the first call
                self._fall_back(e)
        return self.eager(latents, timestep, embeds, added)

    def eager(self, latents: torch.Tensor, timestep: int | torch.Tensor, embeds: torch.Tensor,
              added: Added | None = None) -> torch.Tensor:
        """The eager module's output, whatever the backend: what DF-CAM (with gradients) and the attention maps
        (with their processors) run, hooks on `unet` seeing the call. Shapes as `raw`."""
        return self.call(self.unet, latents, timestep, embeds, added)

    def guided(self, latents: torch.Tensor, timestep: int | torch.Tensor, cond: CFGConditioning) -> torch.Tensor:
        """Guided noise prediction eps_w for each latent. latents: (B, C, h, w) -> (B, C, h, w).

        With CFG both branches see the same latent, in one UNet call laid out [uncond x B; cond x B], which for
        B = 1 is exactly StableDiffusionPipeline's layout (bit-identical results).

        A call that runs out of device memory (torch.OutOfMemoryError, which a CUDA out-of-memory error is) is made
        again as calls of half as many latents, and calls of latents of that shape stay that small for this
        runner's life (`fits`); one latent that does not fit raises the error.
        """
        b, shape = latents.shape[0], tuple(latents.shape[1:])
        fit = self.fits.get(shape, b)
        if fit < b:
            return torch.cat([self.guided(part, timestep, cond) for part in latents.split(fit)])
        try:
            return self._guided(latents, timestep, cond)
        except torch.OutOfMemoryError as e:
            if not self.halve_on_oom or b == 1:
                raise
            self.fits[shape] = (b + 1) // 2
            log.warning("a UNet call of %d latents %s ran out of memory (%s); calls of them now hold at most %d",
                        b, shape, str(e).splitlines()[0] if str(e) else type(e).__name__, self.fits[shape])
        return self.guided(latents, timestep, cond)  # out of the except block: its traceback holds the failed call

    def _guided(self, latents: torch.Tensor, timestep: int | torch.Tensor, cond: CFGConditioning) -> torch.Tensor:
        """`guided` in one UNet call. latents: (B, C, h, w) -> (B, C, h, w)."""
        b = latents.shape[0]
        if not cond.cfg:
            return self.raw(latents, timestep, cond.batch(b), cond.added_batch(b))
        out = self.raw(torch.cat([latents, latents]), timestep, cond.batch(b), cond.added_batch(b))
        uncond, text = out.chunk(2)
        return uncond + cond.scale * (text - uncond)


class CFGConditioning:
    """The conditioning of guided calls. embeds: (2, L, D) = [uncond; cond]; added: the family's added conditioning
    per branch, {name: (2, ...)} = [uncond; cond] each, or None (SD). CFG is on when scale > 1 (as in
    StableDiffusionPipeline); off, only the conditional branch runs. A family without CFG (FLUX: guidance-distilled,
    the scale is an input of its own) gives one branch, embeds (1, L, D) and added (1, ...): CFG is then off
    whatever the scale.

    Batched conditioning is built once per batch size and reused (the explainers call with the same B
    many times per step), rather than copied for each UNet call.
    """

    def __init__(self, embeds: torch.Tensor, scale: float, added: Added | None = None) -> None:
        self.embeds = embeds
        self.added = dict(added) if added is not None else None
        self.scale = float(scale)
        self.cfg = self.scale > 1.0 and embeds.shape[0] == 2
        self._cache: dict[int, torch.Tensor] = {}
        self._added_cache: dict[int, dict[str, torch.Tensor]] = {}

    def batch(self, b: int) -> torch.Tensor:
        """(2B, L, D) laid out [uncond x B; cond x B] with CFG, else (B, L, D) of the conditional branch."""
        if b not in self._cache:
            self._cache[b] = self._expand(self.embeds, b)
        return self._cache[b]

    def added_batch(self, b: int) -> dict[str, torch.Tensor] | None:
        """`added` laid out as `batch(b)`: (2B, ...) each with CFG, else (B, ...); None without added conditioning."""
        if self.added is None:
            return None
        if b not in self._added_cache:
            self._added_cache[b] = {k: self._expand(v, b) for k, v in self.added.items()}
        return self._added_cache[b]

    def conditional(self) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The conditional branch alone, batch of one: embeds (1, L, D) and added (1, ...) each (attention maps)."""
        added = None if self.added is None else {k: v[-1:] for k, v in self.added.items()}
        return self.embeds[-1:], added

    def _expand(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """x: (2, *rest) per branch (or (1, *rest), one branch) -> (2B, *rest) [uncond x B; cond x B] with CFG, else
        (B, *rest) of the conditional (last) branch, not copied."""
        rest = x.shape[1:]
        if self.cfg:
            return x[:, None].expand(2, b, *rest).reshape(2 * b, *rest)
        return x[-1:].expand(b, *rest)
