"""The front's follow loop against a queue whose blocking reads always come back empty (as a Redis XREAD BLOCK
does when it times out just before the job's terminal event lands): the stream must still end with that event."""

from __future__ import annotations

import threading
import time

import pytest

from difflens.api.pb import pb
from difflens.client import DifflensClient
from difflens.jobs import Completed, Step
from difflens.queue.memory import InProcessQueue
from tests.api.helpers import MODEL, job, settings
from tests.support.waiting import wait_until


class EmptyWaitsQueue(InProcessQueue):
    def events(self, job_id, after=-1, block_s=0.0):
        if block_s > 0:
            time.sleep(0.01)
            self.get(job_id)  # unknown ids still raise
            return []
        return super().events(job_id, after, 0.0)


def test_a_stream_ends_with_the_terminal_event_even_when_every_wait_times_out(tiny_dir, tiny_model):
    from difflens.api.server import BackgroundServer
    from difflens.models import ModelRegistry

    s = settings(tiny_dir)
    registry = ModelRegistry(s, preloaded={MODEL: tiny_model})
    with BackgroundServer(s, queue=EmptyWaitsQueue(s), run_worker=True, registry=registry) as srv, \
            DifflensClient(srv.target) as client:
        stream = client.explain(job(steps=2), timeout=60)
        events = list(stream)
    assert isinstance(events[-1], Completed)
    assert [e.index for e in events if isinstance(e, Step)] == [0, 1]


class SlowEnqueueQueue(InProcessQueue):
    """An enqueue that takes a while (a Redis round trip under load, or a paused Redis): `entered` is set once a
    call is inside it, which returns when `release` is set."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.entered, self.release = threading.Event(), threading.Event()

    def enqueue(self, spec, max_in_flight=0):
        self.entered.set()
        self.release.wait(60)
        return super().enqueue(spec, max_in_flight)


def test_drain_waits_for_an_explain_whose_enqueue_is_in_flight(tiny_dir, tiny_model):
    """A drain that starts while an Explain's job is being queued must let that stream finish: the job exists
    once the enqueue returns, and its caller is owed its events (before, drain saw no stream and cut it)."""
    import threading

    from difflens.api.server import BackgroundServer
    from difflens.models import ModelRegistry

    s = settings(tiny_dir)
    registry = ModelRegistry(s, preloaded={MODEL: tiny_model})
    queue = SlowEnqueueQueue(s)
    srv = BackgroundServer(s, queue=queue, run_worker=True, registry=registry).start()
    got: list = []
    try:
        with DifflensClient(srv.target) as client:
            def call() -> None:
                try:
                    got.extend(client.explain(job(steps=40, masks=16), timeout=600))  # runs > STOP_GRACE_S
                except Exception as e:  # noqa: BLE001 - recorded for the assertion
                    got.append(e)
            caller = threading.Thread(target=call)
            caller.start()
            assert queue.entered.wait(120)  # the call is inside the enqueue, which returns 1 s into the drain
            threading.Timer(1.0, queue.release.set).start()
            t0 = time.monotonic()
            srv.stop(grace_s=300)  # a grace a loaded machine's 40 steps fit in
            caller.join(300)
    finally:
        if srv.server is not None:
            srv.stop()
    assert got and isinstance(got[-1], Completed), got[-1:]
    assert time.monotonic() - t0 < 300


def test_a_queued_job_whose_deadline_passes_fails_while_no_worker_serves_its_model(tiny_dir):
    """The front's sampler ends it (once a second): the caller watching it sees DEADLINE_EXCEEDED, not a job
    queued for ever."""
    from difflens.api.server import BackgroundServer
    from difflens.jobs import Failed

    s = settings(tiny_dir)
    with BackgroundServer(s) as srv, DifflensClient(srv.target) as client:
        record = client.submit(job(steps=2), timeout_s=0.5)
        events = list(client.watch(record.id, timeout=30))
        assert isinstance(events[-1], Failed) and events[-1].code == "DEADLINE_EXCEEDED"
        assert srv.server.queue.depth(MODEL) == 0


@pytest.mark.parametrize("registered", [True, False], ids=["held", "not-yet-held"])
def test_an_embedded_drain_past_its_grace_fails_the_worker_s_jobs_as_the_server_shutting_down(tiny_dir, tiny_model,
                                                                                             registered):
    """serve --embedded: the in-process queue goes with the process, so once the grace is over (or no stream
    follows a job) a job nobody can receive any more stops at its next step instead of running to its end first
    (before, a 2 s grace still waited minutes for the job). not-yet-held: the job thread registers a claimed job a
    moment after the claim, so the drain may not see it among held() - it must fail all the same (a fresh-clone
    run once found it handed back instead)."""
    import threading

    from difflens.api.server import BackgroundServer
    from difflens.models import ModelRegistry

    s = settings(tiny_dir)
    registry = ModelRegistry(s, preloaded={MODEL: tiny_model})
    srv = BackgroundServer(s, run_worker=True, registry=registry).start()
    queue = srv.server.queue
    with DifflensClient(srv.target) as client:
        record = client.submit(job(steps=200, masks=64))

        def watch() -> None:
            try:
                list(client.watch(record.id, timeout=120))
            except Exception:  # noqa: BLE001 - the server goes away under it: expected
                pass

        threading.Thread(target=watch, daemon=True).start()
        wait_until(lambda: queue.get(record.id).state == "running", 120, 0.05, "the job running")
        if not registered:
            srv.server.worker.held = lambda: []  # type: ignore[method-assign]
        t0 = time.monotonic()
        srv.stop(grace_s=0.5)
        stopped_in = time.monotonic() - t0
    rec = queue.get(record.id)
    assert rec.state == "failed" and rec.error.startswith("UNAVAILABLE: the server shut down"), rec  # not "caller"
    assert stopped_in < 15, stopped_in


def test_an_embedded_drain_sends_the_shutdown_failure_even_when_the_step_outlasts_the_servers_stop(tiny_dir, tiny_model,
                                                                                                monkeypatch):
    """The Failed event came only at the job's next step. A step longer than the server's last second meant the
    streams were cut first: the client saw a transport UNAVAILABLE, resumed against a closed port for 30 s and
    then said the job 'may still be running', from a queue that was gone. Queued jobs fail alike."""
    import threading

    from difflens.api.server import BackgroundServer
    from difflens.jobs import Failed, Started
    from difflens.models import ModelRegistry
    from difflens.worker import job as job_module

    check = job_module.JobRun._check

    def slow_check(self, index):  # a big model's step
        if index >= 1:
            time.sleep(4)
        check(self, index)

    monkeypatch.setattr(job_module.JobRun, "_check", slow_check)
    s = settings(tiny_dir, worker_max_jobs=1)
    srv = BackgroundServer(s, run_worker=True, registry=ModelRegistry(s, preloaded={MODEL: tiny_model})).start()
    queue = srv.server.queue
    with DifflensClient(srv.target, resume_for_s=2) as client:
        stream = client.explain(job(steps=4, masks=4), timeout=60)
        events = iter(stream)
        assert any(isinstance(e, Started) for e in events)
        queued = client.submit(job(steps=4, masks=4, seed=1))  # waits behind it (one job at a time)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace_s": 0.2})
        stopper.start()
        rest = list(events)
        stopper.join(60)
    assert isinstance(rest[-1], Failed) and rest[-1].code == "UNAVAILABLE", rest[-1:]
    assert rest[-1].message.startswith("the server shut down before the job finished")
    assert queue.get(queued.id).error.startswith("UNAVAILABLE: the server shut down")


def _wait_for_streams(srv, n: int) -> None:
    wait_until(lambda: srv.server.front._streams >= n, 60, 0.02,
               lambda: f"{srv.server.front._streams} streams open, expected {n}")


def test_streams_past_max_streams_are_refused_and_a_refused_explain_queues_nothing(tiny_dir):
    import grpc

    from difflens.api.server import BackgroundServer
    from difflens.client import retry_after_s
    from tests.api.helpers import Watchers

    with BackgroundServer(settings(tiny_dir, max_streams=2)) as srv, DifflensClient(srv.target, retries=0) as client:
        job_id = client.submit(job(steps=2)).id  # no worker: it stays queued
        watchers = Watchers(client, job_id, 2, timeout_s=3.0)
        _wait_for_streams(srv, 2)
        with pytest.raises(grpc.RpcError) as err:  # raw: the client would wait for a slot (a known job's stream)
            list(client.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams=2" in err.value.details() and retry_after_s(err.value) == 1.0
        with pytest.raises(grpc.RpcError) as err:
            list(client.explain(job(steps=2), timeout=10))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert srv.server.queue.depth(MODEL) == 1  # the refused Explain queued nothing
        assert watchers.join() == ["DEADLINE_EXCEEDED"] * 2
        _wait_for_streams(srv, 0)
        assert Watchers(client, job_id, 2, timeout_s=1.0).join() == ["DEADLINE_EXCEEDED"] * 2  # slots free again


def test_a_watch_refused_by_a_front_at_its_limit_on_its_first_call_says_so_at_once(tiny_dir):
    """Only a stream that broke waits for a slot: a first call reports RESOURCE_EXHAUSTED, as Explain does (it was
    taken for a resume and retried for up to resume_for_s)."""
    import grpc

    from difflens.api.server import BackgroundServer
    from tests.api.helpers import Watchers

    with BackgroundServer(settings(tiny_dir, max_streams=1)) as srv, DifflensClient(srv.target) as client:
        job_id = client.submit(job(steps=2)).id
        holder = Watchers(client, job_id, 1, timeout_s=3.0)
        _wait_for_streams(srv, 1)
        with pytest.raises(grpc.RpcError) as err:
            list(client.watch(job_id, timeout=20))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert holder.join() == ["DEADLINE_EXCEEDED"]


def test_a_draining_front_at_its_limit_says_unavailable_and_an_unknown_id_not_found(tiny_dir):
    """The limit was checked first: a draining front at it answered RESOURCE_EXHAUSTED, which clients do not
    retry elsewhere (UNAVAILABLE sends them to another replica), and a bad id got it instead of NOT_FOUND."""
    import grpc

    from difflens.api.server import BackgroundServer
    from tests.api.helpers import Watchers

    with BackgroundServer(settings(tiny_dir, max_streams=1)) as srv, DifflensClient(srv.target, retries=0) as client:
        job_id = client.submit(job(steps=2)).id
        holder = Watchers(client, job_id, 1, timeout_s=3.0)
        _wait_for_streams(srv, 1)
        def watch(job_id: str) -> grpc.RpcError:  # raw: the client retries UNAVAILABLE
            with pytest.raises(grpc.RpcError) as err:
                list(client.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=10))
            return err.value

        assert watch("no-such-job").code() == grpc.StatusCode.NOT_FOUND
        srv.server.front.draining = True
        refused = [watch(job_id)]
        with pytest.raises(grpc.RpcError) as err:
            list(client.stub.Explain(client.request(job()), timeout=10))
        refused.append(err.value)
        for e in refused:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.details()
        srv.server.front.draining = False
        assert holder.join() == ["DEADLINE_EXCEEDED"]


def test_the_waits_of_many_streams_do_not_hold_up_the_front_s_other_calls(tiny_dir, monkeypatch):
    """On the in-process queue each followed stream waits for events on a thread. They shared one pool of 64
    with every other queue call: past 64 streams a GetJob waited for a stream's wait to end."""
    from difflens.api import front
    from difflens.api.server import BackgroundServer
    from tests.api.helpers import Watchers

    monkeypatch.setattr(front, "FOLLOW_BLOCK_S", 30.0)  # each wait holds its thread this long
    n = front.QUEUE_THREADS + 6
    with BackgroundServer(settings(tiny_dir)) as srv, DifflensClient(srv.target) as client:
        job_id = client.submit(job(steps=2)).id  # no worker: every watcher waits
        watchers = Watchers(client, job_id, n, timeout_s=60.0)
        _wait_for_streams(srv, n)
        time.sleep(0.5)  # every stream is inside its blocking wait
        t0 = time.monotonic()
        assert client.get(job_id).state == "queued"
        assert time.monotonic() - t0 < 20  # before: until one of the 30 s waits ended
        client.cancel(job_id)  # the terminal event ends every stream
        assert watchers.join() == ["OK"] * n
