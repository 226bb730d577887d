"""Section 8 of `python -m bench.gpu`: DF-RISE and DF-CAM maps in float16 and bfloat16 against float32.

The same weights (the float32 UNet, copied to each dtype), the same latent, prompt embeddings and masks; each dtype's
state takes its own guided eps as the DF-RISE reference, as the engine does. float32 runs with TF32 off (true
float32 matrix products and convolutions), so the reference is not itself a reduced-precision result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from bench.gpu_model import in_dtype
from bench.gpu_sections import Env
from difflens.engine import cam, rise
from difflens.engine.faithfulness import spearman
from difflens.engine.options import CamOptions
from difflens.engine.runner import UNetRunner

KINDS = ("rise", "rise_mean", "cam")
LOW = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def maps_in(env: Env, unet32: Any, dtype: torch.dtype, batch: int) -> dict[str, torch.Tensor]:
    """The maps of KINDS, (h, w) float32 on the CPU each, from a copy of `unet32` in `dtype` (float32: the UNet
    itself) on env's inputs in that dtype."""
    unet = unet32 if dtype == torch.float32 else in_dtype(unet32, dtype)
    state = env.state(UNetRunner(unet), dtype)
    opts, masks = env.masks(env.plan.precision_masks, batch, seed=2)
    maps = rise.explain_step(state, opts, masks)
    maps |= cam.explain_step(state, CamOptions(), cam.resolve_layers(unet, ()))
    return {k: maps[k].detach().float().cpu() for k in KINDS}


def compare(low: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """rel_l2: ||low - ref|| / ||ref||; spearman: rank correlation of the two maps (average ranks for ties)."""
    return {"rel_l2": float((low - ref).norm() / ref.norm()), "spearman": spearman(low, ref)}


def precision(env: Env, unet32: Any, batch: int) -> dict[str, Any]:
    """-> {"masks", "batch", "float16": {kind: {rel_l2, spearman}}, "bfloat16": {...}, "ratios": the same figures
    flat, named dtype_kind_figure}."""
    batch = min(batch, env.plan.precision_masks)
    out: dict[str, Any] = {"masks": env.plan.precision_masks, "batch": batch, "ratios": {}}
    with no_tf32():
        ref = maps_in(env, unet32, torch.float32, batch)
        for name, dtype in LOW.items():
            got = maps_in(env, unet32, dtype, batch)
            out[name] = {k: compare(got[k], ref[k]) for k in KINDS}
            for k, figures in out[name].items():
                out["ratios"] |= {f"{name}_{k}_{f}": v for f, v in figures.items()}
    return out
