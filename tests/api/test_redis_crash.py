"""A Redis whose host crashes mid-job: the last writes it acknowledged were not yet on disk (appendfsync everysec)
and it comes back without them, while a client streams the job through a real front and a worker runs it. What a
client sees must not change: each step once, in order, and one terminal event (docs/security.md, "Faults").

The loss is made exact: the worker's queue takes a mark of Redis' append-only file after one step's publish and
holds the worker after a later one; the client receives that later step; Redis is SIGKILLed and its file cut back to
the mark (what a host crash leaves of it) before it starts again."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from difflens.client import DifflensClient
from difflens.jobs import Completed, Failed, Started, Step
from difflens.queue.redis_streams import RedisStreamsQueue
from tests.api.helpers import MODEL, job, settings
from tests.support.redis_server import PrivateRedis
from tests.support.waiting import wait_until

STEPS, MARK_AFTER, HOLD_AFTER = 8, 1, 3  # steps 2 and 3 are acknowledged, received by the client, then lost


class GatedQueue(RedisStreamsQueue):
    """The worker's queue: marks Redis' file after step MARK_AFTER's publish and holds the worker's publisher after
    step HOLD_AFTER's until `release`. With `dies` set at release, every later call fails: a worker gone without a
    word (its heartbeats stop; another worker reclaims its job after the visibility timeout)."""

    def __init__(self, server: PrivateRedis, *args: Any) -> None:
        super().__init__(*args)
        self.server = server
        self.mark: dict | None = None
        self.holding, self.release, self.dead = threading.Event(), threading.Event(), threading.Event()

    def publish(self, claim: Any, event: Any) -> Any:
        self._alive()
        result = super().publish(claim, event)
        if isinstance(event, Step) and event.index == MARK_AFTER:
            self.mark = self.server.aof_mark()
        if isinstance(event, Step) and event.index == HOLD_AFTER:
            self.holding.set()
            self.release.wait(60)
        return result

    def _alive(self) -> None:
        if self.dead.is_set():
            raise RuntimeError("this worker is gone")

    def heartbeat(self, claim: Any) -> bool:
        self._alive()
        return super().heartbeat(claim)

    def finish(self, claim: Any, event: Any) -> bool:
        self._alive()
        return super().finish(claim, event)

    def claim_ahead(self, *args: Any, **kw: Any) -> Any:
        self._alive()
        return super().claim_ahead(*args, **kw)


@pytest.fixture
def crashing(tiny_dir, tiny_model, queue_name, request):
    """(settings, server, front, gated worker queue, start_worker(queue, name)) on a Redis of the test's own that
    keeps an append-only file. The visibility timeout: request.param seconds (indirect parametrization), else 30
    (longer than a crash and restart on a loaded machine: the holder's own reclaim scan would otherwise take its
    job back while its heartbeats were lost with the rest)."""
    from difflens.api.server import BackgroundServer
    from difflens.models import ModelRegistry
    from difflens.worker import Worker

    workers: list[Worker] = []
    with PrivateRedis(appendonly=True) as server:
        s = settings(tiny_dir, redis_url=server.url, queue_name=queue_name,
                     visibility_timeout_s=getattr(request, "param", 30.0))
        gated = GatedQueue(server, server.url, s)

        def start_worker(queue: RedisStreamsQueue, name: str) -> None:
            w = Worker(s, queue, ModelRegistry(s, preloaded={MODEL: tiny_model}), name=name)
            w.start()
            workers.append(w)

        try:
            with BackgroundServer(s) as front:
                yield s, server, front, gated, start_worker
        finally:
            gated.release.set()
            for w in workers:
                w.stop(timeout=60)
            gated.close()


def stream_job(front: Any) -> tuple[DifflensClient, Any, threading.Thread]:
    client = DifflensClient(front.target, retries=10)
    stream = client.explain(job(steps=STEPS, masks=4, batch=4), timeout=120)
    follower = threading.Thread(target=lambda: list(stream), daemon=True)
    follower.start()
    return client, stream, follower


def crash_when_the_client_has_step(server: PrivateRedis, gated: GatedQueue, stream: Any, index: int) -> None:
    assert gated.holding.wait(60), "the worker never reached the step to hold at"
    wait_until(lambda: any(isinstance(e, Step) and e.index == index for e in stream.events), 120, 0.02,
               "the client received the step")
    assert gated.mark is not None
    server.kill(lose_after=gated.mark)
    server.start()


def steps_of(events: list) -> list[int]:
    return [e.index for e in events if isinstance(e, Step)]


def test_the_worker_writes_again_what_redis_lost_and_the_client_sees_each_step_once(crashing):
    from bench.soak import job_problems

    s, server, front, gated, start_worker = crashing
    start_worker(gated, "w1")
    client, stream, follower = stream_job(front)
    with client:
        crash_when_the_client_has_step(server, gated, stream, HOLD_AFTER)
        probe = RedisStreamsQueue(server.url, s)
        try:  # the loss is real: steps 2 and 3 are gone
            assert steps_of([e for _, e in probe.events(stream.job_id)]) == [0, 1]
        finally:
            probe.close()
        gated.release.set()
        follower.join(120)
        watched = list(client.watch(stream.job_id, timeout=30))
        problems = job_problems(job(steps=STEPS), stream.events, watched, client.get(stream.job_id))
    assert problems == []  # one terminal event, every step once and in order, WatchJob replays the same stream
    assert steps_of(stream.events) == list(range(STEPS)) and isinstance(stream.events[-1], Completed)
    assert [e.worker for e in stream.events if isinstance(e, Started)] == ["w1"]  # no second delivery was needed


@pytest.mark.parametrize("crashing", [5.0], indirect=True)
def test_when_the_worker_went_down_with_redis_another_finishes_and_the_client_sees_each_step_once(crashing):
    """The holder is gone too (a node lost with Redis on it): the job is reclaimed after the visibility timeout by a
    worker that publishes the steps missing from the stream, 2 and 3 among them, after its Started. The client had
    them already; its resumed stream skips them."""
    s, server, front, gated, start_worker = crashing
    start_worker(gated, "w1")
    client, stream, follower = stream_job(front)
    with client:
        crash_when_the_client_has_step(server, gated, stream, HOLD_AFTER)
        gated.dead.set()
        gated.release.set()
        start_worker(RedisStreamsQueue(server.url, s), "w2")
        follower.join(120)
        watched = list(client.watch(stream.job_id, timeout=30))
        record = client.get(stream.job_id)
    assert steps_of(stream.events) == list(range(STEPS))  # each once, in order
    assert [type(e) for e in stream.events if isinstance(e, Completed | Failed)] == [Completed]
    assert isinstance(stream.events[-1], Completed)
    assert [(e.worker, e.attempt) for e in watched if isinstance(e, Started)] == [("w1", 1), ("w2", 2)]
    assert steps_of(watched) == list(range(STEPS))  # the job's record lacks none of the lost steps
    assert record.state == "completed" and record.deliveries == 2
