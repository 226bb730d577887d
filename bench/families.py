"""What explaining a step costs per model family, as ratios to the step's own denoising call measured in the same
run, and the activation memory each kind of call needs per sample.

Time: the tiny SD, SDXL and FLUX models (engine/tiny.py, built here), 16 x 16 latents, CFG on (FLUX: one branch,
the guidance an input), eager on the CPU: per explained step, the wall time of DF-RISE (N masks in batches of B),
DF-CAM (every layer: one forward of both branches with gradients, one backward) and the attention maps (one
forward of the conditional branch), each over the guided denoising call of that step (median of --repeats). UNet
calls are counted, not assumed.

Memory: engine/memory.py's trace on the meta device (no weights, no arithmetic) of a forward, DF-CAM's forward and
backward, and the attention maps' forward, batch 1, for the tiny models and for SD 1.5 at 512 px, SDXL base at
1024 px and FLUX.1-dev at 1024 px from their published configs (block layout and widths, written out below and in
bench/gpu_families.py), in float16.

    PYTHONPATH=service .venv/bin/python -m bench.families [--repeats 5] [--masks 32] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "families.json"

# The UNet configs' layout keys of SD 1.5 and SDXL base 1.0 (their unet/config.json); everything else at diffusers'
# defaults, which are SD's.
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
SDXL_UNET = {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
             "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
# SD3-medium's transformer/config.json (24 joint blocks of 24 heads x 64, 2 x 2 patches of 16 latent channels,
# text 4096 wide: T5's d_model, pooled 2048: both CLIPs' projections).
SD3_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
              "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
              "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192}


def timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_costs(model: Any, repeats: int, masks: int, batch: int) -> dict[str, Any]:
    """Per explained step, seconds and UNet calls of each explainer and of the denoising call."""
    from difflens.engine import attention, cam, rise
    from difflens.engine.options import CamOptions, GenerationParams, RiseOptions
    from difflens.engine.sampler import generate
    from difflens.engine.tokens import prompt_tokens

    states: list[Any] = []
    generate(model, GenerationParams("a red circle", seed=0, steps=2, guidance_scale=5.0, scheduler="euler"),
             on_step=states.append)
    state, words = states[0], prompt_tokens(model.tokenizer, "a red circle")
    calls: list[int] = []
    hook = model.unet.register_forward_pre_hook(  # FLUX's call passes everything by name
        lambda _m, args, kwargs: calls.append(int((args[0] if args else kwargs["hidden_states"]).shape[0])),
        with_kwargs=True)
    opts = RiseOptions(num_masks=masks, batch_size=batch)
    mask_set = rise.make_masks(opts, tuple(state.latent_in.shape[-2:]), model.device)
    layers = cam.resolve_layers(model.unet, ())
    runs = {
        "denoise": lambda: state.runner.guided(state.latent_in, state.t, state.cond),
        "rise": lambda: rise.explain_step(state, opts, mask_set),
        "cam": lambda: cam.explain_step(state, CamOptions(), layers),
        "attn": lambda: attention.explain_step(state, words),
    }
    out: dict[str, Any] = {}
    try:
        for name, fn in runs.items():
            calls.clear()
            fn()
            counted = list(calls)
            seconds = timed(fn, repeats)
            out[name] = {"seconds": seconds, "unet_calls": len(counted), "samples": sum(counted)}
    finally:
        hook.remove()
    base = out["denoise"]["seconds"]
    for v in out.values():
        v["ratio"] = v["seconds"] / base
    return out


def memory_per_sample(model: Any, latent: tuple[int, int, int]) -> dict[str, int]:
    from difflens.engine.memory import MemoryEstimator

    est = MemoryEstimator(model)
    return {kind: est.per_sample(kind, latent) for kind in ("forward", "cam", "attn")}


def published_memory() -> dict[str, dict[str, int]]:
    """Per-sample bytes of SD 1.5 at 512 px and SDXL at 1024 px in float16, from their UNet layouts on the meta
    device (the text side as their encoders give it: 77 positions of 768, or 2048 with 1280 pooled)."""
    from types import SimpleNamespace

    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from bench.gpu_families import FLUX_DEV
    from difflens.engine.memory import MemoryEstimator
    from difflens.engine.model_config import FAMILIES

    out = {}
    for label, config, family, seq_dim, extra in (
            ("SD 1.5, 512 px", SD15_UNET, "sd", (77, 768), {}),
            ("SDXL, 1024 px", SDXL_UNET, "sdxl", (77, 2048), {"projection_dim": 1280})):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config).to(torch.float16)
        tokenizer = SimpleNamespace(model_max_length=seq_dim[0])
        components = {"text_encoder_2": SimpleNamespace(config=SimpleNamespace(**extra))} if extra else {}
        model = SimpleNamespace(unet=unet, dtype=torch.float16, family=FAMILIES[family], tokenizer=tokenizer,
                                components=components)
        est = MemoryEstimator(model)  # type: ignore[arg-type]
        side = int(config["sample_size"])
        out[label] = {kind: est.per_sample(kind, (4, side, side)) for kind in ("forward", "cam", "attn")}
    with torch.device("meta"):  # FLUX.1-dev at 1024 px: T5's 512 positions of 4096, CLIP's pooled 768, 16 channels
        flux = FluxTransformer2DModel.from_config(FLUX_DEV).to(torch.float16)
    model = SimpleNamespace(unet=flux, dtype=torch.float16, family=FAMILIES["flux"],
                            tokenizer=SimpleNamespace(model_max_length=512), components={})
    est = MemoryEstimator(model)  # type: ignore[arg-type]
    out["FLUX.1-dev, 1024 px"] = {kind: est.per_sample(kind, (16, 128, 128)) for kind in ("forward", "cam", "attn")}
    out["SD3-medium, 1024 px"] = sd3_medium_memory()
    return out


def sd3_medium_memory() -> dict[str, int]:
    """Per-sample bytes of SD3-medium at 1024 px in float16: 77 CLIP + 256 T5 positions of 4096, pooled 2048."""
    from types import SimpleNamespace

    from diffusers import SD3Transformer2DModel

    from difflens.engine.memory import MemoryEstimator
    from difflens.engine.model_config import FAMILIES

    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(SD3_MEDIUM).to(torch.float16)
    model = SimpleNamespace(unet=transformer, dtype=torch.float16, family=FAMILIES["sd3"],
                            tokenizer=SimpleNamespace(model_max_length=77), components={})
    est = MemoryEstimator(model)  # type: ignore[arg-type]
    return {kind: est.per_sample(kind, (16, 128, 128)) for kind in ("forward", "cam", "attn")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--masks", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    from difflens.engine.loading import load_model
    from difflens.engine.tiny import make_tiny_model

    torch.manual_seed(0)
    results: dict[str, Any] = {"machine": platform.platform(), "torch_threads": torch.get_num_threads(),
                               "masks": args.masks, "batch": args.batch, "repeats": args.repeats, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("sd", "sdxl", "flux", "sd3"):
            model = load_model(make_tiny_model(Path(tmp) / family, family=family))
            results["families"][family] = {"step": step_costs(model, args.repeats, args.masks, args.batch),
                                           "memory_per_sample": memory_per_sample(model, (4, 16, 16))}
    results["published_fp16_memory_per_sample"] = published_memory()

    print(f"per explained step, tiny models, 16 x 16 latents, CFG, {args.masks} masks in batches of {args.batch}")
    print(f"{'family':8} {'method':8} {'UNet calls':>10} {'samples':>8} {'ms':>9} {'x denoise':>10}")
    for family, r in results["families"].items():
        for method, v in r["step"].items():
            print(f"{family:8} {method:8} {v['unet_calls']:>10} {v['samples']:>8} {v['seconds'] * 1e3:>9.2f} "
                  f"{v['ratio']:>10.2f}")
    print("\nactivation memory per sample (forward / DF-CAM forward+backward / attention maps)")
    rows = {**{f"tiny {k} (fp32)": v["memory_per_sample"] for k, v in results["families"].items()},
            **results["published_fp16_memory_per_sample"]}
    for label, m in rows.items():
        print(f"{label:18} " + " / ".join(f"{m[k] / 2**20:,.2f} MiB" for k in ("forward", "cam", "attn")))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
