"""What several commands share: the explain request built from the flags (local and --server runs), the option a
domain field was typed as, the one-line errors (a domain error, a gRPC error), the --server and --out checks, and
the progress bar over the denoising steps. A leaf: it imports no other command module.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from difflens.commands.explain_flags import explanation_options, parse_ints
from difflens.config import THREADS_ALLOWED
from difflens.errors import BackendUnavailable, DifflensError, InvalidArgument, ModelLoadError, NotReady

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
    "rise.min_masks": "--min-masks", "rise.estimator": "--estimator",
    "cam.layers": "--cam-layers",
    "cam.target": "--cam-target", "unet_backend": "--backend", "device": "--device", "dtype": "--dtype",
    "triton_url": "--triton-url", "triton_models": "--triton-model",
}


def error_line(err: DifflensError) -> str:
    """A domain error -> the CLI's one line, naming the option the user typed where there is one."""
    if isinstance(err, InvalidArgument):
        return f"difflens: error: {FLAG_OF_FIELD.get(err.field, err.field)}: {err.message}"
    if isinstance(err, ModelLoadError):
        return f"difflens: error: MODEL_DIR: {err.path}: {err.problem}"
    if isinstance(err, NotReady | BackendUnavailable):
        return f"difflens: error: {err}"
    return f"difflens: error: {type(err).__name__}: {err}"


def rpc_error_line(err: Any) -> tuple[str, int]:
    """A gRPC error -> (the CLI's error line, exit status): bad input 2 (naming the flag when there is one)."""
    import grpc

    from difflens.api.convert import pb_field

    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        path, _, message = details.partition(": ")
        flags = {pb_field(domain): flag for domain, flag in FLAG_OF_FIELD.items()}
        return f"difflens: error: {flags.get(path, path)}: {message}", 2
    return f"difflens: error: server: {code.name}: {details}", 1


def write_failed(out: Path, err: OSError) -> int:
    """Writing the outputs failed (a full disk, no permission): one line, exit status 1."""
    print(f"difflens: error: cannot write {out}: {err}", file=sys.stderr)
    return 1


def check_positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InvalidArgument(flag, f"got {value}; must be >= 1")


def check_process_flags(args: argparse.Namespace) -> None:
    """The flags of a process that runs jobs, `worker`'s and `serve`'s alike: jobs at once and samples per UNet
    call >= 1, the drain's grace >= 0 s, torch threads, the metrics port."""
    check_positive("--max-jobs", args.max_jobs)
    if args.drain_grace is not None and not args.drain_grace >= 0:  # NaN too
        raise InvalidArgument("--drain-grace", f"got {args.drain_grace}; must be >= 0 (seconds)")
    check_positive("--max-batch", args.max_batch)
    if args.threads is not None and args.threads < 0:
        raise InvalidArgument("--threads", f"got {args.threads}; {THREADS_ALLOWED}")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise InvalidArgument("--metrics-port", f"got {args.metrics_port}; allowed 1..65535")


def check_server(target: str) -> None:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument("--server", f"got {target!r}; expected HOST:PORT")


def check_out(out: Path | None, flag: str = "--out") -> None:
    """An output folder the command could not write, refused before any work (write_outputs checks it again when
    it writes: the same words)."""
    from difflens.render.outputs import out_folder_problem

    problem = None if out is None else out_folder_problem(out)
    if problem:
        raise InvalidArgument(flag, problem)


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """`difflens explain`'s flags -> {"generation": GenerationParams fields, "explain": ExplainOptions}, validated
    (every check that does not need the model happens here), for a local run and a --server one alike."""
    from difflens.engine.options import GenerationParams, Sampling

    check_out(args.out)
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


class ProgressBar:
    """A tqdm bar over the denoising steps on stderr, created at the first step (when the total is known), showing
    the timestep and how many steps were explained so far. A local run feeds it the engine's callbacks (on_step,
    on_progress; `step_s` then holds each step's wall time, denoising and explaining), a --server run the job's
    events (on_event: the Step event of each explained step, the Progress event of each other one; on_break)."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.explained = 0
        self.step_s: dict[int, float] = {}
        self.broken = ""  # the job whose stream broke and is being resumed
        self._last = time.perf_counter()

    def on_step(self, step: Any) -> None:
        self.explained += 1

    def on_progress(self, index: int, total: int, timestep: int) -> None:
        now = time.perf_counter()
        self.step_s[index], self._last = now - self._last, now
        self._advance(index, total, timestep)

    def on_event(self, event: Any) -> None:
        from difflens.jobs import Progress, Queued, Started, Step

        if self.broken:
            self._say(f"difflens: resumed job {self.broken}")
            self.broken = ""
        if isinstance(event, Queued):
            print(f"difflens: queued (position {event.position})", file=sys.stderr, flush=True)
        elif isinstance(event, Started):
            print(f"difflens: started on {event.worker} (attempt {event.attempt})", file=sys.stderr, flush=True)
        elif isinstance(event, Step | Progress):
            self.explained += isinstance(event, Step)
            self._advance(event.index, event.num_steps, event.timestep)

    def on_break(self, job_id: str, err: Any) -> None:
        """The stream broke and the client resumes it: say so, rather than let the bar just stall."""
        self.broken = job_id
        self._say(f"difflens: the stream broke ({err.code().name}); resuming job {job_id}")

    def _advance(self, index: int, total: int, timestep: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.set_postfix_str(f"t={timestep} explained={self.explained}", refresh=False)
        self.bar.update(max(0, index + 1 - self.bar.n))

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self, completed: bool = False) -> None:
        """End the bar before anything else is printed: filled for a completed job (a server without Progress
        events sends nothing after the last explained step), where it stopped otherwise. A second close does
        nothing."""
        if self.bar is not None:
            if completed:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None
