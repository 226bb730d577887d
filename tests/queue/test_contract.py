"""queue/base.py's semantics, checked the same way on both implementations (in-process and real Redis)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from difflens.errors import InvalidArgument, ResourceExhausted
from difflens.jobs import Completed, Failed, Queued, Started, Step
from difflens.queue.base import JobNotFound, Published
from difflens.queue.common import CANCELLED_MESSAGE as CANCELLED
from tests.queue.conftest import FAST, MODEL, MODELS, expired, spec
from tests.support.waiting import wait_until

LAPSE_S = FAST["visibility_timeout_s"] + 0.15  # long enough for a holder to lose its job


def redis_only(backend, why: str) -> None:
    """Skip on the in-process backend, saying `why` the case does not apply to it."""
    if backend.url is None:
        pytest.skip(why)


def kinds(q, job_id, after=-1):
    return [(i, type(e).__name__) for i, e in q.events(job_id, after)]


def step(i: int = 0) -> Step:
    return Step(index=i, timestep=900 - i, num_steps=4, maps={"rise": np.arange(4, dtype=np.float32).reshape(2, 2)})


def test_lifecycle_orders_events_with_dense_sequences(backend):
    q = backend.queue()
    a, b = q.enqueue(spec("a")), q.enqueue(spec("b"))
    assert (a.state, a.queue_position, b.queue_position, q.depth(MODEL)) == ("queued", 0, 1, 2)
    assert q.events(b.id) == [(0, Queued(position=1))]
    c = q.claim("w1", MODELS, block_s=1)
    assert (c.job_id, c.delivery, c.spec.params.prompt, c.worker) == (a.id, 1, "a", "w1")
    assert q.depth(MODEL) == 1 and q.get(b.id).queue_position == 0
    assert q.publish(c, Started("w1", attempt=c.delivery))
    assert q.get(a.id).state == "running"
    assert q.publish(c, step(0)) and q.publish(c, step(1))
    assert q.finish(c, Completed(b"png", '{"ok": true}'))
    assert kinds(q, a.id) == [(0, "Queued"), (1, "Started"), (2, "Step"), (3, "Step"), (4, "Completed")]
    assert kinds(q, a.id, after=2) == [(3, "Step"), (4, "Completed")]
    (_, got), = q.events(a.id, after=2)[:1]
    assert got.index == 1
    np.testing.assert_array_equal(got.maps["rise"], step(0).maps["rise"])
    rec = q.get(a.id)
    assert (rec.state, rec.worker, rec.deliveries, rec.done) == ("completed", "w1", 1, True)


def test_claim_with_start_writes_started_in_the_same_step(backend):
    q = backend.queue()
    watcher = backend.replica(q)
    job = q.enqueue(spec())
    c = q.claim("w1", MODELS, block_s=1, start=True)
    assert c is not None and c.started and c.job_id == job.id
    assert watcher.events(job.id) == [(0, Queued(position=0)), (1, Started("w1", attempt=1))]
    assert watcher.get(job.id).state == "running"
    assert q.publish(c, step(0)) == Published.OK and q.finish(c, Completed(b"png", "{}"))
    assert kinds(watcher, job.id) == [(0, "Queued"), (1, "Started"), (2, "Step"), (3, "Completed")]
    plain = q.enqueue(spec())
    c2 = q.claim("w1", MODELS, block_s=1)
    assert c2 is not None and not c2.started and kinds(q, plain.id) == [(0, "Queued")]


def test_claim_with_start_names_the_attempt_of_a_redelivery(backend):
    q = backend.queue()
    job = q.enqueue(spec())
    q.claim("w1", MODELS, block_s=1, start=True)
    time.sleep(LAPSE_S)  # w1 stops heartbeating
    second = q.claim("w2", MODELS, block_s=2, start=True)
    assert second is not None and second.started and second.delivery == 2
    assert [e for _, e in q.events(job.id) if isinstance(e, Started)] == [Started("w1", 1), Started("w2", 2)]


def test_claim_with_start_writes_no_started_for_a_job_it_fails(backend):
    q = backend.queue()  # max_deliveries=2
    late = q.enqueue(spec("late", deadline=time.time() - 1))
    assert q.claim("w", MODELS, block_s=0.3, start=True) is None
    assert [type(e).__name__ for _, e in q.events(late.id)] == ["Queued", "Failed"]
    cancelled = q.enqueue(spec("cancelled"))
    q.claim("w1", MODELS, block_s=1, start=True)
    q.cancel(cancelled.id)
    time.sleep(LAPSE_S)
    assert q.claim("w2", MODELS, block_s=2 * LAPSE_S, start=True) is None
    assert [type(e).__name__ for _, e in q.events(cancelled.id)] == ["Queued", "Started", "Failed"]
    aborted = q.enqueue(spec("aborted"))
    for n in (1, 2):
        assert q.claim(f"w{n}", MODELS, block_s=2, start=True) is not None
        time.sleep(LAPSE_S)
    assert q.claim("w3", MODELS, block_s=2 * LAPSE_S, start=True) is None
    assert [type(e).__name__ for _, e in q.events(aborted.id)] == ["Queued", "Started", "Started", "Failed"]


def test_finish_twice_gives_one_terminal_event_and_closes_publishing(backend):
    q = backend.queue()
    job = q.enqueue(spec())
    c = q.claim("w", MODELS, block_s=1)
    assert q.finish(c, Completed(b"png", "{}"))
    assert not q.finish(c, Failed("INTERNAL", "late"))
    assert not q.publish(c, step())
    assert not q.heartbeat(c)
    assert [k for _, k in kinds(q, job.id)] == ["Queued", "Completed"]


def test_concurrent_finishes_of_one_claim_have_one_winner(backend):
    q = backend.queue()
    job = q.enqueue(spec())
    c = q.claim("w", MODELS, block_s=1)
    results: list[bool] = []
    threads = [threading.Thread(target=lambda i=i: results.append(q.finish(c, Completed(b"%d" % i, "{}"))))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert sum(isinstance(e, Completed) for _, e in q.events(job.id)) == 1


def test_reclaimed_job_belongs_to_the_new_holder_only(backend):
    q = backend.queue()
    job = q.enqueue(spec())
    first = q.claim("w1", MODELS, block_s=1)
    assert q.publish(first, Started("w1"))
    time.sleep(LAPSE_S)  # w1 stops heartbeating
    second = q.claim("w2", MODELS, block_s=2)
    assert second is not None and (second.job_id, second.delivery) == (job.id, 2)
    assert second.token != first.token
    assert not q.publish(first, step()) and not q.heartbeat(first)
    assert not q.finish(first, Completed(b"first", "{}"))
    assert q.publish(second, Started("w2", attempt=2))
    assert q.finish(second, Completed(b"second", "{}"))
    terminal = [e for _, e in q.events(job.id) if isinstance(e, (Completed, Failed))]
    assert terminal == [Completed(b"second", "{}")]
    assert (q.get(job.id).deliveries, q.get(job.id).worker) == (2, "w2")


def test_heartbeats_keep_a_slow_job_from_being_stolen(backend):
    q = backend.queue()
    q.enqueue(spec())
    c = q.claim("w1", MODELS, block_s=1)
    stolen = []
    thief = threading.Thread(target=lambda: stolen.append(q.claim("w2", MODELS, block_s=3 * LAPSE_S)))
    thief.start()
    while thief.is_alive():
        assert q.heartbeat(c)
        time.sleep(FAST["heartbeat_interval_s"])
    assert stolen == [None]
    assert q.publish(c, Started("w1"))


def test_dead_letter_after_max_deliveries(backend):
    q = backend.queue()  # max_deliveries=2
    job = q.enqueue(spec())
    for n in (1, 2):
        c = q.claim(f"w{n}", MODELS, block_s=2)
        assert c is not None and c.delivery == n
        time.sleep(LAPSE_S)
    assert q.claim("w3", MODELS, block_s=2 * LAPSE_S) is None  # the third delivery is refused
    rec = q.get(job.id)
    assert (rec.state, rec.deliveries) == ("failed", 3) and rec.error.startswith("ABORTED")
    (_, last), = q.events(job.id)[-1:]
    assert isinstance(last, Failed) and last.code == "ABORTED" and "max_deliveries=2" in last.message
    assert q.dead_letters() == [job.id]


def test_idempotency_is_scoped_by_caller(backend):
    q = backend.queue()
    a = q.enqueue(spec(idempotency_key="k1", caller="app", deadline=time.time() + 60))
    again = q.enqueue(spec(idempotency_key="k1", caller="app", deadline=time.time() + 90))  # a retry's deadline
    other_caller = q.enqueue(spec(idempotency_key="k1", caller="other"))
    no_key = [q.enqueue(spec()).id for _ in range(2)]
    assert again.id == a.id and not again.created and other_caller.id != a.id and no_key[0] != no_key[1]
    assert q.depth(MODEL) == 4
    assert kinds(q, a.id) == [(0, "Queued")]  # the repeat added nothing


@pytest.mark.parametrize("change", [{"prompt": "a different body"}, {"model": "other"}])
def test_a_key_reused_for_another_request_is_refused_and_queues_nothing(backend, change):
    """Not the old job: a caller that reuses a key by mistake (another prompt, another model) would otherwise
    get a job it did not ask for, silently."""
    q = backend.queue()
    a = q.enqueue(spec(idempotency_key="k1", caller="app"))
    with pytest.raises(InvalidArgument) as e:
        q.enqueue(spec(**change, idempotency_key="k1", caller="app"))
    assert e.value.field == "idempotency_key" and a.id in e.value.message
    assert q.depth(MODEL) == 1 and q.depth("other") == 0


def test_an_idempotency_key_lives_as_long_as_its_job(backend):
    """Writes to a running job keep its key alive past the result TTL counted from the enqueue: a retry while it
    runs is still the same job."""
    ttl = 1.0
    q = backend.queue(result_ttl_s=ttl)
    a = q.enqueue(spec(idempotency_key="k1", caller="app"))
    c = q.claim("w1", MODELS, block_s=1, start=True)
    assert c is not None and c.job_id == a.id
    end = time.monotonic() + 2.5 * ttl
    while time.monotonic() < end:
        assert q.heartbeat(c)
        time.sleep(0.1)
    again = q.enqueue(spec(idempotency_key="k1", caller="app"))
    assert again.id == a.id and not again.created


def test_full_queue_refuses_with_retry_hint_then_accepts_again(backend):
    q = backend.queue(max_queue_depth=2)
    first = q.enqueue(spec(idempotency_key="k", caller="c"))
    q.enqueue(spec())
    with pytest.raises(ResourceExhausted, match="max_queue_depth=2") as err:
        q.enqueue(spec())
    assert err.value.retry_after_s is not None and err.value.retry_after_s > 0
    assert q.enqueue(spec(idempotency_key="k", caller="c")).id == first.id  # a retry of an accepted job is fine
    assert q.depth(MODEL) == 2
    assert q.claim("w", MODELS, block_s=1) is not None
    assert q.enqueue(spec()).queue_position == 1


def test_each_model_has_its_own_queue(backend):
    """A worker takes only jobs of the models it names, so workers that serve different models can share a queue;
    depth, queue position and the depth limit are per model."""
    q = backend.queue(max_queue_depth=2, visibility_timeout_s=30.0)  # no claim here lapses
    a1, b1, a2 = q.enqueue(spec("a1")), q.enqueue(spec("b1", model="b")), q.enqueue(spec("a2"))
    assert (a1.queue_position, b1.queue_position, a2.queue_position) == (0, 0, 1)
    assert (q.depth(MODEL), q.depth("b"), q.depth("nobody")) == (2, 1, 0)
    with pytest.raises(ResourceExhausted, match="'default'"):
        q.enqueue(spec("a3"))
    b2 = q.enqueue(spec("b2", model="b"))  # b's queue has room
    assert q.claim("only-c", ("c",), block_s=0.3) is None
    got = q.claim("only-b", ("b",), block_s=1)
    assert got is not None and got.job_id == b1.id and got.spec.model == "b"
    assert q.get(b2.id).queue_position == 0 and q.get(a2.id).queue_position == 1
    both = [q.claim("both", (MODEL, "b"), block_s=1) for _ in range(3)]
    assert sorted(c.job_id for c in both if c is not None) == sorted((a1.id, a2.id, b2.id))
    assert q.claim("both", (MODEL, "b"), block_s=0.3) is None
    assert (q.depth(MODEL), q.depth("b")) == (0, 0)
    with pytest.raises(ValueError, match="names of the models"):  # a worker of no model would wait forever
        q.claim("nobody", (), block_s=0.1)


def test_live_workers_are_counted_per_model_and_drop_out(backend):
    """What a front reports so a caller can tell a job no worker serves from one that waits its turn."""
    q = backend.queue()
    other = backend.replica(q)  # workers announce through their own connections
    q.announce("w1", (MODEL, "b"))
    other.announce("w2", (MODEL,))
    assert (q.live_workers(MODEL), q.live_workers("b"), q.live_workers("c")) == (2, 1, 0)
    q.announce("w1", (MODEL, "b"))  # every heartbeat interval: counted once
    q.retire("w1", (MODEL, "b"))  # a worker that stops leaves at once
    assert (q.live_workers(MODEL), q.live_workers("b")) == (1, 0)
    time.sleep(LAPSE_S)  # w2 went silent for longer than the visibility timeout
    assert other.live_workers(MODEL) == 0


def test_cancel_queued_job_is_terminal_at_once(backend):
    q = backend.queue()
    job = q.enqueue(spec())
    rec = q.cancel(job.id)
    assert (rec.state, q.depth(MODEL)) == ("cancelled", 0)
    (_, last), = q.events(job.id)[-1:]
    assert isinstance(last, Failed) and last.code == "CANCELLED"
    assert q.claim("w", MODELS, block_s=0.3) is None
    assert q.cancel(job.id).state == "cancelled"  # cancelling again changes nothing
    assert len(q.events(job.id)) == 2


def test_cancel_running_job_raises_the_flag_the_worker_polls(backend):
    q = backend.queue()
    job = q.enqueue(spec())
    c = q.claim("w", MODELS, block_s=1)
    assert q.publish(c, Started("w")) == Published.OK
    assert not q.cancel_requested(job.id)
    assert q.cancel(job.id).state == "running"
    assert q.cancel_requested(job.id)
    assert q.publish(c, step(0)) == Published.CANCEL_REQUESTED  # the worker learns it from its next publish too
    assert q.finish(c, Failed("CANCELLED", "stopped at step 3"))
    assert q.publish(c, step(1)) == Published.LOST
    rec = q.get(job.id)
    assert (rec.state, rec.error) == ("cancelled", "CANCELLED: stopped at step 3")


def test_the_claiming_worker_is_signalled_a_cancel_from_another_front(backend):
    q = backend.queue()
    other = backend.replica(q)  # a front that never claimed: it publishes the cancel
    job, bystander = q.enqueue(spec()), q.enqueue(spec())
    c, d = q.claim("w", MODELS, block_s=1), q.claim("w", MODELS, block_s=1)
    assert (c.job_id, d.job_id) == (job.id, bystander.id)
    assert q.cancel_signalled(job.id) is False  # vouched for, not cancelled: no read needed
    other.cancel(job.id)
    wait_until(lambda: q.cancel_signalled(job.id) is True, interval_s=0.005, what="the cancel signalled")
    assert q.cancel_signalled(bystander.id) is False  # only the cancelled job
    assert q.finish(c, Failed("CANCELLED", "stopped"))
    if backend.url is not None:
        assert q.cancel_signalled(job.id) is None  # finished: forgotten, so the watch holds only live jobs


def test_a_job_claimed_without_the_subscription_is_not_vouched_for(backend):
    redis_only(backend, "the in-process queue reads its flag directly: it always vouches")
    q = backend.queue()
    job = q.enqueue(spec())
    c = q.claim("w", MODELS, block_s=1)
    watch = q._watch
    with watch._lock:
        watch._generation += 1  # as after a reconnect: what was published in between is unknown
    assert q.cancel_signalled(job.id) is None
    backend.replica(q).cancel(job.id)
    assert q.cancel_requested(job.id)  # the worker falls back to reading the flag
    assert q.heartbeat(c)  # and the heartbeat, which returns the flag, marks it
    assert q.cancel_signalled(job.id) is True


def test_a_claim_that_lost_its_job_is_forgotten_by_the_cancel_watch(backend):
    redis_only(backend, "the in-process queue keeps no watch")
    q = backend.queue()
    job = q.enqueue(spec())
    first = q.claim("slow", MODELS, block_s=1)
    time.sleep(0.5)  # past the visibility timeout without a heartbeat
    heir = backend.replica(q).claim("heir", MODELS, block_s=2)
    assert heir is not None and heir.job_id == job.id
    assert q.cancel_signalled(job.id) is False
    assert q.publish(first, step(0)) == Published.LOST
    assert q.cancel_signalled(job.id) is None  # not ours any more: nothing kept for it


def test_cancelled_job_whose_worker_died_is_not_handed_out_again(backend):
    q = backend.queue()
    job = q.enqueue(spec())
    q.claim("w1", MODELS, block_s=1)
    q.cancel(job.id)
    time.sleep(LAPSE_S)
    assert q.claim("w2", MODELS, block_s=2 * LAPSE_S) is None
    assert q.get(job.id).state == "cancelled"
    assert q.dead_letters() == []


def test_deadline_passed_at_claim_time_fails_the_job(backend):
    q = backend.queue()
    late = q.enqueue(spec("late", deadline=time.time() - 1))
    fine = q.enqueue(spec("fine", deadline=time.time() + 60))
    c = q.claim("w", MODELS, block_s=1)
    assert c is not None and c.job_id == fine.id
    rec = q.get(late.id)
    assert rec.state == "failed" and rec.error.startswith("DEADLINE_EXCEEDED")
    assert [type(e).__name__ for _, e in q.events(late.id)] == ["Queued", "Failed"]


def test_blocking_events_wake_on_publish(backend):
    q = backend.queue()
    watcher_q = backend.replica(q)
    job = q.enqueue(spec())
    c = q.claim("w", MODELS, block_s=1)
    got: list = []
    t0 = time.monotonic()
    watcher = threading.Thread(target=lambda: got.extend(watcher_q.events(job.id, after=0, block_s=10)))
    watcher.start()
    time.sleep(0.2)
    assert got == []  # still waiting
    q.publish(c, Started("w"))
    watcher.join(30)
    assert got == [(1, Started("w"))] and time.monotonic() - t0 < 10  # woken by the publish, not its 10 s block
    q.finish(c, Completed(b"png", "{}"))
    t0 = time.monotonic()
    assert watcher_q.events(job.id, after=2, block_s=5) == []  # terminal: nothing to wait for
    assert time.monotonic() - t0 < 5  # at once, not after the 5 s block


def test_a_second_front_sees_the_same_jobs_and_events(backend):
    q = backend.queue()
    other = backend.replica(q)
    job = q.enqueue(spec(idempotency_key="k", caller="c"))
    assert other.enqueue(spec(idempotency_key="k", caller="c")).id == job.id
    c = other.claim("w", MODELS, block_s=1)
    assert c.job_id == job.id and q.publish(c, Started("w"))
    assert other.get(job.id).state == "running"
    assert kinds(other, job.id) == kinds(q, job.id) == [(0, "Queued"), (1, "Started")]
    other.cancel(job.id)
    assert q.cancel_requested(job.id)


def test_unknown_and_expired_jobs_are_not_found(backend):
    q = backend.queue(result_ttl_s=0.5)
    for call in (q.get, q.cancel, q.events):
        with pytest.raises(JobNotFound):
            call("no-such-job")
    job = q.enqueue(spec())
    c = q.claim("w", MODELS, block_s=1)
    q.finish(c, Completed(b"png", "{}"))
    assert q.get(job.id).state == "completed"
    wait_until(lambda: expired(q, job.id), what="the job's records expired")  # result_ttl_s after its end
    with pytest.raises(JobNotFound):
        q.events(job.id)
    with pytest.raises(JobNotFound):
        q.get(job.id)


def test_publish_and_finish_refuse_the_wrong_kind_of_event(backend):
    q = backend.queue()
    q.enqueue(spec())
    c = q.claim("w", MODELS, block_s=1)
    with pytest.raises(ValueError, match="finish"):
        q.publish(c, Completed(b"png", "{}"))
    with pytest.raises(ValueError, match="Completed or Failed"):
        q.finish(c, Started("w"))


def test_reclaim_finds_an_abandoned_job_behind_many_live_ones(backend):
    q = backend.queue(max_queue_depth=100)
    jobs = [q.enqueue(spec(str(i))) for i in range(25)]
    claims = [q.claim("w1", MODELS, block_s=1) for _ in jobs]
    live, abandoned = claims[:-1], claims[-1]
    end = time.monotonic() + 2 * LAPSE_S
    got = None
    while got is None and time.monotonic() < end:
        assert all(q.heartbeat(c) for c in live)
        got = q.claim("w2", MODELS, block_s=FAST["heartbeat_interval_s"])
    assert got is not None and (got.job_id, got.delivery) == (abandoned.job_id, 2)
    assert all(q.publish(c, Started("w1")) for c in live)  # none of the live ones was taken


def test_claim_ahead_is_claim_with_start_once_confirmed(backend):
    q = backend.queue()
    watcher = backend.replica(q)
    job = q.enqueue(spec("ahead", caller="alice"))
    got = q.claim_ahead("w1", MODELS, block_s=1)
    assert got is not None
    c, confirm = got
    assert (c.job_id, c.spec, c.delivery, c.started, c.worker) == (job.id, spec("ahead", caller="alice"), 1, True, "w1")
    assert abs(c.enqueued_at - job.created_at) < 1e-3
    assert confirm()
    assert watcher.events(job.id) == [(0, Queued(position=0)), (1, Started("w1", attempt=1))]
    assert watcher.get(job.id).state == "running" and q.cancel_signalled(job.id) is False
    assert q.heartbeat(c) and q.publish(c, step(0)) == Published.OK and q.finish(c, Completed(b"png", "{}"))
    assert kinds(watcher, job.id) == [(0, "Queued"), (1, "Started"), (2, "Step"), (3, "Completed")]


def test_claim_ahead_hands_a_new_job_out_before_the_claim_script_and_says_if_it_held(backend):
    redis_only(backend, "the in-process queue settles a claim as it hands it out")
    q = backend.queue()
    watcher = backend.replica(q)
    job = q.enqueue(spec())
    c, confirm = q.claim_ahead("w1", MODELS, block_s=1)
    assert watcher.get(job.id).state == "queued" and kinds(watcher, job.id) == [(0, "Queued")]  # not claimed yet
    assert not q.heartbeat(c)  # nothing is held before confirm()
    assert confirm() and watcher.get(job.id).state == "running" and q.heartbeat(c)
    assert q.finish(c, Completed(b"png", "{}"))
    # Cancelled between the hand-out and the claim script: the job stays cancelled, and the claim never held.
    gone = q.enqueue(spec("gone"))
    c2, confirm2 = q.claim_ahead("w1", MODELS, block_s=1)
    assert c2.job_id == gone.id
    watcher.cancel(gone.id)
    assert not confirm2()
    assert q.publish(c2, step(0)) == Published.LOST and not q.finish(c2, Completed(b"png", "{}"))
    assert [e for _, e in watcher.events(gone.id)] == [Queued(position=0), Failed("CANCELLED", CANCELLED)]
    # Past its deadline by the time the claim script runs: failed by the queue, as claim() would.
    late = q.enqueue(spec("late", deadline=time.time() + 0.2))
    c3, confirm3 = q.claim_ahead("w1", MODELS, block_s=1)
    time.sleep(0.3)
    assert c3.job_id == late.id and not confirm3()
    assert [type(e).__name__ for _, e in watcher.events(late.id)] == ["Queued", "Failed"]
    assert watcher.get(late.id).state == "failed" and q.depth(MODEL) == 0


def _listen(q) -> list[str]:
    ended: list[str] = []
    getattr(q, "_queue", q).on_ended = lambda event: ended.append(event.code)  # the asyncio front's queue
    return ended


def test_jobs_the_queue_ends_itself_are_reported_once_each(backend):
    """on_ended (difflens_jobs_total's source for them): a queued job the caller cancels, and a job a claim fails
    past its deadline. Not a running job's cancel: its worker ends that one and counts it."""
    q = backend.queue()
    ended = _listen(q)
    queued = q.enqueue(spec("cancel me"))
    q.cancel(queued.id)
    q.cancel(queued.id)  # already ended: not again
    q.enqueue(spec("late", deadline=time.time() - 1))
    running = q.enqueue(spec("running"))
    c = q.claim("w1", MODELS, block_s=2)  # the late one fails at this claim; the running one is handed out
    assert c is not None and c.job_id == running.id
    q.cancel(running.id)
    assert ended == ["CANCELLED", "DEADLINE_EXCEEDED"]


def test_a_dead_lettered_job_is_reported_as_ended(backend):
    q = backend.queue()  # max_deliveries=2
    ended = _listen(q)
    q.enqueue(spec())
    for n in (1, 2):
        assert q.claim(f"w{n}", MODELS, block_s=2) is not None
        time.sleep(LAPSE_S)
    assert q.claim("w3", MODELS, block_s=2 * LAPSE_S) is None
    assert ended == ["ABORTED"]


def test_a_queued_job_past_its_deadline_fails_without_a_worker(backend):
    """No worker of its model comes: the job must not stay queued, nor count toward the depth (and its limit)."""
    q = backend.queue(max_queue_depth=2)
    ended = _listen(q)
    late = q.enqueue(spec("late", deadline=time.time() + 0.3))
    later = q.enqueue(spec("later", deadline=time.time() + 60))
    assert q.expire_overdue(MODEL) == 0 and q.depth(MODEL) == 2
    assert wait_until(lambda: q.expire_overdue(MODEL)) == 1 and q.expire_overdue(MODEL) == 0  # once its 0.3 s pass
    rec = q.get(late.id)
    assert rec.state == "failed" and rec.error.startswith("DEADLINE_EXCEEDED")
    (_, last), = q.events(late.id)[-1:]
    assert isinstance(last, Failed) and last.code == "DEADLINE_EXCEEDED"
    assert ended == ["DEADLINE_EXCEEDED"] and q.depth(MODEL) == 1
    q.enqueue(spec("fits again"))  # the limit counts the live job only
    c = q.claim("w1", MODELS, block_s=1)
    assert c is not None and c.job_id == later.id


def test_a_job_handed_back_is_taken_by_another_worker_at_once_without_using_a_delivery(backend):
    """A stopping worker gives its job back: the next worker gets it well before the visibility timeout (30 s
    here), as the same attempt, with the events so far; the first claim is dead from then on."""
    q = backend.queue(visibility_timeout_s=30.0, heartbeat_interval_s=1.0, max_deliveries=1)
    job = q.enqueue(spec())
    first = q.claim("w1", MODELS, block_s=1, start=True)
    assert first is not None and first.delivery == 1
    assert q.publish(first, step(0))
    other = q.enqueue(spec("queued before the hand-back"))
    assert q.hand_back(first)
    assert not q.hand_back(first) and not q.publish(first, step(1))  # the claim no longer holds it
    rec = q.get(job.id)  # queued again, first in line: it counts toward the depth an autoscaler reads
    assert (rec.state, rec.queue_position, q.depth(MODEL), q.get(other.id).queue_position) == ("queued", 0, 2, 1)
    q.cancel(other.id)
    t0 = time.monotonic()
    second = q.claim("w2", MODELS, block_s=10, start=True)
    assert second is not None and second.job_id == job.id and time.monotonic() - t0 < 5
    assert second.delivery == 1  # max_deliveries=1, and not dead-lettered: a hand-back is not a failed attempt
    assert q.finish(second, Completed(b"png", "{}"))
    assert [k for _, k in kinds(q, job.id)] == ["Queued", "Started", "Step", "Started", "Completed"]
    assert q.get(job.id).state == "completed" and q.dead_letters() == []


def test_a_job_handed_back_is_cancelled_at_once_and_its_deadline_still_holds(backend):
    """Nobody holds a handed-back job: a cancel ends it then and there (no flag waiting for a worker), and a
    deadline that passes while it waits fails it like any queued job."""
    q = backend.queue(visibility_timeout_s=30.0, heartbeat_interval_s=1.0)
    job = q.enqueue(spec())
    first = q.claim("w1", MODELS, block_s=1, start=True)
    assert first is not None and q.hand_back(first)
    assert q.cancel(job.id).state == "cancelled"
    assert [k for _, k in kinds(q, job.id)][-1] == "Failed" and q.depth(MODEL) == 0
    assert q.claim("w2", MODELS, block_s=2) is None
    late = q.enqueue(spec("late", deadline=time.time() + 1.0))
    held = q.claim("w1", MODELS, block_s=1, start=True)
    assert held is not None and held.job_id == late.id and q.hand_back(held)
    assert wait_until(lambda: q.expire_overdue(MODEL)) == 1  # once its deadline passes, 1 s after it was queued
    rec = q.get(late.id)
    assert rec.state == "failed" and rec.error.startswith("DEADLINE_EXCEEDED") and q.depth(MODEL) == 0
    assert q.claim("w2", MODELS, block_s=2) is None  # its work entry is gone too


def test_handing_back_a_job_whose_cancel_flag_is_up_ends_it_cancelled(backend):
    """Nobody would act on the flag once the job is handed back (its worker is going): it ends then and there."""
    q = backend.queue(visibility_timeout_s=30.0, heartbeat_interval_s=1.0)
    job = q.enqueue(spec())
    held = q.claim("w1", MODELS, block_s=1, start=True)
    assert held is not None
    assert q.cancel(job.id).state == "running"  # held: the flag goes up
    assert q.hand_back(held)
    rec = q.get(job.id)
    assert rec.state == "cancelled" and q.depth(MODEL) == 0
    (_, last), = q.events(job.id)[-1:]
    assert isinstance(last, Failed) and last.code == "CANCELLED"
