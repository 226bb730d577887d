from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from difflens.config import ServiceSettings
from difflens.engine.options import GenerationParams
from difflens.jobs import JobSpec
from difflens.queue.base import JobQueue
from difflens.queue.memory import InProcessQueue
from difflens.queue.redis_streams import RedisStreamsQueue

# Short enough that reclaim tests take a fraction of a second, long enough for a loaded CPU to heartbeat in time.
FAST = {"visibility_timeout_s": 0.3, "heartbeat_interval_s": 0.1, "max_deliveries": 2}


@dataclass
class Backend:
    """Makes queues of one implementation; `replica` is another handle on the same queue (another front)."""

    kind: str
    name: str
    url: str | None = None
    made: list[JobQueue] = field(default_factory=list)

    def queue(self, **overrides: object) -> JobQueue:
        settings = replace(ServiceSettings(queue_name=self.name, **FAST), **overrides)  # type: ignore[arg-type]
        return self._make(settings)

    def replica(self, q: JobQueue) -> JobQueue:
        if self.url is None:
            return q  # one process, one queue object: every "front" shares it
        return self._make(q.settings)  # type: ignore[attr-defined]

    def _make(self, settings: ServiceSettings) -> JobQueue:
        q: Any = InProcessQueue(settings) if self.url is None else RedisStreamsQueue(self.url, settings)
        if self.kind == "redis-async":
            q = AsyncFrontQueue(q)
        self.made.append(q)
        return q


class AsyncFrontQueue:
    """A RedisStreamsQueue whose front calls (enqueue, get, events) go through its asyncio front on a private
    event loop, so the contract tests hold that path to the same semantics; the rest is the queue's own."""

    def __init__(self, queue: RedisStreamsQueue) -> None:
        self._queue = queue
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> Any:  # on the loop that will use it
            return queue.async_front(streams=8)

        self._front = self._call(make())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def enqueue(self, spec: JobSpec, max_in_flight: int = 0) -> Any:
        return self._call(self._front.enqueue(spec, max_in_flight))

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> Any:
        return self._call(self._front.take_token(bucket, rate_per_s, burst))

    def get(self, job_id: str) -> Any:
        return self._call(self._front.get(job_id))

    def events(self, job_id: str, after: int = -1, block_s: float = 0.0, live: bool = False) -> Any:
        return self._call(self._front.events(job_id, after, block_s, live))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    def close(self) -> None:
        self._call(self._front.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self._queue.close()


# The implementations the contract tests run on; make test-fast names the Redis queue alone (TEST_QUEUE_BACKENDS=redis)
BACKENDS = os.environ.get("TEST_QUEUE_BACKENDS", "memory,redis,redis-async").split(",")


@pytest.fixture(params=BACKENDS)
def backend(request, queue_name) -> Iterator[Backend]:
    url = request.getfixturevalue("redis_url") if request.param.startswith("redis") else None
    b = Backend(request.param, queue_name, url)
    yield b
    for q in b.made:
        q.close()


MODEL = "default"
MODELS = (MODEL,)  # what the workers of these tests serve


def spec(prompt: str = "a red circle", model: str = MODEL, **kw: object) -> JobSpec:
    return JobSpec(model, GenerationParams(prompt), **kw)  # type: ignore[arg-type]


def expired(q: Any, job_id: str) -> bool:
    """Whether `q` no longer knows job `job_id` (its records expired): a condition for tests/support/waiting."""
    from difflens.queue.base import JobNotFound

    try:
        q.get(job_id)
    except JobNotFound:
        return True
    return False
