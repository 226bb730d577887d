"""What only the Redis queue has: keys with a TTL, state that outlives a queue object, bounded streams."""

from __future__ import annotations

import json
import time

import pytest
import redis

from difflens.jobs import Completed, Failed, Started
from tests.queue.conftest import FAST, MODEL, MODELS, Backend, expired, spec
from tests.support.waiting import wait_until


@pytest.fixture
def rb(redis_url, queue_name):
    b = Backend("redis", queue_name, redis_url)
    yield b
    for q in b.made:
        q.close()


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def job_keys(name: str, job_id: str) -> list[str]:
    return [f"{name}:job:{job_id}", f"{name}:job:{job_id}:events"]


def test_job_keys_carry_the_ttl_and_writes_refresh_it(rb, r, queue_name):
    q = rb.queue(result_ttl_s=30)
    job = q.enqueue(spec(idempotency_key="k", caller="c"))
    idem = [k for k in r.keys(f"{queue_name}:idem:*")]
    assert len(idem) == 1
    for key in [*job_keys(queue_name, job.id), *idem]:
        assert 29_000 < r.pttl(key) <= 30_000, key
    wait_until(lambda: r.pttl(job_keys(queue_name, job.id)[0]) < 29_000, what="the TTL to run down a second")
    aged = r.pttl(job_keys(queue_name, job.id)[0])
    c = q.claim("w", MODELS, block_s=1)
    q.publish(c, Started("w"))
    assert all(r.pttl(k) > aged + 500 for k in job_keys(queue_name, job.id))
    # the shared keys never expire: they are the queue itself
    assert r.pttl(f"{queue_name}:work:{MODEL}") == -1


def test_a_fresh_queue_object_sees_jobs_of_a_closed_one(rb, queue_name):
    first = rb.queue()
    job = first.enqueue(spec("survivor"))
    first.close()
    second = rb.queue()  # creating the consumer group again is harmless
    rec = second.get(job.id)
    assert (rec.state, rec.queue_position) == ("queued", 0)
    c = second.claim("w", MODELS, block_s=1)
    assert c.job_id == job.id and c.spec.params.prompt == "survivor"
    assert second.finish(c, Completed(b"png", "{}"))
    assert [type(e).__name__ for _, e in second.events(job.id)] == ["Queued", "Completed"]


def forget_everything(r, name: str) -> None:
    """What a Redis restarted without persistence (or flushed) does to one queue: every key gone, the work
    stream's consumer group with it."""
    keys = list(r.scan_iter(f"{name}:*"))
    if keys:
        r.delete(*keys)


@pytest.mark.parametrize("reclaim_first", [False, True], ids=["read", "reclaim-scan"])
def test_a_worker_makes_the_lost_consumer_group_again_and_takes_the_jobs_queued_since(rb, r, queue_name,
                                                                                         reclaim_first):
    front, worker = rb.queue(), rb.queue()
    front.enqueue(spec("before"))
    c = worker.claim("w", MODELS, block_s=1)
    assert c is not None
    forget_everything(r, queue_name)
    job = front.enqueue(spec("after"))  # the enqueue script makes a new work stream, with no group
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        r.xreadgroup("workers", "probe", {f"{queue_name}:work:{MODEL}": ">"}, count=1)
    # which call meets the missing group first: the reclaim scan (due) or the read (the scan not due yet)
    worker._work._last_reclaim = 0.0 if reclaim_first else time.monotonic()
    again = worker.claim("w", MODELS, block_s=1)
    assert again is not None and (again.job_id, again.spec.params.prompt) == (job.id, "after")
    assert worker.finish(again, Completed(b"png", "{}"))
    assert not worker.publish(c, Started("w"))  # the job held before the loss is gone with it, and stays gone
    assert r.xlen(f"{queue_name}:work:{MODEL}") == 0


def test_a_worker_blocked_on_its_streams_when_they_are_flushed_takes_the_next_job_quietly(rb, r, queue_name,
                                                                                             caplog):
    """Redis unblocks a read whose stream was deleted with UNBLOCKED, not NOGROUP: the same loss of data, and it
    used to surface as a failed claim (an ERROR with a traceback) before the next read made the group again."""
    import threading

    front = rb.queue()
    worker = rb.queue(visibility_timeout_s=30.0)  # reads block for a full second between reclaim scans
    assert worker.claim("w", (MODEL, "b"), block_s=0.2) is None  # the groups exist; now block on both streams
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(worker.claim("w", (MODEL, "b"), block_s=3)))
    t.start()
    # the claim is inside its blocking read (a client blocked in XREADGROUP)
    wait_until(lambda: any(c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in r.client_list()))
    r.flushdb()
    time.sleep(0.2)
    job = front.enqueue(spec("after", model="b"))
    t.join()
    first = got[0]
    second = first if first is not None else worker.claim("w", (MODEL, "b"), block_s=2)
    assert second is not None and second.job_id == job.id
    assert any("consumer group" in m and "made it again" in m for m in caplog.messages)


def test_finished_jobs_leave_nothing_in_the_work_stream(rb, r, queue_name):
    q = rb.queue()
    done = [q.enqueue(spec()) for _ in range(3)]
    cancelled = q.enqueue(spec())
    q.cancel(cancelled.id)
    for _ in done:
        c = q.claim("w", MODELS, block_s=1)
        q.finish(c, Completed(b"png", "{}"))
    assert q.claim("w", MODELS, block_s=0.2) is None  # the cancelled job's entry is gone, not delivered
    assert r.xlen(f"{queue_name}:work:{MODEL}") == 0
    assert r.xpending(f"{queue_name}:work:{MODEL}", "workers")["pending"] == 0
    assert r.zcard(f"{queue_name}:waiting:{MODEL}") == 0


def test_jobs_with_a_deadline_leave_the_deadlines_set_when_claimed_or_cancelled(rb, r, queue_name):
    """The deadlines zset is for failing queued jobs: an id must not stay in it, for as long as its deadline is far
    off (a day, for a patient client), after the job was claimed or cancelled."""
    q = rb.queue()
    far = time.time() + 86_400
    done = [q.enqueue(spec(deadline=far)) for _ in range(2)]
    cancelled = q.enqueue(spec(deadline=far))
    key = f"{queue_name}:deadlines:{MODEL}"
    assert r.zcard(key) == 3
    q.cancel(cancelled.id)
    assert set(r.zrange(key, 0, -1)) == {j.id.encode() for j in done}  # one deadline: ties in id order
    for _ in done:
        c = q.claim("w", MODELS, block_s=1)
        assert c is not None
        q.finish(c, Completed(b"png", "{}"))
    assert r.zcard(key) == 0


def test_dead_letter_entry_names_the_job_and_its_deliveries(rb, r, queue_name):
    q = rb.queue(max_deliveries=1)
    job = q.enqueue(spec())
    assert q.claim("w1", MODELS, block_s=1) is not None
    time.sleep(FAST["visibility_timeout_s"] + 0.15)
    assert q.claim("w2", MODELS, block_s=1) is None
    [(_, fields)] = r.xrange(f"{queue_name}:dead")
    assert (fields[b"job"].decode(), fields[b"deliveries"], fields[b"worker"]) == (job.id, b"2", b"w2")
    assert r.xlen(f"{queue_name}:work:{MODEL}") == 0


def test_a_spec_this_worker_cannot_read_fails_the_job_instead_of_the_worker(rb, r, queue_name):
    q = rb.queue()
    job = q.enqueue(spec())
    r.hset(f"{queue_name}:job:{job.id}", "spec", '{"model": "default"}')  # e.g. written by a newer front
    assert q.claim("w", MODELS, block_s=0.5) is None
    (_, last), = q.events(job.id)[-1:]
    assert isinstance(last, Failed) and last.code == "INTERNAL" and "spec" in last.message


@pytest.mark.parametrize("ahead", [False, True], ids=["claim", "claim-ahead"])
def test_a_job_whose_spec_this_worker_cannot_read_fails_without_a_started_event(rb, queue_name, ahead):
    """The claim script wrote Started before Python failed the job: a job failed at claim time showed one."""
    from difflens.queue.common import new_job_id

    q = rb.queue()
    job_id = new_job_id()
    call = q._enqueue_call(spec(), job_id, time.time())
    call.args[1] = json.dumps({"model": MODEL, "params": {"prompt": "x", "a_newer_field": 1}})  # a newer front's
    assert call.run(q._enqueue).outcome == "new"
    assert (q.claim_ahead("w", MODELS, block_s=1) if ahead else q.claim("w", MODELS, block_s=1, start=True)) is None
    events = [e for _, e in q.events(job_id)]
    assert [type(e).__name__ for e in events] == ["Queued", "Failed"]
    assert events[-1].code == "INTERNAL" and "cannot read the job's spec" in events[-1].message


def test_queues_with_different_names_are_isolated(rb, redis_url, queue_name):
    q = rb.queue()
    other = Backend("redis", queue_name + "-other", redis_url)
    try:
        o = other.queue()
        o.enqueue(spec())
        assert (q.depth(MODEL), o.depth(MODEL)) == (0, 1)
        assert q.claim("w", MODELS, block_s=0.2) is None
    finally:
        for made in other.made:
            made.close()


class _FinishBeforeStateRead(redis.Redis):
    """A real client that runs `before_hget` once, just before its next HGET: it puts a job's end exactly between
    the events() call's first XREAD (which found nothing) and its read of the state."""

    before_hget = None

    def hget(self, *args, **kwargs):
        hook, self.before_hget = self.before_hget, None
        if hook is not None:
            hook()
        return super().hget(*args, **kwargs)


def test_a_job_ending_between_the_event_read_and_the_state_read_still_shows_its_terminal_event(redis_url, queue_name):
    from difflens.config import ServiceSettings
    from difflens.queue.redis_streams import RedisStreamsQueue
    from tests.queue.conftest import FAST

    settings = ServiceSettings(queue_name=queue_name, **FAST)  # type: ignore[arg-type]
    client = _FinishBeforeStateRead.from_url(redis_url)
    front, worker = RedisStreamsQueue(client, settings), RedisStreamsQueue(redis_url, settings)
    try:
        job = front.enqueue(spec())
        c = worker.claim("w", MODELS, block_s=1)
        worker.publish(c, Started("w"))
        seen = front.events(job.id)
        client.before_hget = lambda: worker.finish(c, Completed(b"png", "{}"))
        late = front.events(job.id, after=seen[-1][0], block_s=0.0)
        assert [type(e).__name__ for _, e in late] == ["Completed"]
    finally:
        worker.close()
        client.close()


def test_a_live_follower_reads_with_one_blocking_call_and_still_sees_the_end(rb, queue_name):
    """AsyncRedisFront.events(live=True): the caller saw a non-terminal event, so the blocking read comes first;
    it still returns the terminal event, and a job that expired meanwhile is still reported as not found."""
    from difflens.queue.base import JobNotFound
    from tests.queue.conftest import AsyncFrontQueue

    rb.kind = "redis-async"
    q = rb.queue(result_ttl_s=1.0)
    assert isinstance(q, AsyncFrontQueue)
    job = q.enqueue(spec())
    c = q.claim("w", MODELS, block_s=1)
    q.publish(c, Started("w"))
    t0 = time.monotonic()
    assert q.events(job.id, after=1, block_s=0.2, live=True) == []  # nothing new: waited, then read the state
    assert time.monotonic() - t0 >= 0.2
    q.finish(c, Completed(b"png", "{}"))
    assert [type(e).__name__ for _, e in q.events(job.id, after=1, block_s=5, live=True)] == ["Completed"]
    wait_until(lambda: expired(q, job.id), what="the job's records expired")  # result_ttl_s after its end
    with pytest.raises(JobNotFound):
        q.events(job.id, after=1, block_s=0.2, live=True)


def test_connect_waits_for_a_redis_that_starts_late(queue_name, caplog):
    """A front or worker rolled out beside its Redis: it waits (one warning) instead of dying with a traceback."""
    import threading

    from difflens.config import ServiceSettings
    from difflens.queue.redis_streams import connect
    from tests.support.redis_server import PrivateRedis

    server = PrivateRedis()
    late = threading.Timer(1.0, server.start)
    late.start()
    try:
        t0 = time.monotonic()
        q = connect(ServiceSettings(redis_url=server.url, queue_name=queue_name, redis_wait_s=30.0))
        waited = time.monotonic() - t0
        job = q.enqueue(spec())
        assert q.get(job.id).state == "queued"
        q.close()
    finally:
        late.join()
        server.close()
    assert waited >= 0.9
    told = [r.getMessage() for r in caplog.records if "waiting up to 30 s for Redis" in r.getMessage()]
    assert len(told) == 1 and server.url in told[0]


def test_connect_gives_up_naming_the_flag_and_the_url_without_its_password():
    from difflens.config import ServiceSettings
    from difflens.errors import NotReady
    from difflens.queue.redis_streams import connect
    from tests.support.redis_server import _free_port

    url = f"redis://:sekret@127.0.0.1:{_free_port()}/0"  # nobody listens there
    t0 = time.monotonic()
    with pytest.raises(NotReady) as err:
        connect(ServiceSettings(redis_url=url, redis_wait_s=0.6))
    assert 0.6 <= time.monotonic() - t0 < 60  # its whole DIFFLENS_REDIS_WAIT_S, then it gave up (no hang)
    message = str(err.value)
    assert message.startswith("--redis: cannot reach redis://:***@127.0.0.1:")
    assert "sekret" not in message and "waited 0.6 s, DIFFLENS_REDIS_WAIT_S" in message


def test_connect_refuses_a_redis_older_than_6_2_naming_its_version(redis_url, queue_name, monkeypatch):
    """XAUTOCLAIM (reclaiming a dead worker's job) came in Redis 6.2: an older server must be refused at start-up,
    not fail the first reclaim. The real server's INFO is read; only the version it reports is replaced."""
    from difflens.config import ServiceSettings
    from difflens.errors import NotReady
    from difflens.queue import redis_streams

    settings = ServiceSettings(redis_url=redis_url, queue_name=queue_name, redis_wait_s=0.5)
    real = redis_streams.RedisStreamsQueue(redis_url, settings)
    try:
        assert (real.server_version() or (99,)) >= redis_streams.MIN_REDIS_VERSION
    finally:
        real.close()
    redis_streams.connect(settings).close()
    monkeypatch.setattr(redis_streams.RedisStreamsQueue, "server_version", lambda self: (5, 0, 7))
    with pytest.raises(NotReady) as err:
        redis_streams.connect(settings)
    assert str(err.value).startswith("--redis: ")
    assert "is Redis 5.0.7; difflens needs Redis >= 6.2" in str(err.value)


@pytest.mark.parametrize(("reported", "parsed"), [
    ("7.0.15", (7, 0, 15)), ("6.2.14", (6, 2, 14)), ("6.2", (6, 2)), ("255.255.255", (255, 255, 255)),
    ("7.2.4-rc1", (7, 2, 4)), ("", ()), ("unknown", ()), (None, ()),
])
def test_version_tuple(reported, parsed):
    from difflens.queue.redis_streams import version_tuple

    assert version_tuple(reported) == parsed


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:pw@redis:6379/1", "redis://:***@redis:6379/1"),
    ("rediss://app:pw@redis.internal/0", "rediss://app:***@redis.internal/0"),
])
def test_redacted_hides_only_the_password(url, shown):
    from difflens.queue.redis_streams import redacted

    assert redacted(url) == shown


def test_a_worker_of_several_models_reads_their_streams_in_turns(rb, queue_name):
    q = rb.queue(visibility_timeout_s=30.0)
    for i in range(3):
        q.enqueue(spec(f"a{i}"))
        q.enqueue(spec(f"b{i}", model="b"))
    models = [q.claim("w", (MODEL, "b"), block_s=1).spec.model for _ in range(4)]
    assert models.count("b") == 2, models  # not every job of one model before the other's


def test_an_entry_read_beside_another_is_handed_back_for_any_worker_to_reclaim(rb, r, queue_name):
    """A blocking read of several work streams can return an entry of each: the worker takes one, and the other
    must not wait for the visibility timeout (30 s here) in a pending list nobody serves."""
    q = rb.queue(visibility_timeout_s=30.0)
    jobs = {q.enqueue(spec("a")).id, q.enqueue(spec("b", model="b")).id}
    streams = [f"{queue_name}:work:{MODEL}", f"{queue_name}:work:b"]
    q._work.streams((MODEL, "b"))  # the groups, as a claim makes them
    taken = q._work.read_group("w", streams, None)  # as if both had filled while the read blocked
    assert taken is not None and taken.job_id in jobs
    other = rb.queue(visibility_timeout_s=30.0)
    t0 = time.monotonic()
    got = other.claim("w2", (MODEL, "b"), block_s=5)
    assert got is not None and {got.job_id, taken.job_id} == jobs and got.delivery == 1
    assert time.monotonic() - t0 < 30  # not after the visibility timeout


def take(q, worker: str):
    job = q.enqueue(spec())
    claim = q.claim(worker, MODELS, block_s=1)
    assert claim is not None and claim.job_id == job.id
    return claim


def consumers(r, stream: str) -> dict[str, int]:
    return {c["name"].decode(): int(c["pending"]) for c in r.xinfo_consumers(stream, "workers")}


def test_a_retiring_worker_leaves_no_consumer_behind_but_one_holding_a_job_stays(rb, r, queue_name):
    """Worker names are unique per start: without this each start left a consumer in every stream it read."""
    q = rb.queue()
    stream = f"{queue_name}:work:{MODEL}"
    done = take(q, "w1")  # a delivery makes the consumer
    assert q.finish(done, Completed(b"png", "{}"))
    take(q, "w2")
    assert consumers(r, stream) == {"w1": 0, "w2": 1}
    q.retire("w1", MODELS)
    q.retire("w2", MODELS)  # holds a pending entry: kept, so the entry can still be reclaimed
    assert consumers(r, stream) == {"w2": 1}


def test_the_reclaim_scan_forgets_consumers_long_gone(rb, r, queue_name):
    """A SIGKILLed worker never retires: after 10 visibility timeouts without a read, with nothing pending, a
    scan deletes its consumer."""
    q = rb.queue()  # visibility timeout 0.3 s
    stream = f"{queue_name}:work:{MODEL}"
    assert q.finish(take(q, "gone"), Completed(b"png", "{}"))
    assert take(q, "alive") is not None
    assert consumers(r, stream) == {"gone": 0, "alive": 1}
    time.sleep(10 * FAST["visibility_timeout_s"] + 0.5)  # "alive" holds its job past the visibility timeout too
    q._work._last_prune = q._work._last_reclaim = 0.0
    reclaimed = q.claim("third", MODELS, block_s=0.5)  # the scan: reclaims alive's job, prunes "gone"
    assert reclaimed is not None
    assert consumers(r, stream) == {"alive": 0, "third": 1}  # alive still held its entry when the scan looked


def test_waiting_ids_whose_records_expired_stop_counting(rb, r, queue_name):
    """A job queued longer than the result TTL loses its record; its id must not hold a place in the depth (and
    its limit) until a worker of the model comes."""
    q = rb.queue(result_ttl_s=0.3, max_queue_depth=2)
    for _ in range(2):
        q.enqueue(spec())
    wait_until(lambda: not r.keys(f"{queue_name}:job:*"), what="the job records expired")  # after 0.3 s
    assert q.depth(MODEL) == 2  # the ids are still there
    q.expire_overdue(MODEL)
    assert q.depth(MODEL) == 0
    q.enqueue(spec())  # not refused as full


def test_a_workers_writes_ride_out_a_redis_restart_that_keeps_its_data(queue_name):
    """A failover or a restart with persistence: Redis refuses connections for a second. A running job's publish
    and finish wait for it (up to the visibility timeout) instead of failing the job or abandoning it to be re-run."""
    import threading

    from difflens.config import ServiceSettings
    from difflens.jobs import Progress
    from difflens.queue.redis_streams import RedisStreamsQueue
    from tests.support.redis_server import PrivateRedis

    with PrivateRedis() as server:
        q = RedisStreamsQueue(server.url, ServiceSettings(queue_name=queue_name, visibility_timeout_s=20,
                                                          heartbeat_interval_s=1))
        job = q.enqueue(spec())
        c = q.claim("w", MODELS, block_s=2)
        assert c is not None
        redis.Redis.from_url(server.url).shutdown(save=True)  # its data is saved, and loaded again at start
        assert server._proc is not None
        server._proc.wait(10)
        server._proc = None
        back = threading.Timer(1.0, server.start)
        back.start()
        try:
            assert q.publish(c, Progress(0, 999, 2))
            assert q.finish(c, Completed(b"png", "{}"))
        finally:
            back.join()
        assert [type(e).__name__ for _, e in q.events(job.id)] == ["Queued", "Progress", "Completed"]
        q.close()


def test_a_write_retried_after_its_reply_was_lost_is_applied_once(rb, queue_name):
    """The connection drops after Redis ran the script but before the reply came back: the retry must not append
    the event a second time, nor find the finished job 'not ours' and report the finish as lost."""
    from difflens.jobs import Progress

    q = rb.queue()
    job = q.enqueue(spec())
    c = q.claim("w", MODELS, block_s=2)
    assert c is not None
    for name in ("_publish", "_finish"):
        script = getattr(q, name)
        calls = []

        def reply_lost_once(*args, _script=script, _calls=calls, **kw):
            result = _script(*args, **kw)
            _calls.append(result)
            if len(_calls) == 1:
                raise redis.ConnectionError("connection reset while reading the reply")
            return result

        setattr(q, name, reply_lost_once)
    assert q.publish(c, Progress(0, 999, 2))
    assert q.finish(c, Completed(b"png", "{}"))
    assert [type(e).__name__ for _, e in q.events(job.id)] == ["Queued", "Progress", "Completed"]


@pytest.mark.parametrize("ahead", [False, True], ids=["claim", "claim-ahead"])
def test_a_claim_retried_after_its_reply_was_lost_is_applied_once(rb, queue_name, ahead):
    """The claim script ran but its reply was lost: confirm() failed, the job thread stopped, and the job sat
    running with a Started event under a claim nobody held until the visibility timeout, then ran again as
    delivery 2 (one of max_deliveries spent on a network blip)."""
    q = rb.queue()
    job = q.enqueue(spec())
    script, replies = q._claim, []

    def reply_lost_once(*args, **kw):
        replies.append(script(*args, **kw))
        if len(replies) == 1:
            raise redis.ConnectionError("connection reset while reading the reply")
        return replies[-1]

    q._claim = reply_lost_once
    if ahead:
        c, confirm = q.claim_ahead("w", MODELS, block_s=2)
        assert confirm()
    else:
        c = q.claim("w", MODELS, block_s=2, start=True)
    assert c is not None and (c.delivery, c.started, c.resumed) == (1, True, False)
    assert len(replies) == 2 and q.get(job.id).deliveries == 1
    assert [type(e).__name__ for _, e in q.events(job.id)] == ["Queued", "Started"]
    assert q.heartbeat(c)
    assert q.finish(c, Completed(b"png", "{}"))


@pytest.mark.parametrize("applied", [True, False], ids=["ran-reply-lost", "never-ran"])
def test_a_claim_retried_after_another_worker_reclaimed_the_job_leaves_it_to_that_worker(rb, applied):
    """The blip outlasted the visibility timeout and worker B reclaimed the entry before A's retry got through:
    the retry took the job from B (whose heartbeats then failed), wrote another Started, spent another delivery,
    and with max_deliveries reached dead-lettered a job B was running."""
    a = rb.queue(visibility_timeout_s=0.6, max_deliveries=2)
    b = rb.replica(a)
    job = a.enqueue(spec())
    script, calls, by_b = a._claim, [], []

    def blip(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            if applied:
                script(*args, **kw)  # it ran; the reply is lost
            raise redis.ConnectionError("the reply was lost")
        if not by_b:  # the blip lasts past the visibility timeout: B reclaims meanwhile
            time.sleep(0.7)
            by_b.append(b.claim("B", MODELS, block_s=1.0, start=True))
        return script(*args, **kw)

    a._claim = blip
    assert a.claim("A", MODELS, block_s=1.0, start=True) is None
    [cb] = by_b
    assert cb is not None and b.heartbeat(cb)
    rec = a.get(job.id)
    assert (rec.state, rec.worker, rec.deliveries) == ("running", "B", cb.delivery)
    assert [type(e).__name__ for _, e in a.events(job.id)].count("Started") == cb.delivery
    assert b.finish(cb, Completed(b"png", "{}"))


def _lag(r, queue_name: str) -> tuple[int | None, int]:
    """The consumer group's (lag, pending) as KEDA's redis-streams trigger reads them (XINFO GROUPS)."""
    from difflens.queue.redis_work import GROUP, work_stream

    (group,) = [g for g in r.xinfo_groups(work_stream(queue_name, MODEL)) if g["name"] == GROUP.encode()]
    return group.get("lag"), int(group["pending"])


def test_the_groups_lag_stays_defined_through_cancels_expiry_and_out_of_order_ends(rb, r, queue_name):
    """KEDA's lag trigger reads XINFO GROUPS' lag, and Redis reports NULL there (KEDA: 0) once an entry ahead of the
    group's last delivered one is deleted: a pool at zero would never wake. The work stream is only trimmed from its
    head, so the lag counts the entries not yet delivered, whatever ended meanwhile."""
    if tuple(int(x) for x in r.info("server")["redis_version"].split(".")[:2]) < (7, 0):
        pytest.skip("XINFO GROUPS reports a lag from Redis 7.0 (this server is older)")
    q = rb.queue(**FAST)
    q.prepare(MODELS)  # as the front does at start-up: the group exists before any worker reads
    jobs = [q.enqueue(spec(f"job {i}")) for i in range(5)]
    expiring = q.enqueue(spec("expiring", deadline=time.time() + 0.2))
    last = q.enqueue(spec("last"))
    assert _lag(r, queue_name) == (7, 0)
    q.cancel(jobs[2].id)  # a queued job in the middle of the backlog
    assert wait_until(lambda: q.expire_overdue(MODEL)) == 1  # and one whose deadline passed (0.2 s) while queued
    assert _lag(r, queue_name) == (7, 0)  # the ended ones still count until a worker's read drops them
    first, second = q.claim("w1", MODELS, block_s=1), q.claim("w2", MODELS, block_s=1)
    assert (first.job_id, second.job_id) == (jobs[0].id, jobs[1].id)
    assert _lag(r, queue_name) == (5, 2)
    assert q.finish(second, Completed(b"png", "{}"))  # ends before the job delivered ahead of it
    assert _lag(r, queue_name) == (5, 1)
    third = q.claim("w2", MODELS, block_s=1)  # the cancelled entry is delivered, dropped, and the next job taken
    assert third.job_id == jobs[3].id
    assert _lag(r, queue_name) == (3, 2)
    for c in (first, third):
        assert q.finish(c, Completed(b"png", "{}"))
    rest = [q.claim("w1", MODELS, block_s=1) for _ in range(2)]  # jobs[4], then (past the expired one) last
    assert [c.job_id for c in rest] == [jobs[4].id, last.id]
    for c in rest:
        assert q.finish(c, Completed(b"png", "{}"))
    assert _lag(r, queue_name) == (0, 0)
    assert r.xlen(f"{queue_name}:work:{MODEL}") == 0  # nothing left behind: trimmed from the head
    assert r.xinfo_stream(f"{queue_name}:work:{MODEL}")["max-deleted-entry-id"] == b"0-0"  # and never XDEL'ed
    assert expiring.id not in [c.job_id for c in rest]
