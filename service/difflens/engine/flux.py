"""FLUX's denoiser call (FluxTransformer2DModel) on the latent grid, and its dynamic timestep shift.

FluxPipeline packs its latent's 2 x 2 patches into tokens, gives the transformer each token's position (img_ids)
beside the text's (txt_ids, zeros), divides the scheduler's timestep (sigma x 1000) by 1000, and unpacks the
output only to decode. Here `call` does all of that inside, so the rest of the engine sees the latent grid
(N, C, h, w) as for a UNet: the sampler steps the unpacked latent (the Euler step is elementwise, so stepping it
packed or not is the same arithmetic), and DF-RISE's masks, DF-CAM's and the attention maps' grids stay on (h, w).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

PATCH = 2  # FluxPipeline's 2 x 2 latent patches per token


def pack(latents: torch.Tensor) -> torch.Tensor:
    """latents: (N, C, h, w), h and w even -> tokens (N, h w / 4, 4 C), row-major over the (h/2, w/2) patch grid,
    each token's channels ordered (C, 2, 2) as FluxPipeline._pack_latents."""
    n, c, h, w = latents.shape
    x = latents.reshape(n, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`pack`'s inverse. tokens: (N, h w / 4, 4 C) -> (N, C, h, w)."""
    n, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.reshape(n, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Each packed token's position for FLUX's rotary embedding: (h/2 * w/2, 3) rows (0, row, column), row-major
    as `pack` lays the tokens out (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // PATCH, w // PATCH, 3)
    ids[..., 1] = torch.arange(h // PATCH)[:, None]
    ids[..., 2] = torch.arange(w // PATCH)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_call(transformer: Any, latents: torch.Tensor, timestep: int | float | torch.Tensor, embeds: torch.Tensor,
              added: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """FluxTransformer2DModel's velocity on the latent grid. latents: (N, C, h, w); timestep: the scheduler's
    sigma x 1000, a number or (N,); embeds: T5's sequence (N, L, D); added: {"pooled_projections": (N, P)} and, for
    a guidance-distilled model (FLUX-dev), {"guidance": (N,)} -> (N, C, h, w)."""
    if added is None or "pooled_projections" not in added:
        raise ValueError("FLUX's transformer needs added['pooled_projections'] (CLIP's pooled output)")
    n, _, h, w = latents.shape
    t = torch.as_tensor(timestep, device=latents.device)
    t = (t.expand(n) if t.dim() == 0 else t).to(latents.dtype)  # as the pipeline: the latents' dtype, then / 1000
    out = transformer(hidden_states=pack(latents), timestep=t / 1000, guidance=added.get("guidance"),
                      pooled_projections=added["pooled_projections"], encoder_hidden_states=embeds,
                      txt_ids=torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=embeds.dtype),
                      img_ids=image_ids(h, w, latents.device, latents.dtype), return_dict=False)[0]
    return unpack(out, h, w)


def mu(image_seq_len: int, config: Mapping[str, Any]) -> float:
    """FLUX's dynamic shift for an image of `image_seq_len` packed tokens: linear from base_shift at
    base_image_seq_len tokens to max_shift at max_image_seq_len (FluxPipeline's calculate_shift, on the scheduler
    config's values and the pipeline's defaults)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    b = base_shift - m * base_len
    return float(image_seq_len * m + b)
