"""DF-RISE throughput against two baselines measured in the same run (ratios, never absolute thresholds).

(a) vs the bare UNet: DF-RISE masks/s against guided UNet calls with the same batch of latents and no masking
    or scoring (samples/s, one sample = one latent through both CFG branches). Target: ratio >= 0.95.
(b) vs the reference loop: one mask per UNet call (batch 2 with CFG), as the reference code. Target: >= 3x.

A small SD-shaped UNet (built in code, fixed seed) at 16 x 16 latents, backends eager and compile.
    PYTHONPATH=service .venv/bin/python -m bench.rise [--quick] [--batches 1,8,64] [--backends eager]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflens.engine import rise
from difflens.engine.options import RiseOptions
from difflens.engine.runner import CFGConditioning, UNetRunner
from difflens.engine.sampler import StepState

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
LATENT = (4, 16, 16)
EMBED = (77, 64)
GUIDANCE = 7.5
TIMESTEP = 500
RESULTS = Path(__file__).parent / "results" / "rise.json"


CHANNELS = (32, 64, 64)
HEAD_DIM = 32  # SD1.5's attention heads are 40, 80 and 160 wide; SD2 and SDXL's are 64


def attention_heads(head_dim: int) -> tuple[int, ...]:
    """Heads per level for a head width of `head_dim` (0: 8 heads everywhere, SD1.5's config taken literally,
    which at these widths makes heads 4 and 8 wide)."""
    if head_dim == 0:
        return (8,) * len(CHANNELS)
    if any(c % head_dim for c in CHANNELS):
        raise SystemExit(f"--head-dim: got {head_dim}; must divide every level's width {CHANNELS} (or be 0)")
    return tuple(c // head_dim for c in CHANNELS)


def build_unet(seed: int = 0, head_dim: int = HEAD_DIM) -> Any:
    """SD1.x's block layout at small widths: 3 levels, cross-attention in the upper two, 2 resnets per block.

    The heads keep SD's proportions (`head_dim` wide), not its head count: 8 heads over 32 channels would make
    each head 4 wide, where the softmax over 256 x 256 scores costs more than everything else in the UNet and
    no SD model's cost looks like that."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet: Any = UNet2DConditionModel(
        sample_size=LATENT[1], in_channels=LATENT[0], out_channels=LATENT[0], layers_per_block=2,
        block_out_channels=CHANNELS, norm_num_groups=32, cross_attention_dim=EMBED[1],
        attention_head_dim=attention_heads(head_dim),  # diffusers' legacy name: this is the number of heads
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return unet.eval()


def make_state(runner: UNetRunner, seed: int = 0) -> StepState:
    """A denoising step's state with random latent and prompt embeddings (the maps' values do not matter here)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *LATENT, generator=g)
    cond = CFGConditioning(torch.randn(2, *EMBED, generator=g), GUIDANCE)
    t = torch.tensor(TIMESTEP)
    with torch.no_grad():
        eps = runner.guided(x, t, cond)
    return StepState(0, 1, TIMESTEP, t, x, eps, torch.zeros_like(x), x - eps, cond, runner)


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_repeats(*fns: Callable[[], object], repeats: int) -> tuple[list[list[float]], float]:
    """Wall times of each function over `repeats` rounds, and the time of the first (warm-up) call of the first
    one, which with the compile backend includes compiling for this batch shape. Each round runs every function
    once, in turn (a, b, c, a, b, c, ...), so a drift in load from other processes hits all of a round alike."""
    warmup = _seconds(fns[0])
    for fn in fns[1:]:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            ts.append(_seconds(fn))
    return times, warmup


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]: each ratio compares two runs made moments apart, so a slow spell of
    the machine that hits one round cancels within it instead of skewing one side's median."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


@dataclass
class Row:
    backend: str
    batch: int
    masks: int
    masks_per_s: float
    unet_samples_per_s: float
    loop_masks_per_s: float
    ratio_vs_unet: float
    ratio_vs_loop: float
    effective_backend: str  # what actually ran: "eager" after a compile fallback
    warmup_s: float  # first bare-UNet run at this batch (compile backend: includes compiling this shape)


def bare_unet(state: StepState, batch: int, calls: int) -> Callable[[], object]:
    """`calls` guided UNet calls on a (batch, C, h, w) latent: what DF-RISE costs without masks or scores."""
    x = state.latent_in.expand(batch, *LATENT).contiguous()

    def run() -> None:
        with torch.no_grad():
            for _ in range(calls):
                state.runner.guided(x, state.t, state.cond)

    return run


def reference_loop(state: StepState, masks: int) -> Callable[[], object]:
    """The reference loop (one mask per UNet call) over `masks` masks."""
    opts = RiseOptions(num_masks=masks, batch_size=1, seed=1)
    m = rise.make_masks(opts, LATENT[1:], "cpu")
    return lambda: rise.explain_step_reference(state, opts, m)


def measure_batch(state: StepState, backend: str, batch: int, min_masks: int, repeats: int) -> Row:
    """One row: DF-RISE with `batch` masks per UNet call against the bare UNet at that batch and against the
    reference loop, the three timed in turn within each repeat (a drift in machine load hits all three)."""
    masks = max(batch, min_masks // batch * batch)  # whole chunks: no odd-sized last call (a recompile)
    opts = RiseOptions(num_masks=masks, batch_size=batch, seed=1)
    m = rise.make_masks(opts, LATENT[1:], "cpu")
    (unet_t, rise_t, loop_t), warmup_s = timed_repeats(
        bare_unet(state, batch, masks // batch), lambda: rise.explain_step(state, opts, m),
        reference_loop(state, min_masks), repeats=repeats)
    # per-round rates: the ratios are medians of same-round ratios, the rates medians of each side alone
    mps, ups, lps = ([n / t for t in ts] for n, ts in ((masks, rise_t), (masks, unet_t), (min_masks, loop_t)))
    return Row(backend, batch, masks, statistics.median(mps), statistics.median(ups), statistics.median(lps),
               paired_ratio(mps, ups), paired_ratio(mps, lps), state.runner.backend, warmup_s)


def run_backend(unet: Any, backend: str, batches: list[int], min_masks: int, repeats: int) -> list[Row]:
    runner = UNetRunner(unet, backend)  # type: ignore[arg-type]
    state = make_state(runner)
    rows = []
    for b in batches:
        rows.append(measure_batch(state, backend, b, min_masks, repeats))
        print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'backend':<8} {'batch':>5} {'masks':>5} {'masks/s':>9} {'unet/s':>9} {'loop/s':>8} "
          f"{'vs unet':>8} {'vs loop':>8} {'warmup':>8}  ran")


def format_row(r: Row) -> str:
    return (f"{r.backend:<8} {r.batch:>5} {r.masks:>5} {r.masks_per_s:>9.1f} {r.unet_samples_per_s:>9.1f} "
            f"{r.loop_masks_per_s:>8.1f} {r.ratio_vs_unet:>8.3f} {r.ratio_vs_loop:>7.2f}x {r.warmup_s:>7.1f}s  "
            f"{r.effective_backend}")


def summary(rows: list[Row]) -> str:
    unet_ok = sum(r.ratio_vs_unet >= 0.95 for r in rows)
    loop_ok = sum(r.ratio_vs_loop >= 3.0 for r in rows)
    fell_back = sorted({r.batch for r in rows if r.backend != r.effective_backend})
    return (f"vs unet >= 0.95: {unet_ok}/{len(rows)} rows; vs loop >= 3x: {loop_ok}/{len(rows)} rows"
            + (f"; compile fell back to eager at batches {fell_back}" if fell_back else ""))


def machine_info() -> dict[str, Any]:
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "cuda": torch.cuda.is_available(),
    }


def allow_recompiles(n: int) -> None:
    """compile(dynamic=False) builds one graph per batch shape: let dynamo keep one per benchmarked batch
    (past its default limit it silently runs eager, which would be timed as 'compile')."""
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(getattr(dcfg, name), n))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.rise", description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated masks per UNet call")
    ap.add_argument("--backends", default="eager,compile", help="comma-separated: eager, compile")
    ap.add_argument("--min-masks", type=int, default=16, help="masks per timed run (rounded to whole batches)")
    ap.add_argument("--repeats", type=int, default=9,
                    help="timed rounds per row (rates: medians; ratios: medians of same-round ratios)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--head-dim", type=int, default=HEAD_DIM,
                    help=f"width of each attention head (default {HEAD_DIM}; 0: 8 heads per block as SD1.5's "
                         "config says, 4 and 8 wide at these channel counts)")
    ap.add_argument("--quick", action="store_true", help="batches 1,8,32, eager only, 2 repeats")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.backends, args.repeats = "1,8,32", "eager", 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    backends = args.backends.split(",")
    allow_recompiles(len(batches) + 2)
    unet = build_unet(head_dim=args.head_dim)
    print(HEADER, flush=True)
    rows = [r for backend in backends for r in run_backend(unet, backend, batches, args.min_masks, args.repeats)]
    result = {
        "machine": machine_info(),
        "config": {"latent": list(LATENT), "embed": list(EMBED), "guidance": GUIDANCE, "repeats": args.repeats,
                   "min_masks": args.min_masks, "unet": f"SD-shaped {CHANNELS}, 2 resnets/block, cross-attn 64",
                   "attention_heads": list(attention_heads(args.head_dim)), "head_dim": args.head_dim},
        "targets": {"ratio_vs_unet": 0.95, "ratio_vs_loop": 3.0},
        "rows": [vars(r) for r in rows],
    }
    print(summary(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
