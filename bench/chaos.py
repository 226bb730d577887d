"""Chaos with Redis in it: the soak's fleet (bench.soak) on a Redis that keeps its data, with workers SIGKILLed at
random and Redis itself SIGKILLed once and started again on its data.

    PYTHONPATH=service .venv/bin/python -m bench.chaos [--clients 4] [--jobs 50] [--workers 3] [--kill-every 4,8]
        [--worker-kills N] [--redis-kill-at 0.4] [--redis-down 1.0] [--seed 1] [--logs DIR]
        [--out bench/results/chaos-<UTC time>.json]

A redis-server of its own (appendonly yes, appendfsync everysec, its own folder), one `difflens serve` and --workers
`difflens worker` processes on the tiny random-weights model, with bench.soak's settings (3 s visibility timeout, 4
deliveries at most). Every --kill-every seconds (uniform in MIN,MAX) a worker that takes jobs, chosen at random, is
SIGKILLed and a new one started in its place (--term-share of them SIGTERMed instead; none by default), up to
--worker-kills times. Once a share
--redis-kill-at of the jobs has ended, Redis is SIGKILLed, left down --redis-down seconds and started again on the
same port and folder: it replays its append-only file. The clients (bench.soak.run_client: --jobs small Explain
jobs each, 3-14 steps, a few masks, one in ten cancelled after a step) retry a call that finds no queue, and a
stream that breaks resumes with WatchJob.

Each job is checked as in bench.soak (exactly one terminal event, last; WatchJob replays the stream; no step twice;
a completed job has all its steps, in order). The figures - jobs, outcomes, worker kills, Redis kills, redeliveries
(deliveries past a job's first, from its record), dead-lettered (ABORTED after max_deliveries), lost (a job whose
client saw no terminal event), duplicated (more than one terminal event, or a step twice), wall time - are printed
as a table and written as JSON. Exit status 1 if any job has a problem.

A SIGKILL of the Redis process alone loses none of the writes it acknowledged: they are in the kernel's page cache,
and only a crash of the host loses what was not yet fsynced (docs/security.md, "Faults", and its test).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.soak import Fleet, run_client

RESULTS_DIR = Path(__file__).parent / "results"
# Calls retried while Redis is down: 0.2 s doubling, about 50 s in all, longer than a Redis restart takes.
CLIENT_RETRIES = 8


class RedisKiller:
    """SIGKILLs the Redis server once `at` jobs have ended, keeps it down `down_s`, starts it again on its data."""

    def __init__(self, server: Any, at: int, down_s: float) -> None:
        self.server, self.at, self.down_s = server, at, down_s
        self.kills = 0
        self.outage_s = 0.0  # from the kill until it answered again (its load of the AOF included)
        self.errors: list[str] = []

    def run(self, ended: list[dict[str, Any]], stop: threading.Event) -> None:
        try:
            while len(ended) < self.at:
                if stop.wait(0.05):
                    return
            t0 = time.monotonic()
            self.server.kill()
            self.kills += 1
            time.sleep(self.down_s)
            self.server.start()
            self.outage_s = time.monotonic() - t0
        except Exception as e:  # reported in the figures and the exit status, not lost with this thread
            self.errors.append(f"redis kill: {e!r}")


def figures(results: list[dict[str, Any]], fleet: Fleet, redis: RedisKiller, seconds: float) -> dict[str, Any]:
    outcomes = collections.Counter(r["outcome"] for r in results)
    return {
        "jobs": len(results),
        "completed": outcomes["completed"],
        "cancelled": outcomes["failed CANCELLED"],
        "dead_lettered": outcomes["failed ABORTED"],
        "other_failed": sum(v for k, v in outcomes.items()
                            if k.startswith("failed") and k not in ("failed CANCELLED", "failed ABORTED")),
        "worker_kills": fleet.kills,
        "worker_terms": fleet.terms,
        "redis_kills": redis.kills,
        "redis_outage_s": round(redis.outage_s, 2),
        "redeliveries": sum(max(0, (r["deliveries"] or 1) - 1) for r in results),
        "lost": sum(r["terminal"] == 0 for r in results),
        "duplicated": sum(r["terminal"] > 1 or r["step_twice"] for r in results),
        "with_problems": sum(bool(r["problems"]) for r in results),
        "seconds": round(seconds, 1),
        "outcomes": dict(outcomes),
    }


def table(f: dict[str, Any]) -> str:
    cols = ["jobs", "completed", "cancelled", "dead_lettered", "other_failed", "worker_kills", "redis_kills",
            "redis_outage_s", "redeliveries", "lost", "duplicated", "with_problems", "seconds"]
    head = "| " + " | ".join(c.replace("_", " ") for c in cols) + " |"
    return "\n".join([head, "|" + " --- |" * len(cols), "| " + " | ".join(str(f[c]) for c in cols) + " |"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=50, help="jobs per client (default 50: 200 in all)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--kill-every", default="4,8", metavar="MIN,MAX",
                    help="seconds between worker kills (uniform; default 4,8: a worker here takes 5-10 s to start)")
    ap.add_argument("--term-share", type=float, default=0.0, help="share of the worker stops that are SIGTERM")
    ap.add_argument("--worker-kills", type=int, metavar="N", help="stop no more than N workers (default: no limit)")
    ap.add_argument("--redis-kill-at", type=float, default=0.4, metavar="SHARE",
                    help="SIGKILL Redis once this share of the jobs has ended (default 0.4)")
    ap.add_argument("--redis-down", type=float, default=1.0, metavar="S", help="seconds Redis stays down")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, help="JSON results (default bench/results/chaos-<UTC time>.json)")
    ap.add_argument("--logs", type=Path, help="keep the front's and workers' logs in this folder (default: dropped)")
    args = ap.parse_args(argv)
    out = args.out or RESULTS_DIR / f"chaos-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    lo, hi = (float(x) for x in args.kill_every.split(","))
    rnd = random.Random(args.seed)
    results: list[dict[str, Any]] = []
    total = args.clients * args.jobs

    from difflens.engine.tiny import make_tiny_model
    from tests.support.redis_server import PrivateRedis

    with tempfile.TemporaryDirectory(prefix="difflens-chaos-") as tmp, PrivateRedis(appendonly=True) as server:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        fleet = Fleet(server.url, make_tiny_model(Path(tmp) / "tiny"), logs, args.workers, ["tiny"])
        redis = RedisKiller(server, max(1, round(args.redis_kill_at * total)), args.redis_down)
        try:
            stop = threading.Event()
            t0 = time.monotonic()

            def killer() -> None:
                try:
                    while not stop.wait(rnd.uniform(lo, hi)):
                        if args.worker_kills is not None and fleet.kills + fleet.terms >= args.worker_kills:
                            return
                        fleet.stop_one(rnd, args.term_share)
                except Exception as e:  # reported below and in the exit status, not lost with this thread
                    fleet.errors.append(str(e))

            threads = [threading.Thread(target=killer, daemon=True),
                       threading.Thread(target=redis.run, args=(results, stop), daemon=True)]
            clients = [threading.Thread(target=run_client, args=(fleet.target, i, args.jobs, args.seed, ["tiny"],
                                                                 results, CLIENT_RETRIES), daemon=True)
                       for i in range(args.clients)]  # daemons: an interrupted run exits once the fleet is stopped
            for t in threads + clients:
                t.start()
            for t in clients:
                t.join()
            stop.set()
            for t in threads:
                t.join()
            seconds = time.monotonic() - t0
        finally:
            fleet.stop()
    f = figures(results, fleet, redis, seconds)
    for r in results:
        if r["problems"]:
            print(f"PROBLEM job {r['job']}: {'; '.join(r['problems'])}")
    errors = fleet.errors + redis.errors
    for e in errors:
        print(f"PROBLEM fleet: {e}")
    print(table(f))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**f, "fleet_errors": errors, "problems": [r for r in results if r["problems"]],
                               "args": vars(args) | {"out": str(out)}}, indent=2, default=str))
    print(f"written to {out}")
    return 1 if f["with_problems"] or errors or redis.kills != 1 else 0


if __name__ == "__main__":
    sys.exit(main())
