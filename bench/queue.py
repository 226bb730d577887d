"""Queue throughput: no-op jobs per second through each JobQueue implementation, and their end-to-end latency.

One producer thread enqueues jobs, keeping at most --inflight of them unfinished; --workers threads each claim a
job as a worker does (claim_ahead, then confirm(): the claim script, which writes Started) and finish it with
Completed (no engine work). Each Redis
worker thread has its own RedisStreamsQueue (its own connection pool), like separate worker processes.
Latency is enqueue call -> finish returned. Target: >= 500 jobs/s through Redis. --models 2 spreads the jobs over two
models whose work streams every worker reads (a worker of several models).
    PYTHONPATH=service .venv/bin/python -m bench.queue [--jobs 2000] [--workers 4] [--models 1,2]
                                                       [--backends redis,memory]
Redis: REDIS_URL when set, else a private redis-server (tests/support/redis_server.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from difflens.config import ServiceSettings
from difflens.engine.options import GenerationParams
from difflens.jobs import Completed, JobSpec
from difflens.queue.base import JobQueue
from difflens.queue.memory import InProcessQueue
from difflens.queue.redis_streams import RedisStreamsQueue

RESULTS = Path(__file__).parent / "results" / "queue.json"
TARGET_REDIS_JOBS_PER_S = 500.0
SPEC = JobSpec("default", GenerationParams("a large red striped circle in the center", steps=20))


def model_names(n: int) -> tuple[str, ...]:
    """The models of a run: every worker serves all of them, and jobs go to them in turn (n = 1: "default")."""
    return ("default",) if n == 1 else tuple(f"model{i}" for i in range(n))


@dataclass
class Row:
    backend: str
    models: int
    workers: int
    inflight: int
    jobs: int
    jobs_per_s: float
    p50_ms: float
    p90_ms: float
    enqueue_p50_ms: float
    seconds: float


def _quantile(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q * 100) - 1] if len(xs) > 1 else xs[0]


def run_jobs(producer: JobQueue, workers: list[JobQueue], jobs: int, inflight: int,
             models: tuple[str, ...] = ("default",)) -> tuple[float, list[float], list[float]]:
    """Pushes `jobs` no-op jobs through, spread over `models` in turn, to workers that serve all of them; returns
    (wall seconds, end-to-end latencies, enqueue call latencies)."""
    specs = [replace(SPEC, model=m) for m in models]
    slots = threading.Semaphore(inflight)
    started: dict[str, float] = {}
    finished: list[tuple[str, float]] = []
    enqueue_s: list[float] = []
    lock = threading.Lock()
    all_done = threading.Event()
    stop = threading.Event()

    def work(q: JobQueue, name: str) -> None:
        while not stop.is_set():
            got = q.claim_ahead(name, models, block_s=0.2)
            if got is None:
                continue
            c, confirm = got
            if confirm():  # the claim script, which also writes Started
                q.finish(c, Completed(b"", "{}"))
            t = time.perf_counter()
            with lock:
                finished.append((c.job_id, t))
                if len(finished) == jobs:
                    all_done.set()
            slots.release()

    threads = [threading.Thread(target=work, args=(q, f"bench-w{i}"), daemon=True) for i, q in enumerate(workers)]
    for th in threads:
        th.start()
    t0 = time.perf_counter()
    for i in range(jobs):
        slots.acquire()
        t = time.perf_counter()
        started[producer.enqueue(specs[i % len(specs)]).id] = t
        enqueue_s.append(time.perf_counter() - t)
    all_done.wait()
    seconds = time.perf_counter() - t0
    stop.set()
    for th in threads:
        th.join()
    latencies = [t - started[job_id] for job_id, t in finished]
    return seconds, latencies, enqueue_s


def measure(backend: str, make: Callable[[], JobQueue], shared: bool, jobs: int, workers: int, inflight: int,
            warmup: int, models: int = 1) -> Row:
    producer = make()
    pool = [producer if shared else make() for _ in range(workers)]
    names = model_names(models)
    try:
        run_jobs(producer, pool, warmup, inflight, names)
        seconds, lat, enq = run_jobs(producer, pool, jobs, inflight, names)
    finally:
        if not shared:
            for q in [producer, *pool]:
                q.close()
    return Row(backend, models, workers, inflight, jobs, jobs / seconds, _quantile(lat, 0.5) * 1e3,
               _quantile(lat, 0.9) * 1e3, _quantile(enq, 0.5) * 1e3, seconds)


@contextmanager
def redis_url() -> Iterator[str]:
    from tests.support.redis_server import redis_server

    with redis_server() as url:
        yield url


def drop_keys(url: str, prefix: str) -> None:
    """A shared REDIS_URL keeps no benchmark keys behind (a private server is thrown away anyway)."""
    import redis

    r = redis.Redis.from_url(url)
    keys = list(r.scan_iter(f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])
    r.close()


def redis_version(url: str) -> str:
    import redis

    r = redis.Redis.from_url(url)
    try:
        return str(r.info("server")["redis_version"])
    finally:
        r.close()


HEADER = (f"{'backend':<8} {'models':>6} {'workers':>7} {'inflight':>8} {'jobs':>6} {'jobs/s':>8} {'p50 ms':>7} "
          f"{'p90 ms':>7} {'enq p50':>7}")


def format_row(r: Row) -> str:
    return (f"{r.backend:<8} {r.models:>6} {r.workers:>7} {r.inflight:>8} {r.jobs:>6} {r.jobs_per_s:>8.0f} "
            f"{r.p50_ms:>7.2f} {r.p90_ms:>7.2f} {r.enqueue_p50_ms:>7.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.queue", description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000, help="timed jobs per backend")
    ap.add_argument("--warmup", type=int, default=100, help="untimed jobs first")
    ap.add_argument("--workers", type=int, default=4, help="worker threads")
    ap.add_argument("--inflight", default="1,32",
                    help="comma-separated: most unfinished jobs the producer keeps (1 = unloaded latency)")
    ap.add_argument("--models", default="1,2",
                    help="comma-separated: models the jobs are spread over, every worker serving all of them (a "
                         "worker of several models reads several work streams)")
    ap.add_argument("--backends", default="redis,memory", help="comma-separated: redis, memory")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    inflights = [int(n) for n in args.inflight.split(",")]
    model_counts = [int(n) for n in args.models.split(",")]
    if min(model_counts) < 1:
        raise SystemExit(f"--models: got {args.models!r}; each count must be >= 1")
    # depth never limits here; TTLs only matter for a shared REDIS_URL, where leftovers should not linger
    settings = ServiceSettings(queue_name=f"bench-{uuid.uuid4().hex[:8]}", max_queue_depth=max(inflights) + 1,
                               result_ttl_s=600)
    rows: list[Row] = []
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    print(HEADER, flush=True)
    for backend in args.backends.split(","):
        if backend not in ("redis", "memory"):
            raise SystemExit(f"--backends: unknown {backend!r}; allowed: redis, memory")
        with redis_url() if backend == "redis" else nullcontext(None) as url:
            if url is not None:
                info["redis_server"] = redis_version(url)
            # one process in memory: every thread shares the one queue
            make: Callable[[], JobQueue] = (partial(RedisStreamsQueue, url, settings) if url is not None
                                            else partial(lambda q: q, InProcessQueue(settings)))
            try:
                for m in model_counts:
                    for n in inflights:
                        rows.append(measure(backend, make, url is None, args.jobs, args.workers, n, args.warmup, m))
                        print(format_row(rows[-1]), flush=True)
            finally:
                if url is not None:
                    drop_keys(url, settings.queue_name)
    best = max((r.jobs_per_s for r in rows if r.backend == "redis"), default=None)
    if best is not None:
        print(f"redis: best {best:.0f} jobs/s (target >= {TARGET_REDIS_JOBS_PER_S:.0f}): "
              f"{'met' if best >= TARGET_REDIS_JOBS_PER_S else 'NOT met'}")
    result = {"machine": info, "config": {k: v for k, v in vars(args).items() if k != "out"},
              "targets": {"redis_jobs_per_s": TARGET_REDIS_JOBS_PER_S}, "rows": [vars(r) for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
