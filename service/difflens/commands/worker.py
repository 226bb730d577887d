"""`difflens worker`: one worker process on the Redis queue. torch is imported only when it runs, after the idle
spin of its threads is limited."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from difflens.commands.backend_flags import add_worker_flags, engine_settings
from difflens.commands.common import check_process_flags
from difflens.config import AUDIT_DIR_HELP, ServiceSettings, limit_idle_spin
from difflens.errors import InvalidArgument


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run one worker: take jobs from the Redis queue and explain them",
                       description="Load the models once, then claim jobs from the Redis queue and run them, up to "
                                   "--max-jobs at once (their DF-RISE masks share UNet calls of up to --max-batch "
                                   "samples). SIGTERM/SIGINT: stop taking jobs, finish the held ones (up to "
                                   "--drain-grace, then hand them back to the queue), exit 0.")
    p.add_argument("--model", action="append", metavar="NAME=DIR",
                   help="a model to serve (repeatable; default: the shipped model as 'default')")
    p.add_argument("--redis", metavar="URL", help="Redis URL (default: DIFFLENS_REDIS_URL)")
    p.add_argument("--queue", metavar="NAME", help="queue (stream key prefix; default: DIFFLENS_QUEUE or difflens)")
    add_worker_flags(p, "DIFFLENS_THREADS, else the CPUs this process may use, container limit included")
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics on this port")
    p.add_argument("--metrics-host", metavar="ADDR", help="address /metrics listens on (default: "
                                                           "DIFFLENS_METRICS_HOST, else 127.0.0.1; 0.0.0.0 for a "
                                                           "Prometheus on another host or pod)")
    p.add_argument("--drain-grace", type=float, metavar="S",
                   help="on SIGTERM, seconds the jobs it holds get to finish before they are handed back to the "
                        "queue for another worker (default 30; a second SIGTERM hands them back at once)")
    p.add_argument("--name", help="worker name in job records (default: host-pid-random)")
    p.add_argument("--audit-dir", metavar="DIR", help=AUDIT_DIR_HELP)
    p.set_defaults(run=run)


def worker_settings(args: argparse.Namespace) -> ServiceSettings:
    check_process_flags(args)
    engine = engine_settings(args, device=args.device, dtype=args.dtype, threads=args.threads)
    settings = ServiceSettings.from_env(
        engine=engine, models=ServiceSettings.parse_models(args.model), redis_url=args.redis, queue_name=args.queue,
        worker_max_jobs=args.max_jobs, worker_max_batch=args.max_batch, metrics_port=args.metrics_port,
        drain_grace_s=args.drain_grace,
        metrics_host=args.metrics_host, audit_dir=args.audit_dir)
    if settings.audit_dir is not None:
        from difflens import audit

        audit.check_store(settings.audit_dir)
    if not settings.redis_url:
        raise InvalidArgument("--redis", "a worker process needs the Redis URL (--redis or DIFFLENS_REDIS_URL); "
                                         "the in-process queue only exists inside `difflens serve --embedded`")
    return settings


def run(args: argparse.Namespace) -> int:
    limit_idle_spin()  # before anything imports torch
    settings = worker_settings(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from difflens.metrics import Health, serve_metrics
    from difflens.models import ModelRegistry
    from difflens.queue.redis_streams import connect
    from difflens.worker.worker import Worker

    # /readyz: 503 while the models load (a startup probe sized for it), then 200 until draining, and on the triton
    # backend while a Triton server does not answer ready (the worker goes on taking jobs; they fail UNAVAILABLE)
    probe = Health()
    if settings.metrics_port is not None:  # first: a busy port fails before the models load
        serve_metrics(settings.metrics_port, settings.metrics_host or "127.0.0.1", probe)
        probe.set(False, "loading models")
    threads = settings.engine.apply_threads()
    registry = ModelRegistry(settings)
    entries = registry.load_all()  # a bad folder fails here, before any job is taken
    for entry in entries:
        server = entry.unet_server
        backend = entry.runner.backend + (f" {server['model']!r} at {server['url']}" if server else "")
        print(f"difflens: worker: model {entry.name!r} loaded from {entry.folder} "
              f"({settings.engine.device}, {settings.engine.dtype}, {backend}, {threads} threads)",
              file=sys.stderr)
    if settings.engine.unet_backend == "triton":
        from difflens.triton.client import readiness_check

        probe.check = readiness_check(entries)
    probe.set(False, "models loaded; waiting for the queue")
    queue = connect(settings)
    stop = threading.Event()
    worker = Worker(settings, queue, registry, name=args.name)

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            print(f"difflens: worker: {name} again: handing held jobs back now", file=sys.stderr)
            worker.hand_back_now()
            return
        probe.set(False, "draining")
        print(f"difflens: worker: {name}: finishing held jobs (up to {settings.drain_grace_s:g} s, then they are "
              "handed back to the queue)", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    probe.set(True, f"worker {worker.name} ready")
    print(f"difflens: worker {worker.name} ready", file=sys.stderr, flush=True)
    try:
        worker.run(stop)
    finally:
        queue.close()
    return 0
