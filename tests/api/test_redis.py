"""The production shape: fronts on a real Redis queue, workers apart from them (threads, or `difflens worker`
processes for the crash test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from difflens.client import DifflensClient, retry_after_s
from difflens.jobs import Completed, Started, Step
from tests.api.helpers import MODEL, Watchers, job, settings
from tests.support.waiting import wait_until


@pytest.fixture
def redis_settings(tiny_dir, redis_url, queue_name):
    return settings(tiny_dir, redis_url=redis_url, queue_name=queue_name)


@pytest.fixture
def front(redis_settings):
    from difflens.api.server import BackgroundServer

    with BackgroundServer(redis_settings) as srv:
        yield srv


@pytest.fixture
def worker(redis_settings, tiny_model):
    """One worker thread on its own connection to the Redis queue."""
    from difflens.models import ModelRegistry
    from difflens.queue.redis_streams import RedisStreamsQueue
    from difflens.worker import Worker

    queue = RedisStreamsQueue(redis_settings.redis_url, redis_settings)
    w = Worker(redis_settings, queue, ModelRegistry(redis_settings, preloaded={MODEL: tiny_model}), name="thread-w")
    w.start()
    yield w
    w.stop(timeout=60)
    queue.close()


def test_explain_through_redis_and_watch_from_another_front(front, worker, redis_settings):
    from difflens.api.server import BackgroundServer

    with DifflensClient(front.target) as client:
        stream = client.explain(job(steps=3, methods=("rise", "attn")), timeout=120)
        events = list(stream)
    assert [type(e).__name__ for e in events] == ["Queued", "Started", "Step", "Step", "Step", "Completed"]
    assert events[1] == Started("thread-w", 1)
    with BackgroundServer(redis_settings) as other, DifflensClient(other.target) as client2:
        again = list(client2.watch(stream.job_id, timeout=30))
        assert client2.get(stream.job_id).state == "completed"
    assert len(again) == len(events)
    for a, b in zip(again, events, strict=True):
        assert type(a) is type(b)
        if isinstance(a, Step):
            assert a.maps.keys() == b.maps.keys() and [t.token for t in a.tokens] == ["a", "red", "circle"]
    assert again[-1] == events[-1]


def test_full_queue_is_resource_exhausted_with_a_retry_hint(tiny_dir, redis_url, queue_name):
    from difflens.api.server import BackgroundServer

    s = settings(tiny_dir, redis_url=redis_url, queue_name=queue_name, max_queue_depth=2)
    with BackgroundServer(s) as srv, DifflensClient(srv.target) as client:  # no worker: jobs stay queued
        first = client.submit(job(key="a"))
        client.submit(job(key="b"))
        with pytest.raises(grpc.RpcError) as err:
            client.submit(job(key="c"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in err.value.details() and "retry in 1 s" in err.value.details()
        assert retry_after_s(err.value) == 1.0
        assert client.submit(job(key="a")).id == first.id  # an idempotent retry is not refused
        with pytest.raises(grpc.RpcError) as err2:
            list(client.explain(job(key="d")))
        assert err2.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        client.cancel(first.id)
        assert client.submit(job(key="c")).state == "queued"  # room again
        assert srv.server.queue.depth(MODEL) == 2


def _start_worker(tiny_dir, redis_url, queue_name, name, log):
    # heartbeats every second against a 6 s visibility timeout: a live worker slowed by a loaded machine keeps its
    # job (the default 5 s interval left 1 s of slack, and a reclaim of a live job then)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DIFFLENS_VISIBILITY_TIMEOUT_S": "6",
           "DIFFLENS_HEARTBEAT_INTERVAL_S": "1"}
    env.pop("DIFFLENS_REDIS_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "difflens", "worker", "--redis", redis_url, "--queue", queue_name,
         "--model", f"{MODEL}={tiny_dir}", "--name", name, "--max-jobs", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_ready(paths, timeout=600.0):
    wait_until(lambda: all("ready" in p.read_text() for p in paths), timeout, 0.2,
               lambda: "workers ready: " + " | ".join(p.read_text() for p in paths))


def test_a_sigkilled_workers_job_is_finished_by_another_with_one_completed_event(
        tiny_dir, redis_url, queue_name, tmp_path):
    """Two `difflens worker` processes; the one that takes the job is SIGKILLed mid-job; after the visibility
    timeout (6 s) the other reclaims it. The client's single Explain stream sees exactly one Completed."""
    from difflens.api.server import BackgroundServer

    s = settings(tiny_dir, redis_url=redis_url, queue_name=queue_name, visibility_timeout_s=6.0)
    logs = {n: tmp_path / f"{n}.log" for n in ("w1", "w2")}
    procs = {n: _start_worker(tiny_dir, redis_url, queue_name, n, logs[n].open("w")) for n in logs}
    try:
        _wait_ready(logs.values())
        with BackgroundServer(s) as srv, DifflensClient(srv.target) as client:
            stream = client.explain(job(steps=30, masks=64, batch=8), timeout=600)  # a loaded machine is slow
            killed = ""
            for event in stream:
                if isinstance(event, Started) and not killed:
                    killed = event.worker
                if isinstance(event, Step) and event.index == 1 and procs[killed].poll() is None:
                    procs[killed].send_signal(signal.SIGKILL)
            events = stream.events
            record = client.get(stream.job_id)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    assert procs[killed].returncode == -signal.SIGKILL
    starts = [e for e in events if isinstance(e, Started)]
    survivor = ({"w1", "w2"} - {killed}).pop()
    assert [(e.worker, e.attempt) for e in starts] == [(killed, 1), (survivor, 2)]
    assert sum(isinstance(e, Completed) for e in events) == 1 and isinstance(events[-1], Completed)
    indices = [e.index for e in events if isinstance(e, Step)]
    assert sorted(indices) == list(range(30))  # each step once: the survivor does not re-send what was seen
    assert record.state == "completed" and record.deliveries == 2 and record.worker == survivor


def _serve(tiny_dir, redis_url: str, queue_name: str, port: int, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "difflens", "serve", "--redis", redis_url, "--queue", queue_name,
                             "--port", str(port), "--model", f"{MODEL}={tiny_dir}", "--no-auth"], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_an_explain_stream_rides_out_its_front_killed_and_restarted(worker, tiny_dir, redis_url, queue_name,
                                                                    tmp_path):
    """The front serving a stream is SIGKILLed mid-job and started again on the same address 2 s later (longer than
    the unary retries' 1.4 s; the torch-free front itself starts in about a second). The client's one Explain stream
    resumes with WatchJob once it is up and sees every step once and one Completed; the job went on in the worker
    meanwhile."""
    from tests.api.helpers import free_port

    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    procs = [_serve(tiny_dir, redis_url, queue_name, port, log)]
    try:
        with DifflensClient(f"127.0.0.1:{port}", retries=50, backoff_s=0.2) as client:
            client.list_models(timeout=60)  # up (the unary retries wait for the first start)
            client.retries = 3
            stream = client.explain(job(steps=16, masks=32, batch=8), timeout=600)  # a loaded machine is slow
            breaks: list[grpc.RpcError] = []
            stream.on_break = breaks.append
            down_at, resumed_after = 0.0, 0.0
            for event in stream:
                if down_at and not resumed_after:
                    resumed_after = time.monotonic() - down_at
                if isinstance(event, Step) and len(procs) == 1:
                    procs[0].send_signal(signal.SIGKILL)
                    procs[0].wait(10)
                    down_at = time.monotonic()
                    time.sleep(2.0)  # a restart that takes a while (a pod rescheduled, an image pulled)
                    procs.append(_serve(tiny_dir, redis_url, queue_name, port, log))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        log.close()
    events = stream.events
    assert resumed_after > 1.5, "the restart was quicker than the unary retries: the test shows nothing"
    assert sorted(e.index for e in events if isinstance(e, Step)) == list(range(16))
    assert sum(isinstance(e, Completed) for e in events) == 1 and isinstance(events[-1], Completed)
    assert sum(isinstance(e, Started) for e in events) == 1  # the worker was never disturbed
    assert [e.code() for e in breaks] == [grpc.StatusCode.UNAVAILABLE]  # told once, however many attempts


def test_a_broken_stream_waits_for_a_slot_on_a_restarted_front_at_its_limit(tiny_dir, redis_url, queue_name,
                                                                             tmp_path, monkeypatch):
    """When a front goes, its clients resume on the fronts left, which may be at max_streams: the stream ended
    there with RESOURCE_EXHAUSTED though the job went on. It now waits as retry-after-s says, and resumes."""
    import threading

    from difflens import client as client_module
    from difflens.api.server import BackgroundServer
    from difflens.jobs import Failed
    from tests.api.helpers import Watchers, free_port

    monkeypatch.setattr(client_module, "MAX_RESUME_BACKOFF_S", 4.0)  # the first resume after 4 s: the slot is taken
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    front = _serve(tiny_dir, redis_url, queue_name, port, log)
    got: list = []
    try:
        with DifflensClient(f"127.0.0.1:{port}", retries=50, backoff_s=4.0) as client:
            client.list_models(timeout=60)
            job_id = client.submit(job(steps=2)).id  # no worker: it stays queued
            stream = client.watch(job_id, timeout=60)
            breaks: list = []
            stream.on_break = breaks.append
            follower = threading.Thread(target=lambda: got.extend(stream))
            follower.start()
            wait_until(lambda: stream.events, 60, 0.05, "the stream's first event")
            front.send_signal(signal.SIGKILL)
            front.wait(10)
            s = settings(tiny_dir, redis_url=redis_url, queue_name=queue_name, port=port, max_streams=1)
            with BackgroundServer(s) as again, DifflensClient(again.target) as other:
                holder = Watchers(other, job_id, 1, timeout_s=6.0)  # the only slot, until its deadline
                assert holder.join() == ["DEADLINE_EXCEEDED"]
                # the follower's wait for the slot ended: it resumed
                wait_until(lambda: again.server.front._streams or not follower.is_alive(), 60, 0.05)
                assert follower.is_alive()
                other.cancel(job_id)
                follower.join(30)
    finally:
        if front.poll() is None:
            front.kill()
        log.close()
    assert got and isinstance(got[-1], Failed) and got[-1].code == "CANCELLED"
    assert [e.code() for e in breaks] == [grpc.StatusCode.UNAVAILABLE]  # told once


def test_a_front_answers_at_once_after_redis_restarts(tiny_dir):
    """Every connection the front's pool held before a Redis restart is dead after it: each used to fail one later
    call with UNAVAILABLE, long after Redis was back."""
    import threading

    import redis

    from difflens.api.server import BackgroundServer
    from tests.support.redis_server import PrivateRedis

    with PrivateRedis() as server:
        with BackgroundServer(settings(tiny_dir, redis_url=server.url, queue_name="restart")) as front, \
                DifflensClient(front.target, retries=0) as client:
            job_id = client.submit(job(steps=2)).id

            def burst() -> list[str]:  # concurrent calls: the pool holds as many connections
                out: list[str] = []

                def one() -> None:
                    try:
                        client.get(job_id)
                        out.append("ok")
                    except grpc.RpcError as e:
                        out.append(e.code().name)

                threads = [threading.Thread(target=one) for _ in range(8)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return out

            assert burst() == ["ok"] * 8
            redis.Redis.from_url(server.url).shutdown(save=True)  # data kept: a restart, not a loss
            assert server._proc is not None
            server._proc.wait(10)
            server._proc = None
            server.start()
            assert burst() == ["ok"] * 8


def test_a_front_follows_more_streams_at_once_than_redis_py_s_default_pool_holds(front):
    """Each followed stream holds a Redis connection during its blocking read. redis-py's default asyncio pool has
    100 and failed the 101st call at once: the extra streams ended UNAVAILABLE "the job queue cannot be reached"."""
    with DifflensClient(front.target) as client:
        job_id = client.submit(job(steps=2)).id  # no worker: it stays queued, every watcher waits on it
        assert Watchers(client, job_id, 120, timeout_s=3.0).join() == ["DEADLINE_EXCEEDED"] * 120


@pytest.mark.parametrize("call", ["get", "cancel", "watch"])
def test_an_id_naming_another_key_of_a_job_is_not_found(front, call):
    """Keys are built from the id: '<job id>:events' named the job's event stream, and the call failed INTERNAL
    (WRONGTYPE) instead of NOT_FOUND."""
    with DifflensClient(front.target) as client:
        job_id = client.submit(job(steps=2)).id
        with pytest.raises(grpc.RpcError) as err:
            result = getattr(client, call)(job_id + ":events")
            list(result) if call == "watch" else None
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert client.get(job_id).state == "queued"


def test_the_enqueue_script_run_twice_with_one_job_id_makes_one_job(redis_url, queue_name):
    """What the front's one retry on a dead connection relies on: a retried enqueue (same job id) is a no-op."""
    from difflens.queue.redis_scripts import Enqueued
    from difflens.queue.redis_streams import RedisStreamsQueue

    q = RedisStreamsQueue(redis_url, settings("unused", redis_url=redis_url, queue_name=queue_name))
    try:
        spec = job(steps=2)
        call = q._enqueue_call(spec, "fixed-id", time.time())
        assert call.run(q._enqueue).outcome == "new"
        assert call.run(q._enqueue) == Enqueued("existing", job_id="fixed-id")
        assert q.depth(MODEL) == 1 and len(q.events("fixed-id")) == 1
    finally:
        q.close()


def test_a_redis_out_of_memory_is_resource_exhausted_with_a_retry_hint_not_internal(tiny_dir):
    import redis

    from difflens.api.server import BackgroundServer
    from tests.support.redis_server import PrivateRedis

    with PrivateRedis() as server, BackgroundServer(settings(tiny_dir, redis_url=server.url,
                                                             queue_name="oom")) as front, \
            DifflensClient(front.target, retries=0) as client:
        r = redis.Redis.from_url(server.url)
        r.config_set("maxmemory", 1)  # every write refused (noeviction)
        try:
            with pytest.raises(grpc.RpcError) as err:
                client.submit(job(steps=2))
        finally:
            r.config_set("maxmemory", 0)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the job queue's storage (Redis) is full; retry later" in err.value.details()
        assert retry_after_s(err.value) is not None
        assert client.submit(job(steps=2)).state == "queued"  # and it works again once there is room


def test_explain_server_says_the_queue_lost_the_job_when_redis_comes_back_empty(tiny_dir, tmp_path, capsys):
    import threading

    from difflens.api.server import BackgroundServer
    from difflens.cli import main
    from tests.support.redis_server import PrivateRedis

    with PrivateRedis() as server, BackgroundServer(settings(tiny_dir, redis_url=server.url,
                                                             queue_name="lost")) as front:
        result: list[int] = []
        cli = threading.Thread(target=lambda: result.append(main(
            ["explain", "--server", front.target, MODEL, "a red circle", "--steps", "2", "--out",
             str(tmp_path / "out")])))
        cli.start()  # no worker: the job waits, queued
        wait_until(lambda: front.server.queue.depth(MODEL), 120, 0.05, "the job queued")
        server.stop()  # no persistence: the job's records are gone when it starts again
        server.start()
        cli.join(120)
    assert result == [1]
    err = capsys.readouterr().err
    assert "NOT_FOUND" in err and "the queue no longer has it" in err and "may still be" not in err, err
