from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

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
        q: JobQueue = InProcessQueue(settings) if self.url is None else RedisStreamsQueue(self.url, settings)
        self.made.append(q)
        return q

    def replica(self, q: JobQueue) -> JobQueue:
        if self.url is None:
            return q  # one process, one queue object: every "front" shares it
        other = RedisStreamsQueue(self.url, q.settings)  # type: ignore[attr-defined]
        self.made.append(other)
        return other


@pytest.fixture(params=["memory", "redis"])
def backend(request, queue_name) -> Iterator[Backend]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    b = Backend(request.param, queue_name, url)
    yield b
    for q in b.made:
        q.close()


def spec(prompt: str = "a red circle", **kw: object) -> JobSpec:
    return JobSpec("default", GenerationParams(prompt), **kw)  # type: ignore[arg-type]
