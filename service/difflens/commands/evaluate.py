"""`difflens evaluate MODEL_DIR`: the faithfulness suite (torch is imported only when it runs)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="prompt fidelity and faithfulness of the explanations (issue 3)",
                       description="Generate held-out captions with MODEL_DIR, score them with the checker "
                                   "(uniform, early and late schedules), explain accepted images with DF-RISE, "
                                   "DF-CAM and attention maps and measure the maps against each image's ground "
                                   "truth. Prints a markdown report; writes summary.json, report.md and PNG charts.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local diffusers folder (model_index.json)")
    p.add_argument("--out", type=Path, default=Path("out/eval"), help="output folder (default out/eval)")
    p.add_argument("--captions", type=int, default=200, help="held-out captions for prompt fidelity (default 200)")
    p.add_argument("--explain-captions", type=int, default=16, help="images to explain (default 16)")
    p.add_argument("--masks", type=int, default=256, help="DF-RISE masks per explained step (default 256)")
    p.add_argument("--mask", choices=("pixel", "grid"), default="pixel", help="DF-RISE mask kind (default pixel)")
    p.add_argument("--grid-size", type=int, default=8, help="DF-RISE grid cells per side for --mask grid")
    p.add_argument("--score", choices=("structure", "cosine"), default="structure",
                   help="DF-RISE per-pixel score (default structure)")
    p.add_argument("--ssim-padding", choices=("zero", "reflect"), default="zero",
                   help="DF-RISE structure term's window past the latent's border (default here zero, the paper's "
                        "padding, as docs/faithfulness.md's table; `difflens explain` defaults to reflect)")
    p.add_argument("--sampler", choices=("mc", "stratified", "sobol"), default="mc",
                   help="DF-RISE mask draws (default mc)")
    p.add_argument("--antithetic", action="store_true", help="DF-RISE masks in antithetic pairs (--masks even)")
    p.add_argument("--estimator", choices=("ratio", "regression"), default="ratio",
                   help="DF-RISE map from the scores: RISE's ratio or the per-pixel regression (default ratio)")
    p.add_argument("--steps", default="6", metavar="N|i,j,...",
                   help="explained steps: N spread over the trajectory, or step indices (default 6)")
    p.add_argument("--chunks", type=int, default=16, help="deletion / insertion points - 1 (default 16)")
    p.add_argument("--shift", type=float, default=60.0, help="lambda of the early / late schedules (default 60)")
    p.add_argument("--r3-steps", default="3,5", metavar="N,...",
                   help="also compare the schedules at these few step counts ('' for none; default 3,5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", metavar="cpu|cuda|cuda:N")
    p.set_defaults(run=run)


# EvalConfig field -> the flag a user typed (for error lines).
FLAGS = {"fidelity_images": "--captions", "explain_captions": "--explain-captions", "masks": "--masks",
         "chunks": "--chunks", "steps": "--steps", "sampling.shift": "--shift", "rise.mask": "--mask",
         "rise.grid_size": "--grid-size", "rise.score": "--score", "rise.num_masks": "--masks",
         "rise.ssim_padding": "--ssim-padding", "rise.sampler": "--sampler", "rise.antithetic": "--antithetic",
         "rise.estimator": "--estimator",
         "r3_steps": "--r3-steps"}


def parse_steps(text: str) -> int | tuple[int, ...]:
    from difflens.commands.explain_flags import parse_ints

    values = parse_ints("steps", text)
    return values[0] if len(values) == 1 and "," not in text else values


def run(args: argparse.Namespace) -> int:
    from difflens.commands.common import check_out
    from difflens.commands.explain_flags import parse_ints
    from difflens.config import Settings
    from difflens.errors import InvalidArgument

    check_out(args.out)
    if args.threads is not None and args.threads < 1:
        raise InvalidArgument("--threads", f"got {args.threads}; must be >= 1 (default: torch's)")
    settings = Settings.from_env(device=args.device)
    t0 = time.perf_counter()

    import torch

    from difflens.engine.loading import load_model
    from difflens.evaluation.report import markdown, write_outputs
    from difflens.evaluation.suite import EvalConfig, run_suite

    try:
        cfg = EvalConfig(fidelity_images=args.captions, explain_captions=args.explain_captions, masks=args.masks,
                         steps=parse_steps(args.steps), chunks=args.chunks, shift=args.shift, seed=args.seed,
                         rise_mask=args.mask, rise_grid_size=args.grid_size, rise_score=args.score,
                         rise_ssim_padding=args.ssim_padding, rise_sampler=args.sampler,
                         rise_antithetic=args.antithetic, rise_estimator=args.estimator,
                         r3_steps=parse_ints("r3_steps", args.r3_steps) if args.r3_steps.strip() else ())
    except InvalidArgument as e:
        raise InvalidArgument(FLAGS.get(e.field, e.field), e.message) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model_dir, device=settings.device, dtype=torch.float32)
    summary = run_suite(model, cfg, log=lambda msg: print(f"difflens: {msg}", file=sys.stderr, flush=True))
    written = write_outputs(summary, args.out)
    print(markdown(summary))
    print(f"difflens: wrote {len(written)} files to {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0
