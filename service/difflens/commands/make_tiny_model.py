"""`difflens make-tiny-model DIR`: a tiny random-weights model of a family, for tests and the demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from difflens.errors import InvalidArgument


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write a tiny random-weights model of a family (tests, demo)")
    p.add_argument("dir", metavar="DIR", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=("sd", "sdxl", "sd3", "flux", "flux-schnell"), default="sd",
                   help="sd (StableDiffusionPipeline, the default), sdxl (StableDiffusionXLPipeline), sd3 "
                        "(StableDiffusion3Pipeline, with T5), flux (FluxPipeline, FLUX.1-dev-like: guidance "
                        "embedding) or flux-schnell (no guidance input)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from difflens.engine.tiny import make_tiny_model

    if args.seed < 0:
        raise InvalidArgument("seed", f"got {args.seed}; must be >= 0")
    folder = make_tiny_model(args.dir, seed=args.seed, family=args.family)
    print(f"difflens: tiny {args.family} model written to {folder}")
    return 0
