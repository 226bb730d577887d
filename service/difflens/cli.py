"""The `difflens` command: parse -> option dataclasses -> engine.api.explain -> render.write_outputs.

Subcommands: explain, make-tiny-model, serve, worker, replay, evaluate, models, ensure-groups, triton-serve, keys,
delete (one entry in COMMANDS each).
torch is imported only when a command runs, so `difflens --help` is quick. Bad input exits with status 2 and one
line "difflens: error: <option>: <what is allowed>", before any output is written.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from difflens.api.cli import add_ensure_groups, add_models, add_serve
from difflens.api.client_cli import add_client_flags, add_delete, check_client_flags
from difflens.auth.cli import add_keys
from difflens.backend_flags import add_backend_flags, engine_settings
from difflens.commands.explain_flags import (
    add_explanation_flags,
    choices_text,
    explanation_options,
    parse_ints,
    rise_summary,
)
from difflens.config import DTYPES
from difflens.engine.options import SAMPLING_KINDS, SCHEDULERS  # torch-free: the parser builds fast
from difflens.errors import BackendUnavailable, DifflensError, InvalidArgument, ModelLoadError, NotReady
from difflens.evaluation.cli import add_evaluate
from difflens.triton.cli import add_triton_serve
from difflens.worker.cli import add_replay, add_worker

# Domain field names (InvalidArgument.field) -> the option a CLI user typed.
FLAG_OF_FIELD = {
    "prompt": "PROMPT", "negative_prompt": "--negative", "seed": "--seed", "steps": "--steps",
    "guidance_scale": "--guidance", "width": "--width", "height": "--height", "scheduler": "--scheduler",
    "sampling.kind": "--sampling", "sampling.shift": "--shift", "sampling.timesteps": "--timesteps",
    "sampling": "--sampling", "timesteps": "--timesteps", "methods": "--methods",
    "explain.steps": "--explain-steps", "explain.steps.kind": "--explain-steps",
    "explain.steps.indices": "--explain-steps", "explain.steps.every": "--explain-steps",
    "rise.num_masks": "--masks", "rise.batch_size": "--batch", "rise.mask": "--mask",
    "rise.grid_size": "--grid-size", "rise.p": "--p", "rise.substrate": "--substrate", "rise.score": "--score",
    "rise.ssim_padding": "--ssim-padding", "rise.target": "--rise-target", "rise.seed": "--mask-seed",
    "rise.sampler": "--sampler", "rise.antithetic": "--antithetic", "rise.stop_at_r": "--stop-at-r",
    "rise.min_masks": "--min-masks",
    "cam.layers": "--cam-layers",
    "cam.target": "--cam-target", "unet_backend": "--backend", "device": "--device", "dtype": "--dtype",
    "out": "--out", "triton_url": "--triton-url", "triton_models": "--triton-model",
}


def add_explain(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(run=run_explain)


def add_make_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write a tiny random-weights model of a family (tests, demo)")
    p.add_argument("dir", metavar="DIR", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family", choices=("sd", "sdxl"), default="sd",
                   help="sd (StableDiffusionPipeline, the default) or sdxl (StableDiffusionXLPipeline)")
    p.set_defaults(run=run_make_tiny_model)


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (add_explain, add_make_tiny_model, add_evaluate,
                                                                   add_worker, add_replay, add_serve, add_models,
                                                                   add_ensure_groups, add_triton_serve, add_keys,
                                                                   add_delete)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflens", description="Generate and explain diffusion-model images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """{"generation": GenerationParams fields, "explain": ExplainOptions}, validated (every check that does not
    need the model happens here)."""
    from difflens.engine.options import GenerationParams, Sampling

    if args.out.exists() and not args.out.is_dir():
        raise InvalidArgument("out", f"{args.out} exists and is not a folder")
    timesteps = parse_ints("sampling.timesteps", args.timesteps) if args.timesteps is not None else None
    kind = args.sampling or ("explicit" if timesteps is not None else None)
    sampling = Sampling(**_given(kind=kind, shift=args.shift, timesteps=timesteps))
    if args.shift is not None and sampling.kind not in ("early", "late"):  # the contract has no place for it
        raise InvalidArgument("sampling.shift", f"only with --sampling early or late (got {sampling.kind!r})")
    generation = _given(negative_prompt=args.negative, seed=args.seed, steps=args.steps,
                        guidance_scale=args.guidance, width=args.width, height=args.height,
                        scheduler=args.scheduler)
    generation["sampling"] = sampling
    GenerationParams(args.prompt, **generation)  # validates now, before the model is loaded
    return {"generation": generation, "explain": explanation_options(args)}


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
    from difflens.worker.job import image_png

    folder = Path(model.path).resolve()
    name = local_model_name(folder)
    spec = JobSpec(model=name, params=GenerationParams(args.prompt, **request["generation"]),
                   explain=request["explain"])
    explained = {s.index: sum(s.seconds.values()) for s in exp.steps}
    denoise = {i: max(0.0, t - explained.get(i, 0.0)) for i, t in step_s.items()}
    run_s = round(time.time() - started, 6)
    record = audit.build_record(
        job_id=new_job_id(), worker=f"local ({socket.gethostname()})", attempt=1, model_name=name,
        weights=weights_sha256(folder), configs=config_sha256(folder), folder=str(folder), spec=spec, exp=exp,
        png=image_png(exp.image),
        runtime=audit.runtime_of(settings.device, settings.dtype, settings.unet_backend, settings.unet_backend,
                                 unet_server),
        timings={"queue_wait_s": 0.0, "run_s": run_s, "total_s": run_s,
                 "steps": audit.step_timings(exp, denoise)},
        rise_exact={s.index: True for s in exp.steps if "rise" in s.seconds})
    return audit.dumps(record)


class Progress:
    """A tqdm bar over the denoising steps on stderr, created at the first step (when the total is known);
    `step_s`: each step's wall time (denoising and explaining)."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.explained = 0
        self.step_s: dict[int, float] = {}
        self._last = time.perf_counter()

    def on_step(self, step: Any) -> None:
        self.explained += 1

    def on_progress(self, index: int, total: int, timestep: int) -> None:
        now = time.perf_counter()
        self.step_s[index], self._last = now - self._last, now
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.set_postfix_str(f"t={timestep} explained={self.explained}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_explain(args: argparse.Namespace) -> int:
    if args.server:
        from difflens.api.cli import run_explain_remote

        return run_explain_remote(args)
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
    progress = Progress()
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
        print(f"difflens: error: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    for line in rise_summary(exp.steps):
        print(line)
    print(f"difflens: wrote {len(written)} files to {args.out}")
    print(f"difflens: report: {written['report.html']}")
    return 0


def run_make_tiny_model(args: argparse.Namespace) -> int:
    from difflens.engine.tiny import make_tiny_model

    if args.seed < 0:
        raise InvalidArgument("seed", f"got {args.seed}; must be >= 0")
    folder = make_tiny_model(args.dir, seed=args.seed, family=args.family)
    print(f"difflens: tiny {args.family} model written to {folder}")
    return 0


def error_line(err: DifflensError) -> str:
    if isinstance(err, InvalidArgument):
        return f"difflens: error: {FLAG_OF_FIELD.get(err.field, err.field)}: {err.message}"
    if isinstance(err, ModelLoadError):
        return f"difflens: error: MODEL_DIR: {err.path}: {err.problem}"
    if isinstance(err, NotReady | BackendUnavailable):
        return f"difflens: error: {err}"
    return f"difflens: error: {type(err).__name__}: {err}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except DifflensError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflens: interrupted; nothing written", file=sys.stderr)
        return 130
