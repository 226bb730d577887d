"""`difflens explain MODEL_DIR PROMPT --out DIR`: parse -> option dataclasses -> engine.api.explain ->
render.write_outputs, in this process; with --server, the same options and outputs through a difflens server
(explain_remote). Bad input exits with status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from difflens.commands.backend_flags import add_backend_flags, engine_settings
from difflens.commands.client_flags import add_client_flags, check_client_flags
from difflens.commands.common import ProgressBar, build_request, write_failed
from difflens.commands.explain_flags import add_explanation_flags, choices_text, rise_summary
from difflens.config import DTYPES
from difflens.engine.options import SAMPLING_KINDS, SCHEDULERS  # torch-free: the parser builds fast
from difflens.errors import InvalidArgument


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="generate an image and explain its denoising steps",
                       description="Generate PROMPT with the model in MODEL_DIR and explain the selected steps. "
                                   "Unset generation options take the model's recommended defaults.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="local diffusers folder (model_index.json); with --server: "
                                                          "a served model's name, '-' for the server's default")
    p.add_argument("--server", metavar="HOST:PORT", help="run on a difflens server (`difflens serve`) instead of "
                                                          "in-process; same options and outputs")
    p.add_argument("--timeout", type=float, metavar="S", help="with --server: the call's deadline in seconds, which "
                                                              "the server makes the job's (default: none)")
    p.add_argument("--map-dtype", choices=("float32", "float16"),
                   help="with --server: the maps' element type on the wire (float16 halves a step's event; the "
                        "files hold them as float32 either way; default float32)")
    add_client_flags(p)
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--out", required=True, type=Path, help="output folder (created; written only on success)")
    g = p.add_argument_group("generation (default: the model's recommended values)")
    g.add_argument("--steps", type=int, help="number of denoising steps")
    g.add_argument("--scheduler", metavar=choices_text(SCHEDULERS))
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    g.add_argument("--seed", type=int, help="noise seed (default 0)")
    g.add_argument("--negative", help="negative prompt (default empty)")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--sampling", metavar=choices_text(SAMPLING_KINDS),
                   help="timestep spacing; early/late = exponential packing (default uniform; explicit when "
                        "--timesteps is given)")
    g.add_argument("--shift", type=float, help="lambda of early/late sampling (default 60)")
    g.add_argument("--timesteps", metavar="999,800,...", help="explicit, strictly decreasing timesteps")
    add_explanation_flags(p)
    r = p.add_argument_group("runtime (default: DIFFLENS_* environment, else eager / cpu / float32)")
    add_backend_flags(r)
    r.add_argument("--device", metavar="cpu|cuda|cuda:N")
    r.add_argument("--dtype", metavar=choices_text(DTYPES))
    p.set_defaults(run=run)


def local_model_name(path: str | Path) -> str:
    """A local run's name for its model: 'default' for the shipped model, else the folder's name."""
    from difflens.config import SHIPPED_MODEL

    folder = Path(path).resolve()
    return "default" if folder == SHIPPED_MODEL else folder.name


def local_record(args: argparse.Namespace, request: dict[str, Any], model: Any, exp: Any, settings: Any,
                 started: float, step_s: dict[int, float], unet_server: dict[str, Any] | None = None) -> str:
    """The audit record of a local run, as a served job's (replay takes either): the model's folder and file
    hashes, the request, what it resolved to, versions, runtime, timings (a step's denoise time here is its wall
    time less its explainers'; step 0's includes encoding the prompt), and the output hashes."""
    import socket

    from difflens import audit
    from difflens.engine.options import GenerationParams
    from difflens.jobs import JobSpec
    from difflens.models import config_sha256, weights_sha256
    from difflens.queue.common import new_job_id
    from difflens.render.outputs import image_png

    folder = Path(model.path).resolve()
    name = local_model_name(folder)
    spec = JobSpec(model=name, params=GenerationParams(args.prompt, **request["generation"]),
                   explain=request["explain"])
    explained = {s.index: sum(s.seconds.values()) for s in exp.steps}
    denoise = {i: max(0.0, t - explained.get(i, 0.0)) for i, t in step_s.items()}
    record = audit.run_record(
        job_id=new_job_id(), worker=f"local ({socket.gethostname()})", attempt=1, model_name=name,
        folder=str(folder), weights=weights_sha256(folder), configs=config_sha256(folder), spec=spec, exp=exp,
        png=image_png(exp.image),
        runtime=audit.runtime_of(settings.device, settings.dtype, settings.unet_backend, settings.unet_backend,
                                 unet_server),
        started=started, denoise_s=denoise)
    return audit.dumps(record)


def run(args: argparse.Namespace) -> int:
    if args.server:
        from difflens.commands import explain_remote

        return explain_remote.run(args)
    check_client_flags(args)
    if args.timeout is not None:
        raise InvalidArgument("--timeout", "only with --server (the deadline of the call to the server)")
    if args.map_dtype is not None:
        raise InvalidArgument("--map-dtype", "only with --server (in-process maps are float32)")
    settings = engine_settings(args, device=args.device, dtype=args.dtype)
    request = build_request(args)

    from difflens.engine.api import explain
    from difflens.engine.loading import load_model
    from difflens.render import write_outputs

    model = load_model(args.model_dir, device=settings.device, dtype=settings.torch_dtype)
    remote = None
    if settings.unet_backend == "triton":
        from difflens.triton.client import connect_unet

        remote = connect_unet(settings, local_model_name(model.path), model.unet)
    progress = ProgressBar()
    started = time.time()
    try:
        opts = request["explain"]
        exp = explain(model, args.prompt, backend=settings.unet_backend, device=settings.device,
                      on_step=progress.on_step, on_progress=progress.on_progress, generation=request["generation"],
                      methods=opts.methods, rise=opts.rise, cam=opts.cam, steps=opts.steps, remote=remote)
    finally:
        progress.close()
        if remote is not None:
            remote.close()
    record = local_record(args, request, model, exp, settings, started, progress.step_s,
                          remote.describe() if remote is not None else None)
    try:
        written = write_outputs(exp, args.out, companions={"audit.json": record.encode("utf-8")})
    except OSError as e:
        return write_failed(args.out, e)
    for line in rise_summary(exp.steps):
        print(line)
    print(f"difflens: wrote {len(written)} files to {args.out}")
    print(f"difflens: report: {written['report.html']}")
    return 0
