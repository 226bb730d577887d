"""`difflens serve`: the gRPC front, alone on the Redis queue or with one embedded worker on an in-process queue.
grpc and torch are imported only when it runs (the front alone never imports torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

from difflens.commands.backend_flags import add_worker_flags, engine_settings
from difflens.commands.common import check_positive, check_process_flags
from difflens.commands.security_flags import add_security_flags, security_settings
from difflens.config import AUDIT_DIR_HELP, ServiceSettings, limit_idle_spin
from difflens.errors import InvalidArgument


def add(sub: argparse._SubParsersAction) -> None:
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
    add_worker_flags(w, "the CPUs this process may use, container limit included")
    w.add_argument("--audit-dir", metavar="DIR", help=AUDIT_DIR_HELP)
    p.set_defaults(run=run)


def _serve_settings(args: argparse.Namespace) -> ServiceSettings:
    if not 0 <= args.port < 65536:
        raise InvalidArgument("--port", f"got {args.port}; allowed 0..65535 (0 = any free port)")
    check_positive("--max-queue-depth", args.max_queue_depth)
    check_positive("--max-streams", args.max_streams)
    check_process_flags(args)
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


def run(args: argparse.Namespace) -> int:
    if args.embedded:
        limit_idle_spin()  # before anything imports torch
    settings = serve_settings(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.embedded:  # the front alone runs no torch; the embedded worker's threads follow the CPU limit
        settings.engine.apply_threads()
    import asyncio  # here, not at the top: `difflens --help` should not pay for it

    return asyncio.run(_serve(settings, args.embedded, args.port_file))
