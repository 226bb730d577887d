"""The UNet backend flags, one definition for `difflens explain`, `worker` and `serve --embedded`: --backend and,
for the triton backend, --triton-url and --triton-model; and the engine Settings built from them and the
environment. torch-free, like every parser."""

from __future__ import annotations

import argparse
from typing import Any

from difflens.config import DTYPES, Settings
from difflens.engine.options import BACKENDS
from difflens.errors import InvalidArgument

BACKEND_HELP = ("UNet backend (default: DIFFLENS_UNET_BACKEND, else eager). compile: torch.compile. triton: the "
                "denoising and DF-RISE calls go to a Triton Inference Server (--triton-url, --triton-model); DF-CAM "
                "and the attention maps need gradients and hooks inside the UNet, so they run on this process's "
                "copy of the model folder's UNet, and start-up checks that the server's model declares what difflens "
                "sends and answers a probe input as that copy does")


def add_backend_flags(group: argparse._ActionsContainer) -> None:
    group.add_argument("--backend", metavar="|".join(BACKENDS), help=BACKEND_HELP)
    group.add_argument("--triton-url", metavar="HOST:PORT",
                       help="with --backend triton: the Triton server's gRPC endpoint (default: DIFFLENS_TRITON_URL)")
    group.add_argument("--triton-model", action="append", metavar="[MODEL=]NAME",
                       help="with --backend triton: the Triton model that serves the UNet; MODEL=NAME for one served "
                            "model (repeatable), NAME for all (default: DIFFLENS_TRITON_MODEL, comma-separated, else "
                            "the model's own name: a worker's --model NAME, a local run's folder name)")


def add_worker_flags(group: argparse._ActionsContainer, threads_default: str) -> None:
    """What a worker runs its jobs with, for `worker` and `serve --embedded`'s worker: the backend flags, --device,
    --dtype, --threads (`threads_default`: its help's default), --max-jobs, --max-batch."""
    add_backend_flags(group)
    group.add_argument("--device", metavar="cpu|cuda|cuda:N")
    group.add_argument("--dtype", metavar="|".join(DTYPES))
    group.add_argument("--threads", type=int, metavar="N", help=f"torch CPU threads (default: {threads_default})")
    group.add_argument("--max-jobs", type=int, help="jobs run at once (default 4)")
    group.add_argument("--max-batch", type=int, help="samples per shared UNet call (default 64)")


def engine_settings(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings.from_env with the backend flags and `overrides` (device, dtype, threads); a Triton flag given
    without the triton backend is refused, naming it (the environment's Triton variables are simply unused)."""
    models = Settings.parse_triton_models(args.triton_model) if args.triton_model else None
    settings = Settings.from_env(unet_backend=args.backend, triton_url=args.triton_url, triton_models=models,
                                 **overrides)
    if settings.unet_backend != "triton":
        for flag, value in (("--triton-url", args.triton_url), ("--triton-model", args.triton_model)):
            if value is not None:
                raise InvalidArgument(flag, f"only with --backend triton (the backend is {settings.unet_backend})")
    return settings
