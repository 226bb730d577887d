"""Section 9 of `python -m bench.gpu`: an SDXL-shaped and a FLUX-shaped row, what one explained step costs on each.

Each denoiser is built in code with random weights from its published config's shape (SDXL base 1.0's UNet,
FLUX.1-dev's transformer: 19 double- and 38 single-stream blocks, 3072 wide, guidance embedding) in the run's dtype,
and called
the family's way (engine/families.py: SDXL's pooled text and time ids with CFG; FLUX's packed 2 x 2 patches, one
branch, the guidance an input). Per row, timed in alternating rounds against the step's own denoising call: DF-RISE
(masks in batches, engine.rise.explain_step), DF-CAM (every block, engine.cam.explain_step) and the attention maps
(engine.attention.explain_step, three words); the ratios are each over the denoising call, DF-RISE's per mask. The
weights' values do not matter to speed; `--tiny` builds both at toy widths (the same block types) on the CPU.
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from bench.families import SDXL_UNET
from bench.gpu_sections import Env, rounds
from difflens.engine import attention, cam, families, rise
from difflens.engine.options import CamOptions, RiseOptions
from difflens.engine.runner import CFGConditioning, UNetRunner
from difflens.engine.sampler import StepState
from difflens.engine.tokens import Token

# black-forest-labs/FLUX.1-dev's transformer/config.json (the keys that set its shape)
FLUX_DEV: dict[str, Any] = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FLUX_DEV_PARAMETERS = 11_901_408_320  # the published FLUX.1-dev transformer's parameter count
SDXL_PARAMETERS = 2_567_463_684  # the published SDXL base 1.0 UNet's
# The same block types at toy widths: every code path of the big rows in seconds on a CPU.
TINY_SDXL: dict[str, Any] = {**SDXL_UNET, "sample_size": 16, "block_out_channels": (8, 16, 16),
                             "transformer_layers_per_block": (1, 1, 1), "attention_head_dim": (2, 2, 2),
                             "cross_attention_dim": 32, "addition_time_embed_dim": 4,
                             "projection_class_embeddings_input_dim": 6 * 4 + 16, "norm_num_groups": 4}
TINY_FLUX: dict[str, Any] = {**FLUX_DEV, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                             "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                             "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}
WORDS = [Token("a", (0,)), Token("red", (1,)), Token("circle", (2,))]


@dataclass(frozen=True)
class Row:
    """One family's shape: the denoiser's config, its latent (C, h, w), the text (L, D) and added conditioning
    per branch, the CFG scale (FLUX: the guidance input), the DF-RISE masks and batch of a timed run."""

    family: str
    config: dict[str, Any]
    latent: tuple[int, int, int]
    text: tuple[int, int]
    added: dict[str, tuple[int, ...]]
    scale: float
    masks: int
    batch: int


def rows(tiny: bool) -> list[Row]:
    if tiny:
        return [Row("sdxl", TINY_SDXL, (4, 16, 16), (77, 32), {"text_embeds": (16,), "time_ids": (6,)}, 5.0, 4, 2),
                Row("flux", TINY_FLUX, (4, 16, 16), (64, 32), {"pooled_projections": (32,)}, 3.5, 4, 2)]
    return [Row("sdxl", SDXL_UNET, (4, 128, 128), (77, 2048), {"text_embeds": (1280,), "time_ids": (6,)}, 5.0,
                32, 8),
            Row("flux", FLUX_DEV, (16, 128, 128), (512, 4096), {"pooled_projections": (768,)}, 3.5, 16, 4)]


def build(row: Row, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """The row's denoiser with random weights drawn on `device` (meta: shapes only), in `dtype`, eval, no grad."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cls = FluxTransformer2DModel if row.family == "flux" else UNet2DConditionModel
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[] if device.type != "cuda" else None):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # drawn in `dtype`: FLUX's 12 B parameters never exist in float32 at once
        try:
            with torch.device(device):
                model = cls(**row.config)
        finally:
            torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def state(row: Row, denoiser: Any, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StepState:
    """The step's state: random latent and conditioning, both CFG branches for SDXL, one for FLUX with the scale
    as its guidance input; the timestep mid-schedule (FLUX: sigma 0.5 x 1000)."""
    g = torch.Generator().manual_seed(seed)
    branches = 1 if row.family == "flux" else 2

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    added = {k: randn(branches, *s) for k, s in row.added.items()}
    if row.family == "sdxl":
        side = row.latent[1] * 8
        added["time_ids"] = torch.tensor([[side, side, 0, 0, side, side]] * 2, device=device, dtype=dtype)
    else:
        added["guidance"] = torch.full((1,), row.scale, device=device)
    cond = CFGConditioning(randn(branches, *row.text), row.scale, added)
    runner = UNetRunner(denoiser, call=families.FAMILIES[row.family].call)
    x, t = randn(1, *row.latent), torch.tensor(500.0, device=device)
    with torch.no_grad():
        eps = runner.guided(x, t, cond)
    return StepState(0, 1, 500, t, x, eps, torch.zeros_like(x), x - eps, cond, runner)


def measure(env: Env, row: Row, parts: int) -> dict[str, Any]:
    """One row: the denoising call, DF-RISE, DF-CAM (every block) and the attention maps, alternating rounds."""
    denoiser = build(row, env.device, env.dtype)
    s = state(row, denoiser, env.device, env.dtype)
    opts = RiseOptions(num_masks=row.masks, batch_size=row.batch, seed=1)
    masks = rise.make_masks(opts, row.latent[1:], env.device)
    layers = cam.resolve_layers(denoiser, ())

    def denoise() -> None:
        with torch.no_grad():
            s.runner.guided(s.latent_in, s.t, s.cond)

    (d, r, c, a), _, n = rounds(env, "families", denoise, lambda: rise.explain_step(s, opts, masks),
                                lambda: cam.explain_step(s, CamOptions(), layers),
                                lambda: attention.explain_step(s, WORDS), parts=parts)
    med = {k: statistics.median(v) for k, v in (("denoise", d), ("rise", r), ("cam", c), ("attn", a))}
    out = {"family": row.family, "parameters": sum(p.numel() for p in denoiser.parameters()),
           "latent": list(row.latent), "text": list(row.text), "masks": row.masks, "batch": row.batch,
           "cam_layers": len(layers), "repeats": n, "eps_finite": bool(torch.isfinite(s.eps).all()),
           **{f"{k}_s": v for k, v in med.items()},
           "ratios": {"rise_per_mask_vs_denoise": med["rise"] / row.masks / med["denoise"],
                      "cam_vs_denoise": med["cam"] / med["denoise"], "attn_vs_denoise": med["attn"] / med["denoise"]}}
    if env.device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    return out


def families_section(env: Env, tiny: bool) -> dict[str, Any]:
    """9. Both rows, one after the other (each denoiser freed before the next is built)."""
    out: dict[str, Any] = {"rows": {}, "ratios": {}}
    todo = rows(tiny)
    for i, row in enumerate(todo):
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        r = measure(env, row, parts=len(todo) - i)
        out["rows"][row.family] = r
        out["ratios"].update({f"{row.family}_{k}": v for k, v in r["ratios"].items()})
        q = r["ratios"]
        print(f"  {row.family}: denoise {r['denoise_s'] * 1e3:.1f} ms; DF-RISE {q['rise_per_mask_vs_denoise']:.2f} x "
              f"per mask, DF-CAM {q['cam_vs_denoise']:.2f} x, attention {q['attn_vs_denoise']:.2f} x", flush=True)
        gc.collect()
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    return out
