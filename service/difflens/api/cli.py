"""`difflens serve` (the gRPC front, optionally with an embedded worker) and `difflens explain --server` (the local
CLI's options and outputs, run on a server). grpc and torch are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from difflens.api.client_cli import add_client_flags, connect
from difflens.api.security_flags import add_security_flags, security_settings
from difflens.backend_flags import add_backend_flags, engine_settings
from difflens.config import AUDIT_DIR_HELP, DTYPES, THREADS_ALLOWED, ServiceSettings, limit_idle_spin
from difflens.errors import InvalidArgument

AUDIT_FILE = "audit.json"


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC front (Explain, Submit, WatchJob, ...)",
                       description="Serve the Explainer gRPC service with health checks and reflection. Without "
                                   "--embedded, jobs go to the Redis queue for `difflens worker` processes; with "
                                   "--embedded, one worker runs in this process on an in-process queue. SIGTERM: "
                                   "NOT_SERVING, finish running streams (up to --drain-grace s), exit 0.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 = any free port)")
    p.add_argument("--port-file", type=Path, metavar="PATH", help="write the bound port here once serving")
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", metavar="ADDR",
                   help="address /metrics listens on (default: DIFFLENS_METRICS_HOST, else --host)")
    p.add_argument("--model", action="append", metavar="NAME=DIR",
                   help="a model to serve (repeatable; default: the shipped model as 'default')")
    p.add_argument("--embedded", action="store_true", help="run one worker in this process (in-process queue)")
    p.add_argument("--redis", metavar="URL", help="Redis URL (default: DIFFLENS_REDIS_URL); not with --embedded")
    p.add_argument("--queue", metavar="NAME", help="queue (stream key prefix; default: DIFFLENS_QUEUE or difflens)")
    p.add_argument("--max-queue-depth", type=int, metavar="N", help="jobs waiting per model before RESOURCE_EXHAUSTED")
    p.add_argument("--max-streams", type=int, metavar="N", help="Explain / WatchJob streams this front follows at "
                                                                "once before RESOURCE_EXHAUSTED (default 500)")
    p.add_argument("--drain-grace", type=float, metavar="S", help="seconds running streams get on SIGTERM "
                                                                   "(default 30)")
    add_security_flags(p)
    w = p.add_argument_group("embedded worker (default: DIFFLENS_* environment)")
    add_backend_flags(w)
    w.add_argument("--device", metavar="cpu|cuda|cuda:N")
    w.add_argument("--dtype", metavar="|".join(DTYPES))
    w.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: the CPUs this process may "
                                                            "use, container limit included)")
    w.add_argument("--max-jobs", type=int, help="jobs run at once (default 4)")
    w.add_argument("--max-batch", type=int, help="samples per shared UNet call (default 64)")
    w.add_argument("--audit-dir", metavar="DIR", help=AUDIT_DIR_HELP)
    p.set_defaults(run=run_serve)


def add_ensure_groups(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensure-groups", help="make each model's work stream and consumer group in Redis, then exit",
                       description="Create, where missing, the consumer group that workers read each model's work "
                                   "stream with, and exit 0. An autoscaler that watches a model's queue (KEDA's "
                                   "redis-streams trigger) reads that group, and finds none while the model has "
                                   "never had a worker: the Helm chart runs this as a post-install and "
                                   "post-upgrade hook, so a model added to a release gets its group even before "
                                   "the fronts roll. `difflens serve` does the same for its models at start-up.")
    p.add_argument("--model", action="append", required=True, metavar="NAME[=DIR]",
                   help="a model name (repeatable); NAME=DIR as `serve` takes it is accepted, the folder unused")
    p.add_argument("--redis", metavar="URL", help="Redis URL (default: DIFFLENS_REDIS_URL)")
    p.add_argument("--queue", metavar="NAME", help="queue (stream key prefix; default: DIFFLENS_QUEUE or difflens)")
    p.set_defaults(run=run_ensure_groups)


def run_ensure_groups(args: argparse.Namespace) -> int:
    names = [m.partition("=")[0] for m in args.model]
    if not all(names):
        raise InvalidArgument("--model", f"got {args.model}; expected NAME or NAME=DIR")
    settings = ServiceSettings.from_env(redis_url=args.redis, queue_name=args.queue)
    if not settings.redis_url:
        raise InvalidArgument("--redis", "needs the Redis URL (--redis or DIFFLENS_REDIS_URL)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from difflens.queue.redis_streams import connect
    from difflens.queue.redis_work import GROUP, work_stream

    queue = connect(settings)
    try:
        queue.prepare(names)
    finally:
        queue.close()
    streams = ", ".join(work_stream(settings.queue_name, n) for n in dict.fromkeys(names))
    print(f"difflens: consumer group {GROUP!r} ready on {streams}", file=sys.stderr)
    return 0


def _serve_settings(args: argparse.Namespace) -> ServiceSettings:
    if not 0 <= args.port < 65536:
        raise InvalidArgument("--port", f"got {args.port}; allowed 0..65535 (0 = any free port)")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise InvalidArgument("--metrics-port", f"got {args.metrics_port}; allowed 1..65535")
    for flag, value in (("--max-queue-depth", args.max_queue_depth), ("--max-streams", args.max_streams),
                        ("--max-jobs", args.max_jobs),
                        ("--max-batch", args.max_batch)):
        if value is not None and value < 1:
            raise InvalidArgument(flag, f"got {value}; must be >= 1")
    if args.threads is not None and args.threads < 0:
        raise InvalidArgument("--threads", f"got {args.threads}; {THREADS_ALLOWED}")
    if args.drain_grace is not None and args.drain_grace < 0:
        raise InvalidArgument("--drain-grace", f"got {args.drain_grace}; must be >= 0")
    if args.embedded and args.redis:
        raise InvalidArgument("--redis", "not with --embedded (the embedded worker uses the in-process queue)")
    engine = engine_settings(args, device=args.device, dtype=args.dtype, threads=args.threads)
    settings = ServiceSettings.from_env(
        engine=engine, models=ServiceSettings.parse_models(args.model), redis_url=args.redis, queue_name=args.queue,
        host=args.host, port=args.port, metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        max_queue_depth=args.max_queue_depth, max_streams=args.max_streams,
        drain_grace_s=args.drain_grace, worker_max_jobs=args.max_jobs, worker_max_batch=args.max_batch,
        audit_dir=args.audit_dir)
    if args.embedded:
        if settings.audit_dir is not None:
            from difflens import audit

            audit.check_store(settings.audit_dir)
        return dataclasses.replace(settings, redis_url=None)
    if args.audit_dir is not None:
        raise InvalidArgument("--audit-dir", "only with --embedded (the workers keep the records: pass it to them)")
    if not settings.redis_url:
        raise InvalidArgument("--redis", "the front needs the Redis URL (--redis or DIFFLENS_REDIS_URL), or "
                                         "--embedded for a single process with its own worker")
    return settings


def serve_settings(args: argparse.Namespace) -> ServiceSettings:
    settings = _serve_settings(args)
    auth, tls = security_settings(args)
    return dataclasses.replace(settings, auth=auth, tls=tls)


def _write_port(path: Path, port: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)  # readers never see a partial file


async def _serve(settings: ServiceSettings, embedded: bool, port_file: Path | None) -> int:
    import asyncio

    from difflens.api.server import DifflensServer
    from difflens.metrics import Health, serve_metrics

    probe = Health()
    if settings.metrics_port is not None:  # first: a busy port fails before any model loads or Redis is waited for
        serve_metrics(settings.metrics_port, settings.metrics_host or settings.host, probe)
    server = DifflensServer(settings, run_worker=embedded, probe=probe)
    port = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if port_file is not None:
        _write_port(port_file, port)
    mode = "embedded worker, in-process queue" if embedded else f"Redis queue {settings.queue_name!r}"
    print(f"difflens: serving on {settings.host}:{port} ({mode}; models: {', '.join(server.catalog.names())})",
          file=sys.stderr, flush=True)
    await stop.wait()
    print(f"difflens: draining (up to {settings.drain_grace_s:g} s for running streams)", file=sys.stderr, flush=True)
    await server.drain()
    print("difflens: stopped", file=sys.stderr, flush=True)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    if args.embedded:
        limit_idle_spin()  # before anything imports torch
    settings = serve_settings(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.embedded:  # the front alone runs no torch; the embedded worker's threads follow the CPU limit
        settings.engine.apply_threads()
    import asyncio  # here, not at the top: `difflens --help` should not pay for it

    return asyncio.run(_serve(settings, args.embedded, args.port_file))


# ---------------------------------------------------------------- explain --server


def add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list a server's models: live workers, jobs waiting, defaults",
                       description="ListModels on a running server, as a table: each model with its live workers "
                                   "(heard from within the visibility timeout) and the jobs waiting in its queue, as "
                                   "the front last sampled them, and its sampling defaults.")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the gRPC front")
    p.add_argument("--json", action="store_true", help="print the ListModels response as JSON instead")
    add_client_flags(p)
    p.set_defaults(run=run_models)


def run_models(args: argparse.Namespace) -> int:
    check_server(args.server)
    import grpc
    from google.protobuf.json_format import MessageToJson

    from difflens.api.pb import pb

    with connect(args) as client:
        try:
            response = client.list_models(timeout=10)
        except grpc.RpcError as e:
            line, status = rpc_error_line(e)
            print(line, file=sys.stderr)
            return status
    if args.json:
        print(MessageToJson(response, preserving_proto_field_name=True))
        return 0
    rows = [("model", "workers", "waiting", "steps", "guidance", "scheduler", "size")]
    for m in response.models:
        scheduler = pb.Scheduler.Name(m.default_scheduler).removeprefix("SCHEDULER_").lower()
        rows.append((m.name + (" (default)" if m.is_default else ""), str(m.live_workers), str(m.queue_depth),
                     str(m.default_steps), f"{m.default_guidance_scale:g}", scheduler,
                     f"{m.default_width}x{m.default_height}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def check_server(target: str) -> None:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument("--server", f"got {target!r}; expected HOST:PORT")


def remote_spec(args: argparse.Namespace) -> Any:
    """The local CLI's options -> a JobSpec (the same checks as `difflens explain`, before anything is sent)."""
    from difflens.cli import build_request
    from difflens.engine.options import GenerationParams
    from difflens.jobs import JobSpec, OutputOptions

    for flag in ("backend", "triton_url", "triton_model", "device", "dtype"):
        if getattr(args, flag, None) is not None:
            raise InvalidArgument(f"--{flag.replace('_', '-')}", "not used with --server (the server's settings "
                                                                 "apply)")
    check_server(args.server)
    if args.timeout is not None and not args.timeout > 0:
        raise InvalidArgument("--timeout", f"got {args.timeout:g}; must be > 0 (seconds)")
    try:
        r = build_request(args)
    except InvalidArgument as e:  # a count under 1: tell the range this deployment allows, as the server would
        if e.field in COUNT_FIELDS:
            check_server_limits(args)
        raise
    model = "" if args.model_dir in ("-", "") else str(args.model_dir)
    # Progress events: the bar moves on every denoising step, not only on the explained ones.
    return JobSpec(model=model, params=GenerationParams(args.prompt, **r["generation"]), explain=r["explain"],
                   output=OutputOptions(map_dtype=args.map_dtype or "float32", progress_events=True))


COUNT_FIELDS = ("steps", "rise.num_masks", "rise.batch_size")


def check_server_limits(args: argparse.Namespace) -> None:
    """The counts given (--steps, --masks, --batch) against the server's limits (ListModels): for a count the
    local checks refused, whose engine-wide range ([1, 1000000] masks) is not what this deployment allows (the
    server tells [1, 8192] for too many). Best effort: a server that cannot say (down, older) leaves the local
    error standing. Only on that error path: a normal call makes no extra round trip."""
    given = {"steps": args.steps, "rise.num_masks": getattr(args, "masks", None),
             "rise.batch_size": getattr(args, "batch", None)}
    if all(v is None for v in given.values()):
        return
    import grpc

    from difflens.config import Limits
    from difflens.validation import check_given_limits

    try:
        with connect(args, retries=0) as client:
            pb_limits = client.list_models(timeout=5).limits
    except grpc.RpcError:
        return
    if pb_limits.max_steps and pb_limits.max_masks and pb_limits.max_rise_batch:
        check_given_limits(given, Limits(max_steps=pb_limits.max_steps, max_masks=pb_limits.max_masks,
                                         max_rise_batch=pb_limits.max_rise_batch))


class RemoteProgress:
    """A tqdm bar over the denoising steps, advanced by the Step event of each explained step and the Progress
    event of each other one."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.explained = 0
        self.broken = ""  # the job whose stream broke and is being resumed

    def on_break(self, job_id: str, err: Any) -> None:
        """The stream broke and the client resumes it: say so, rather than let the bar just stall."""
        self.broken = job_id
        self._say(f"difflens: the stream broke ({err.code().name}); resuming job {job_id}")

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

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
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=event.num_steps, desc="denoising", unit="step", file=sys.stderr,
                                dynamic_ncols=True)
            self.explained += isinstance(event, Step)
            self.bar.set_postfix_str(f"t={event.timestep} explained={self.explained}", refresh=False)
            self.bar.update(max(0, event.index + 1 - self.bar.n))

    def close(self, completed: bool) -> None:
        """End the bar before anything else is printed: filled for a completed job (a server without Progress
        events sends nothing after the last explained step), where it stopped for a failed one."""
        if self.bar is not None:
            if completed:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None


def rpc_error_line(err: Any) -> tuple[str, int]:
    """A gRPC error -> (the CLI's error line, exit status): bad input 2 (naming the flag when there is one)."""
    import grpc

    from difflens.api.convert import pb_field
    from difflens.cli import FLAG_OF_FIELD

    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        path, _, message = details.partition(": ")
        flags = {pb_field(domain): flag for domain, flag in FLAG_OF_FIELD.items()}
        return f"difflens: error: {flags.get(path, path)}: {message}", 2
    return f"difflens: error: server: {code.name}: {details}", 1


def warn_if_unserved(client: Any, model: str) -> None:
    """Say so when no worker serves the job's model (as the front last sampled it): the job then waits until one
    starts, and the bar would just not appear. Best effort: a front that cannot tell says nothing."""
    import grpc

    try:
        models = client.list_models(timeout=5).models
    except grpc.RpcError:
        return
    info = next((m for m in models if m.name == model or (not model and m.is_default)), None)
    if info is not None and info.live_workers == 0:
        print(f"difflens: no worker serves model {info.name!r} right now; the job waits until one starts",
              file=sys.stderr, flush=True)


def run_explain_remote(args: argparse.Namespace) -> int:
    """`difflens explain --server HOST:PORT MODEL PROMPT --out DIR ...`; MODEL is a served model's name
    ('-' = the server's default). Writes what the local command writes, audit.json being the job's record."""
    spec = remote_spec(args)
    if args.out.exists() and not args.out.is_dir():
        raise InvalidArgument("out", f"{args.out} exists and is not a folder")
    import grpc

    from difflens.client import explanation_from_events
    from difflens.commands.explain_flags import rise_summary
    from difflens.jobs import Completed, Failed, Queued, Started
    from difflens.render import write_outputs

    progress = RemoteProgress()
    with connect(args) as client:
        request = client.request(spec)  # with its idempotency key, which finds the job if interrupted early
        req_key = request.idempotency_key
        stream = client.explain(request, timeout=args.timeout)
        stream.on_break = lambda err: progress.on_break(stream.job_id, err)
        try:
            for event in stream:
                progress.on_event(event)
                if isinstance(event, Queued):
                    warn_if_unserved(client, spec.model)
        except grpc.RpcError as e:
            progress.close(completed=False)
            line, status = rpc_error_line(e)
            if stream.job_id and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                started = any(isinstance(ev, Started) for ev in stream.events)
                line += (f" (job {stream.job_id} has the same deadline and stops at its next step)" if started else
                         f" (job {stream.job_id} has the same deadline: it never started, and the queue fails it)")
            elif stream.job_id and e.code() == grpc.StatusCode.NOT_FOUND:
                line += (f" (job {stream.job_id}: the queue no longer has it - its records expired, or were lost "
                         "with the queue's data)")
            elif stream.job_id:  # the stream broke, not necessarily the job
                line += f" (job {stream.job_id} was running and may still be: WatchJob or GetJob it later)"
            print(line, file=sys.stderr)
            return status
        except KeyboardInterrupt:
            progress.close(completed=False)
            try:
                stream.cancel()
            except grpc.RpcError as e:  # e.g. interrupted while the stream was resuming from a front that died
                which = (f"job {stream.job_id}" if stream.job_id else
                         "the job (the server had not named it yet; if it was queued, its idempotency key "
                         f"{req_key} finds it: Submit the same request again)")
                print(f"difflens: interrupted; could not cancel {which} ({e.code().name}): it may still be "
                      f"running - CancelJob it later; nothing written", file=sys.stderr)
                return 130
            print(f"difflens: interrupted; job {stream.job_id} cancelled, nothing written", file=sys.stderr)
            return 130
    result = stream.result
    progress.close(completed=isinstance(result, Completed))
    if not isinstance(result, Completed):
        why = f"{result.code}: {result.message}" if isinstance(result, Failed) else "the stream ended early"
        print(f"difflens: error: job {stream.job_id} failed: {why}", file=sys.stderr)
        return 1
    exp = explanation_from_events(stream.events)
    for line in rise_summary(exp.steps):
        print(line)
    try:
        written = write_outputs(exp, args.out, companions={AUDIT_FILE: result.audit_json.encode("utf-8")})
    except OSError as e:
        print(f"difflens: error: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"difflens: wrote {len(written)} files to {args.out} (job {stream.job_id})")
    print(f"difflens: report: {written['report.html']}")
    return 0
