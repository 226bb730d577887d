"""Soak the queue's promises: worker processes SIGKILLed or SIGTERMed at random while clients stream jobs through a
front.

    PYTHONPATH=service .venv/bin/python -m bench.soak [--clients 4] [--jobs 20] [--workers 3] [--models 1]
        [--kill-every 2,5] [--term-share 0.5] [--seed 1] [--redis URL] [--out bench/results/soak.json]

A private Redis (or --redis), one `difflens serve` and --workers `difflens worker` processes on the tiny
random-weights model, with a 3 s visibility timeout and 4 deliveries at most. Every --kill-every seconds (uniform
in MIN,MAX) one worker that takes jobs (not one still loading), chosen at random, is stopped and a new one started
in its place: SIGTERMed with a share --term-share of the time (its drain grace is 0.3 s, after which it hands its
jobs back to the queue), else SIGKILLed (its jobs are reclaimed after the visibility timeout). Each client streams
--jobs Explain calls (3-14 steps, a random subset of the explainers, one in ten cancelled after a step), then
watches the job again from its first event and reads its record. With --models N > 1 the front serves N model
names (the same tiny model under each), each job names one at random, worker slot 0 serves all of them (it reads
several work streams) and every other slot one, in turn: the per-model queues under the same kills.

Checked per job (`job_problems`), as the client saw it: exactly one terminal event, last; WatchJob replays the
stream's events; no step twice; a completed job has every explained step, in order, and its record says
completed; a failed one only a prefix of them. Any problem is printed and makes the exit status 1. A job may fail
ABORTED when every one of its deliveries was killed: that is the dead-letter rule, counted, not a problem.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.service import redis_url
from difflens.jobs import Completed, Event, Failed, JobRecord, JobSpec, Step

RESULTS = Path(__file__).parent / "results" / "soak.json"
ENV = {"PYTHONUNBUFFERED": "1", "DIFFLENS_VISIBILITY_TIMEOUT_S": "3", "DIFFLENS_HEARTBEAT_INTERVAL_S": "0.5",
       "DIFFLENS_MAX_DELIVERIES": "4"}


def _comparable(event: Event) -> Any:
    """An event as a value that == compares (a Step's maps are numpy arrays: by their bytes)."""
    if isinstance(event, Step):
        return ("step", event.index, event.timestep, tuple((k, v.tobytes()) for k, v in sorted(event.maps.items())),
                tuple((t.token, t.map.tobytes()) for t in event.tokens))
    return event


def job_problems(spec: JobSpec, events: list[Event], watched: list[Event], record: JobRecord) -> list[str]:
    """What is wrong with one job as its client saw it: the Explain stream's events, WatchJob's replay of them,
    and GetJob's record. [] when nothing is."""
    problems = []
    terminal = [e for e in events if isinstance(e, Completed | Failed)]
    if len(terminal) != 1 or events[-1] is not terminal[0]:
        problems.append(f"{len(terminal)} terminal events, last {type(events[-1]).__name__ if events else None}")
    if [_comparable(e) for e in watched] != [_comparable(e) for e in events]:
        problems.append("WatchJob from the start differs from the Explain stream")
    steps = [e.index for e in events if isinstance(e, Step)]
    expected = list(range(int(spec.params.steps or 0))) if spec.explain.methods else []
    if len(steps) != len(set(steps)):
        problems.append(f"a step came twice: {steps}")
    if terminal and isinstance(terminal[-1], Completed):
        if steps != expected:
            problems.append(f"completed with steps {steps}, expected {expected}")
        if record.state != "completed":
            problems.append(f"completed, but the record says {record.state}")
    elif steps != expected[:len(steps)]:
        problems.append(f"failed with steps {steps}, not a prefix of {expected}")
    return problems


class Fleet:
    """The front and the workers, as processes; `stop_one` SIGKILLs or SIGTERMs a worker and starts its
    replacement."""

    def __init__(self, url: str, model_dir: Path, logs: Path, workers: int, models: list[str],
                 front_flags: tuple[str, ...] = ()) -> None:
        self.env = {**os.environ, **ENV}
        self.env.pop("DIFFLENS_REDIS_URL", None)
        self.common = ["--redis", url, "--queue", f"soak-{os.getpid()}"]
        self.model_dir, self.models = model_dir, models
        self.logs = logs
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.names: dict[str, str] = {}  # slot -> the name of the worker running in it now
        self.generation = collections.Counter[str]()
        self.kills = 0
        self.terms = 0
        self.errors: list[str] = []  # a stop that went wrong (a worker that ignored SIGTERM)
        port_file = logs / "port"
        self.front = self._spawn("front", ["serve", "--port", "0", "--port-file", str(port_file), "--no-auth",
                                           *self._model_flags(models), *front_flags])
        for i in range(workers):
            self._start_worker(f"w{i}")
        end = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > end or self.front.poll() is not None:
                raise RuntimeError(f"the front did not start; see {logs / 'front.log'}")
            time.sleep(0.2)
        self.target = f"127.0.0.1:{port_file.read_text().strip()}"

    def _model_flags(self, names: list[str]) -> list[str]:
        return [arg for n in names for arg in ("--model", f"{n}={self.model_dir}")]

    def _slot_models(self, slot: str) -> list[str]:
        """Slot w0 serves every model; the others one each, in turn (all of them when there is one model)."""
        i = int(slot.removeprefix("w"))
        return self.models if i == 0 or len(self.models) == 1 else [self.models[(i - 1) % len(self.models)]]

    def _spawn(self, log: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{log}.log").open("w") as out:
            return subprocess.Popen([sys.executable, "-m", "difflens", *argv, *self.common], stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env)

    def _start_worker(self, slot: str) -> None:
        name = f"{slot}-{self.generation[slot]}"
        self.generation[slot] += 1
        self.names[slot] = name
        self.workers[slot] = self._spawn(name, ["worker", "--name", name, "--max-jobs", "2", "--threads", "1",
                                                "--drain-grace", "0.3", *self._model_flags(self._slot_models(slot))])

    def _taking_jobs(self, slot: str) -> bool:
        """Whether the slot's worker has loaded its models and takes jobs (it says "ready")."""
        log = self.logs / f"{self.names[slot]}.log"
        return log.exists() and f"worker {self.names[slot]} ready" in log.read_text(errors="replace")

    def stop_one(self, rnd: random.Random, term_share: float) -> None:
        """Stop a worker that takes jobs, chosen at random, and start another in its slot. None does (all still
        loading, on a busy machine): nothing is stopped, since stopping a worker before it takes a job tests
        nothing and would leave the jobs to no one."""
        ready = [slot for slot in sorted(self.workers) if self._taking_jobs(slot)]
        if not ready:
            return
        slot = rnd.choice(ready)
        if rnd.random() < term_share:
            self.workers[slot].send_signal(signal.SIGTERM)
            self.terms += 1
        else:
            self.workers[slot].send_signal(signal.SIGKILL)
            self.kills += 1
        try:
            self.workers[slot].wait(timeout=60)
        except subprocess.TimeoutExpired:  # a worker that does not stop on SIGTERM: the soak reports it
            self.workers[slot].kill()
            self.workers[slot].wait()
            raise RuntimeError(f"worker {slot} did not exit within 60 s of SIGTERM") from None
        self._start_worker(slot)

    def stop(self) -> None:
        procs = [self.front, *self.workers.values()]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def run_client(target: str, index: int, jobs: int, seed: int, models: list[str], out: list[dict[str, Any]],
               retries: int = 3) -> None:
    """One client's jobs, one after another; per job `out` gets its id, outcome, problems (job_problems), terminal
    events and whether a step came twice (as its client saw them), and its deliveries (None: record unread).
    `retries`: the client's retries of a call that finds no front or no queue (UNAVAILABLE)."""
    from difflens.client import DifflensClient
    from tests.worker.helpers import spec

    rnd = random.Random(f"{seed}-{index}")
    with DifflensClient(target, caller=f"soak-{index}", retries=retries) as client:
        for j in range(jobs):
            methods = tuple(m for m in ("rise", "cam", "attn") if rnd.random() < 0.5)
            s = dataclasses.replace(spec(f"a red circle {index} {j}", seed=index * 1000 + j, steps=rnd.randint(3, 14),
                                         methods=methods, masks=16, batch=8), model=rnd.choice(models))
            cancel_after = rnd.randint(1, 3) if rnd.random() < 0.1 else None
            stream = client.explain(s, timeout=300)
            deliveries = None
            try:
                for event in stream:
                    if cancel_after is not None and isinstance(event, Step) and event.index >= cancel_after:
                        client.cancel(stream.job_id)
                        cancel_after = None
                watched = list(client.watch(stream.job_id, timeout=60))
                record = client.get(stream.job_id)
                deliveries = record.deliveries
                problems = job_problems(s, stream.events, watched, record)
            except Exception as e:  # a broken stream is the finding, not a crash of the soak
                problems = [f"client error: {e!r}"]
            last = stream.events[-1] if stream.events else None
            outcome = "completed" if isinstance(last, Completed) else \
                f"failed {last.code}" if isinstance(last, Failed) else "none"
            steps = [e.index for e in stream.events if isinstance(e, Step)]
            out.append({"job": stream.job_id, "outcome": outcome, "problems": problems,
                        "terminal": sum(isinstance(e, Completed | Failed) for e in stream.events),
                        "step_twice": len(steps) != len(set(steps)), "deliveries": deliveries})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=20, help="jobs per client")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--models", type=int, default=1, help="model names served (see above; default 1)")
    ap.add_argument("--kill-every", default="2,5", metavar="MIN,MAX", help="seconds between stops (uniform)")
    ap.add_argument("--term-share", type=float, default=0.5, help="share of the stops that are SIGTERM (default 0.5)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--redis", help="Redis URL (default: DIFFLENS_REDIS_URL, else a private server)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.models < 1:
        raise SystemExit(f"--models: got {args.models}; must be >= 1")
    lo, hi = (float(x) for x in args.kill_every.split(","))
    rnd = random.Random(args.seed)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="difflens-soak-") as tmp, \
            redis_url(args.redis or os.environ.get("DIFFLENS_REDIS_URL")) as url:
        from difflens.engine.tiny import make_tiny_model

        models = ["tiny"] if args.models == 1 else [f"tiny{i}" for i in range(args.models)]
        fleet = Fleet(url, make_tiny_model(Path(tmp) / "tiny"), Path(tmp), args.workers, models)
        try:
            stop = threading.Event()
            t0 = time.monotonic()

            def killer() -> None:
                try:
                    while not stop.wait(rnd.uniform(lo, hi)):
                        fleet.stop_one(rnd, args.term_share)
                except Exception as e:  # reported below and in the exit status, not lost with this thread
                    fleet.errors.append(str(e))

            kt = threading.Thread(target=killer, daemon=True)
            kt.start()
            clients = [threading.Thread(target=run_client,
                                        args=(fleet.target, i, args.jobs, args.seed, models, results))
                       for i in range(args.clients)]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            stop.set()
            kt.join()
            seconds = time.monotonic() - t0
        finally:
            fleet.stop()
    outcomes = collections.Counter(r["outcome"] for r in results)
    bad = [r for r in results if r["problems"]]
    for r in bad:
        print(f"PROBLEM job {r['job']}: {'; '.join(r['problems'])}")
    for e in fleet.errors:
        print(f"PROBLEM fleet: {e}")
    summary = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
    print(f"{len(results)} jobs in {seconds:.0f} s, {fleet.kills} workers SIGKILLed, {fleet.terms} SIGTERMed; "
          f"outcomes: {summary}; jobs with a problem: {len(bad)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"jobs": len(results), "seconds": round(seconds, 1), "kills": fleet.kills,
                                    "terms": fleet.terms, "fleet_errors": fleet.errors,
                                    "outcomes": dict(outcomes), "problems": bad, "args": vars(args) | {
                                        "out": str(args.out)}}, indent=2))
    return 1 if bad or fleet.errors else 0


if __name__ == "__main__":
    sys.exit(main())
