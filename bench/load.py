"""Load: N concurrent streaming clients against a real front and real workers for a bounded time.

    PYTHONPATH=service .venv/bin/python -m bench.load [--clients 8] [--seconds 30] [--workers 2] [--steps 2]
        [--masks 4] [--max-streams N] [--max-queue-depth N] [--rss-bound-mb 64] [--redis URL] [--out PATH]

A private Redis (or --redis), one `difflens serve` and --workers `difflens worker` processes (bench.soak's Fleet:
two jobs at once and one torch thread each) on the tiny random-weights model. Once every worker has announced
itself and each client has run one warm-up job, --clients threads each stream Explain calls back to back (small
jobs: --steps denoising steps, DF-RISE with --masks masks on every step; 0: a plain generation) until --seconds
have passed; a job started before then runs to its end. A refused call (RESOURCE_EXHAUSTED: a full queue, or the
front at --max-streams; UNAVAILABLE) is counted and retried after the server's `retry-after-s`.

Reported (a table, and JSON to bench/results/load-<UTC time>.json): jobs by outcome, throughput (completed jobs per
second of the load window), refusals by code, p50 / p95 / p99 of the queue wait (the Queued event to the Started
event, as the client saw them) and of the end-to-end latency (the call to its terminal event), and the front's
resident memory (psutil) before the load (after the warm-up) and after it (every stream closed), with its peak:
the after / before ratio, and whether after <= before + --rss-bound-mb. Exit status 1 when it is not, or when a job
failed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.service import percentile, redis_url
from bench.soak import Fleet
from difflens.engine.options import ExplainOptions, GenerationParams, RiseOptions
from difflens.jobs import Completed, Failed, JobSpec, Queued, Started
from tests.api.hostile import without_keys

RESULTS = Path(__file__).parent / "results"
MODEL = "tiny"
JOB_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 180.0


def job_spec(args: argparse.Namespace, client: int, n: int) -> JobSpec:
    rise = RiseOptions(num_masks=args.masks, batch_size=args.masks) if args.masks else None
    return JobSpec(model=MODEL, params=GenerationParams(f"a red circle {client} {n}", steps=args.steps,
                                                        guidance_scale=2.0, seed=n),
                   explain=ExplainOptions(rise=rise))


def one_job(client: Any, spec: JobSpec) -> dict[str, Any]:
    """One Explain call followed to its end: {"outcome", "wait_s", "e2e_s"} or, refused, {"outcome": code name,
    "refused": True, "retry_after_s"}."""
    import grpc

    from difflens.client import retry_after_s

    t0 = time.monotonic()
    row: dict[str, Any] = {"outcome": "none"}
    queued = None
    try:
        for event in client.explain(spec, timeout=JOB_TIMEOUT_S):
            now = time.monotonic()
            if isinstance(event, Queued):
                queued = now
            elif isinstance(event, Started) and "wait_s" not in row and queued is not None:
                row["wait_s"] = now - queued
            elif isinstance(event, Completed | Failed):
                row["e2e_s"] = now - t0
                row["outcome"] = "completed" if isinstance(event, Completed) else f"failed {event.code}"
    except grpc.RpcError as e:
        row.update(outcome=e.code().name, refused=queued is None, retry_after_s=retry_after_s(e))
    return row


def run_client(target: str, index: int, args: argparse.Namespace, until: float, out: list[dict[str, Any]]) -> None:
    from difflens.client import DifflensClient

    with DifflensClient(target, caller=f"load-{index}", retries=0) as client:
        n = 0
        while time.monotonic() < until:
            row = one_job(client, job_spec(args, index, n))
            out.append(row)
            n += 1
            if row.get("refused"):
                time.sleep(min(row["retry_after_s"] or 0.2, max(0.0, until - time.monotonic())))


def warm_up(target: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One job per client, one after another, before anything is measured: the front's and workers' first calls
    (imports, caches, connection pools) are not the load's."""
    from difflens.client import DifflensClient

    with DifflensClient(target, caller="load-warmup", retries=0) as client:
        return [one_job(client, job_spec(args, -1, i)) for i in range(args.clients)]


def wait_for_workers(target: str, workers: int) -> None:
    """Until the front's ListModels counts `workers` live workers of the model (they announce themselves once up)."""
    from difflens.client import DifflensClient

    end = time.monotonic() + READY_TIMEOUT_S
    with DifflensClient(target) as client:
        while True:
            live = {m.name: m.live_workers for m in client.list_models().models}.get(MODEL, 0)
            if live >= workers:
                return
            if time.monotonic() > end:
                raise RuntimeError(f"{live} of {workers} workers up after {READY_TIMEOUT_S:g} s")
            time.sleep(0.3)


class RssSampler:
    """The front's resident set size (MiB): `now()`, and the peak of samples taken every 0.2 s in between."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> float:
        return float(self.proc.memory_info().rss) / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.now())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def latency_row(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "n": 0}
    return {f"p{q}_ms": round(percentile(values, q / 100) * 1000, 1) for q in (50, 95, 99)} | {"n": len(values)}


def summarize(rows: list[dict[str, Any]], seconds: float, rss: dict[str, float], bound_mb: float) -> dict[str, Any]:
    outcomes = collections.Counter(r["outcome"] for r in rows)
    completed = outcomes.get("completed", 0)
    return {
        "jobs": dict(outcomes), "seconds": round(seconds, 2),
        "throughput_jobs_per_s": round(completed / seconds, 2) if seconds > 0 else 0.0,
        "refusals": dict(collections.Counter(r["outcome"] for r in rows if r.get("refused"))),
        "queue_wait": latency_row([r["wait_s"] for r in rows if "wait_s" in r]),
        "end_to_end": latency_row([r["e2e_s"] for r in rows if r["outcome"] == "completed"]),
        "front_rss_mib": {**{k: round(v, 1) for k, v in rss.items()},
                          "ratio_after_before": round(rss["after"] / rss["before"], 3), "bound_mib": bound_mb,
                          "within_bound": rss["after"] <= rss["before"] + bound_mb},
    }


def report(result: dict[str, Any]) -> None:
    a, r = result["args"], result
    explain = f"DF-RISE {a['masks']} masks" if a["masks"] else "no explainer"
    print(f"load: {a['clients']} clients x {a['seconds']:g} s, {a['workers']} workers, tiny model, {a['steps']} steps, "
          f"{explain} ({r['machine']['cpus']} CPUs, commit {r['commit']})")
    jobs = ", ".join(f"{k} {v}" for k, v in sorted(r["jobs"].items()))
    refusals = ", ".join(f"{k} {v}" for k, v in sorted(r["refusals"].items())) or "none"
    print(f"  jobs: {jobs}; throughput {r['throughput_jobs_per_s']:.2f} jobs/s over {r['seconds']:.1f} s; "
          f"refusals: {refusals}")
    print(f"  {'':12} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'n':>6}")
    for name in ("queue_wait", "end_to_end"):
        row = r[name]
        cells = " ".join(f"{row[k]:9.1f}" if row[k] is not None else f"{'-':>9}" for k in ("p50_ms", "p95_ms",
                                                                                          "p99_ms"))
        print(f"  {name:12} {cells} {row['n']:6d}")
    m = r["front_rss_mib"]
    print(f"  front RSS: {m['before']:.1f} MiB before, {m['after']:.1f} after (x{m['ratio_after_before']:.3f}), "
          f"peak {m['peak']:.1f}; bound before + {m['bound_mib']:g} MiB: {'ok' if m['within_bound'] else 'EXCEEDED'}")


def commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default 8)")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long clients start new jobs (default 30)")
    ap.add_argument("--workers", type=int, default=2, help="`difflens worker` processes (default 2)")
    ap.add_argument("--steps", type=int, default=2, help="denoising steps per job (default 2)")
    ap.add_argument("--masks", type=int, default=4, help="DF-RISE masks per step; 0: no explainer (default 4)")
    ap.add_argument("--max-streams", type=int, help="the front's --max-streams (default: its own, 500)")
    ap.add_argument("--max-queue-depth", type=int, help="the front's --max-queue-depth (default: its own, 1000)")
    ap.add_argument("--rss-bound-mb", type=float, default=64.0,
                    help="the front's RSS after the load may exceed it before by this many MiB (default 64)")
    ap.add_argument("--redis", help="Redis URL (default: DIFFLENS_REDIS_URL, else a private server)")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/load-<UTC time>.json)")
    args = ap.parse_args(argv)
    for flag in ("clients", "workers", "steps"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag}: got {getattr(args, flag)}; must be >= 1")
    if args.seconds <= 0 or args.masks < 0:
        ap.error("--seconds must be > 0 and --masks >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC)
    out = args.out or RESULTS / f"load-{stamp:%Y%m%dT%H%M%SZ}.json"
    front_flags = [("--max-streams", args.max_streams), ("--max-queue-depth", args.max_queue_depth)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="difflens-load-") as tmp, \
            redis_url(args.redis or os.environ.get("DIFFLENS_REDIS_URL")) as url:
        from difflens.engine.tiny import make_tiny_model

        fleet = Fleet(url, make_tiny_model(Path(tmp) / MODEL), Path(tmp), args.workers, [MODEL],
                      front_flags=(*without_keys(), *(str(v) for f, v in front_flags if v is not None for v in (f, v))))
        try:
            wait_for_workers(fleet.target, args.workers)
            warm = warm_up(fleet.target, args)
            rss = RssSampler(fleet.front.pid)
            before = rss.now()
            t0 = time.monotonic()
            threads = [threading.Thread(target=run_client, args=(fleet.target, i, args, t0 + args.seconds, rows))
                       for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.monotonic() - t0
            time.sleep(1.0)  # the front's streams close after their last event
            rss.stop()
            memory = {"before": before, "after": rss.now(), "peak": rss.peak}
        finally:
            fleet.stop()
    result = {"date": stamp.isoformat(timespec="seconds"), "commit": commit(),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "warmup_jobs": len(warm), **summarize(rows, seconds, memory, args.rss_bound_mb)}
    report(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"  -> {out}")
    failed = sum(v for k, v in result["jobs"].items() if k != "completed" and k not in result["refusals"])
    return 0 if result["front_rss_mib"]["within_bound"] and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
