"""Shared by the hostile-input tests (test_fuzz, test_injection): a running front to throw requests at, and an exact
account of what it wrote to its queue.

The front is a `difflens serve` process on the tests' Redis with a queue of its own and no worker, so nothing is
ever claimed: every job a request made is still counted in Redis (the enqueue counter, the model's waiting set and
work stream), and a refused request must leave every one of those numbers - and the number of keys in the whole
database, which no other test touches while these run - as it found them.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tests.api.helpers import MODEL
from tests.support.waiting import wait_until

START_TIMEOUT_S = 120.0


def without_keys() -> tuple[str, ...]:
    """The `difflens serve` flags that let anyone call it, for tests and benchmarks aimed past the API-key check (at
    validation, the queue, the workers): --no-auth where this version has it, else none (a front without API keys
    had nothing to turn off)."""
    from difflens.cli import build_parser

    _, unknown = build_parser().parse_known_args(["serve", "--no-auth"])
    return () if unknown else ("--no-auth",)


@dataclass(frozen=True)
class Ledger:
    """What the queue holds, read in one round trip: keys in the database, jobs ever enqueued, jobs waiting, work
    entries."""

    keys: int
    enqueued: int
    waiting: int
    entries: int


class RunningFront:
    """`difflens serve --redis URL --queue Q --model tiny=DIR` as a process; `target` once it listens."""

    def __init__(self, tiny_dir: Path, redis_url: str, queue: str, log: Path) -> None:
        import redis

        self.queue, self.redis_url = queue, redis_url
        self.redis = redis.Redis.from_url(redis_url)
        port_file = log.with_suffix(".port")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("DIFFLENS_REDIS_URL", None)
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "difflens", "serve", "--redis", redis_url, "--queue", queue, "--port", "0",
                 "--port-file", str(port_file), "--model", f"{MODEL}={tiny_dir}", *without_keys()],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        self.log = log
        wait_until(lambda: (port_file.exists() and port_file.read_text().strip()) or self.proc.poll() is not None,
                   START_TIMEOUT_S, 0.1, log.read_text)
        assert self.proc.poll() is None, log.read_text()
        self.target = f"127.0.0.1:{port_file.read_text().strip()}"
        self.channel = grpc.insecure_channel(self.target)

    def ledger(self) -> Ledger:
        pipe = self.redis.pipeline(transaction=False)
        pipe.dbsize()
        pipe.get(f"{self.queue}:enqueued")
        pipe.zcard(f"{self.queue}:waiting:{MODEL}")
        pipe.xlen(f"{self.queue}:work:{MODEL}")
        keys, enqueued, waiting, entries = pipe.execute()
        return Ledger(int(keys), int(enqueued or 0), int(waiting), int(entries))

    def assert_healthy(self) -> None:
        """The process is alive and its health service says SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        assert self.proc.poll() is None, f"the front exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}"
        status = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING, status

    def key_pattern(self) -> re.Pattern[str]:
        """Every key this front's queue may hold (redis_lua.py's layout): request values reach none of them except
        through a job id the front made or a SHA-256 of the caller and idempotency key."""
        q, m = re.escape(self.queue), re.escape(MODEL)
        return re.compile(rf"{q}:(enqueued|dead|(work|waiting|deadlines|workers):{m}|job:[0-9a-f]{{32}}(:events)?|"
                          rf"idem:[0-9a-f]{{64}})")

    def stray_keys(self) -> list[bytes]:
        """This queue's keys that are not of key_pattern()'s forms."""
        pattern = self.key_pattern()
        return [k for k in self.redis.scan_iter(match=f"{self.queue}:*", count=1000)
                if not pattern.fullmatch(k.decode("utf-8", "replace"))]

    def close(self) -> None:
        self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.redis.close()


@contextlib.contextmanager
def running_front(tiny_dir: Path, redis_url: str, queue: str, log: Path) -> Iterator[RunningFront]:
    front = RunningFront(tiny_dir, redis_url, queue, log)
    try:
        yield front
    finally:
        front.close()


class Monitor:
    """Every command the Redis server runs while the block is open (MONITOR, scripts' commands included), as text:
    `commands` once it is left."""

    def __init__(self, redis_url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(redis_url)
        self.commands: list[str] = []
        self._end = f"monitor-end-{os.getpid()}-{id(self)}"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self._client.monitor() as m:
            self._ready.set()
            while True:
                command = m.next_command()["command"]
                if self._end in command:
                    return
                self.commands.append(command)

    def __enter__(self) -> Monitor:
        self._thread.start()
        self._ready.wait(10)
        time.sleep(0.05)  # MONITOR is answered before the server starts feeding it: let it settle
        return self

    def __exit__(self, *exc: Any) -> None:
        self._client.echo(self._end)
        self._thread.join(10)
        self._client.close()
