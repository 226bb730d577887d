"""Redis full (maxmemory reached, noeviction) and Redis slow (bench.latency_proxy between it and the service), with a
real front, a real worker and a private redis-server: clean errors, every call ended by its deadline, and the same
processes back to normal once memory is freed or the delay is gone (docs/security.md, "Faults")."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis

from bench.latency_proxy import LatencyProxy
from difflens.client import DifflensClient, retry_after_s
from difflens.jobs import Completed, Step
from tests.api.helpers import MODEL, job, settings
from tests.support.redis_server import PrivateRedis
from tests.support.waiting import wait_until


@pytest.fixture
def service(tiny_dir, tiny_model, queue_name) -> Iterator[Any]:
    """A callable service(url) -> (front, worker) on that Redis URL, both stopped at the end."""
    from difflens.api.server import BackgroundServer
    from difflens.models import ModelRegistry
    from difflens.queue.redis_streams import RedisStreamsQueue
    from difflens.worker import Worker

    stack: list[Any] = []

    def start(url: str) -> tuple[Any, Any]:
        s = settings(tiny_dir, redis_url=url, queue_name=queue_name)
        front = BackgroundServer(s)
        front.__enter__()
        stack.append(front)
        queue = RedisStreamsQueue(url, s)
        worker = Worker(s, queue, ModelRegistry(s, preloaded={MODEL: tiny_model}), name="w")
        worker.start()
        stack.append((worker, queue))
        return front, worker

    yield start
    for item in reversed(stack):
        if isinstance(item, tuple):
            item[0].stop(timeout=60)
            item[1].close()
        else:
            item.__exit__(None, None, None)


def timed(call: Any) -> tuple[Any, float]:
    """call()'s result, or the grpc.RpcError it raised, and how long it took."""
    t0 = time.monotonic()
    try:
        result = call()
    except grpc.RpcError as e:
        result = e
    return result, time.monotonic() - t0


def completes(client: DifflensClient, steps: int = 3, timeout: float = 120) -> list:
    events = list(client.explain(job(steps=steps), timeout=timeout))
    assert isinstance(events[-1], Completed), events[-1]
    return events


def test_a_full_redis_refuses_new_jobs_with_a_retry_hint_serves_reads_and_recovers_when_freed(service):
    with PrivateRedis() as server:
        front, _ = service(server.url)
        r = redis.Redis.from_url(server.url)
        with DifflensClient(front.target, retries=0) as client:
            done = client.explain(job(steps=2), timeout=120)
            before = list(done)
            r.config_set("maxmemory", 1)  # full: every write refused (noeviction, the default policy)
            try:
                submitted, submit_s = timed(lambda: client.submit(job(steps=2), timeout=10))
                explained, explain_s = timed(lambda: list(client.explain(job(steps=2), timeout=10)))
                record = client.get(done.job_id)  # reads go on
                replay = list(client.watch(done.job_id, timeout=10))
            finally:
                r.config_set("maxmemory", 0)  # memory freed
            for err, seconds in ((submitted, submit_s), (explained, explain_s)):
                assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                assert "the job queue's storage (Redis) is full; retry later" in err.details()
                assert retry_after_s(err) == 1.0 and seconds < 5  # at once, not at the deadline
            assert record.state == "completed" and len(replay) == len(before)
            completes(client)  # the same front and worker, nothing restarted
        r.close()


def test_a_job_running_when_redis_fills_up_completes_once_memory_is_freed(service, caplog):
    """Redis fills up between two steps of a running job: the worker's next write is refused, and retried as through
    a blip for up to the visibility timeout; memory freed within it, the job goes on. Its client sees each step once
    and one terminal event, and nothing was restarted."""
    caplog.set_level(logging.WARNING, logger="difflens.queue.common")
    with PrivateRedis() as server:
        front, _ = service(server.url)
        r = redis.Redis.from_url(server.url)
        with DifflensClient(front.target) as client:
            stream = client.explain(job(steps=8, masks=16, batch=4), timeout=120)
            for event in stream:
                if isinstance(event, Step) and event.index == 2:
                    r.config_set("maxmemory", 1)
                    wait_until(lambda: any("maxmemory" in rec.getMessage() for rec in caplog.records), 120, 0.05,
                               "the worker's next write refused")
                    r.config_set("maxmemory", 0)
            events = stream.events
        r.close()
    assert [e.index for e in events if isinstance(e, Step)] == list(range(8))
    assert isinstance(events[-1], Completed) and sum(isinstance(e, Completed) for e in events) == 1


def test_a_slow_redis_ends_calls_at_their_deadlines_and_the_service_is_back_when_it_is_fast(service):
    """Every Redis round trip takes 2 s (bench.latency_proxy, 1 s each way) for a while: calls end by their deadline
    with DEADLINE_EXCEEDED, none hangs; with the delay gone the same front and worker serve as before."""
    with PrivateRedis() as server, LatencyProxy(("127.0.0.1", server.port)) as proxy:
        front, _ = service(f"redis://127.0.0.1:{proxy.port}/0")
        with DifflensClient(front.target, retries=0) as client:
            first = client.explain(job(steps=2), timeout=120)
            assert isinstance(list(first)[-1], Completed)
            proxy.delay_s = 1.0
            results = {
                "submit": timed(lambda: client.submit(job(steps=2), timeout=1.0)),
                "get": timed(lambda: client.get(first.job_id, timeout=1.0)),
                "explain": timed(lambda: list(client.explain(job(steps=2), timeout=2.0))),
            }
            proxy.delay_s = 0.0
            for name, (err, seconds) in results.items():
                assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (name, err)
                assert seconds < {"submit": 1.0, "get": 1.0, "explain": 2.0}[name] + 0.5, (name, seconds)
            completes(client)
