"""The typed calls of the queue's Lua scripts (queue/redis_scripts.py) against a real Redis: every reply shape each
script gives, success and refusal, decoded into its named fields."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio

from difflens.config import ServiceSettings
from difflens.job_codec import encode_event
from difflens.jobs import Completed, Failed, Progress
from difflens.queue import redis_scripts as scripts
from difflens.queue.base import Published
from difflens.queue.common import new_job_id, new_token
from difflens.queue.redis_streams import RedisStreamsQueue
from difflens.queue.redis_work import GROUP
from tests.queue.conftest import FAST, MODEL, MODELS, spec

CANCELLED = encode_event(Failed("CANCELLED", "cancelled"))


@pytest.fixture
def q(redis_url, queue_name) -> Iterator[RedisStreamsQueue]:
    queue = RedisStreamsQueue(redis_url, ServiceSettings(queue_name=queue_name, max_queue_depth=2, **FAST))
    yield queue
    queue.close()


@pytest.fixture
def r(redis_url) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def delivered(q: RedisStreamsQueue, worker: str = "w") -> tuple[str, bytes]:
    """(job id, work entry id) of the next new work entry, delivered to `worker` (its claim script not run)."""
    q.prepare(MODELS)
    entry = q._work.read_group(worker, [q._work.prefix + MODEL], None)
    assert entry is not None
    return entry.job_id, entry.entry_id


def claim_call(q: RedisStreamsQueue, job_id: str, entry_id: bytes, token: str, worker: str = "w",
               start: bool = True) -> scripts.Call[scripts.Claimed | None]:
    return scripts.claim(q._keys(job_id, MODEL), entry_id=entry_id, group=GROUP, token=token, worker=worker,
                         now=time.time(), ttl_ms=60_000, job_id=job_id, start=start, max_deliveries=2)


def publish_call(q: RedisStreamsQueue, job_id: str, token: str, seq: int | None = None) -> scripts.Call:
    return scripts.publish(q._keys(job_id, MODEL), token=token, event=encode_event(Progress(0, 999, 2)),
                           started=False, now=time.time(), ttl_ms=60_000, write_id=new_token(), seq=seq)


def finish_call(q: RedisStreamsQueue, job_id: str, token: str, seq: int | None = None,
                write_id: str | None = None) -> scripts.Call:
    return scripts.finish(q._keys(job_id, MODEL), q._dead, token=token, event=encode_event(Completed(b"png", "{}")),
                          state="completed", error="", now=time.time(), ttl_ms=60_000, group=GROUP, job_id=job_id,
                          dead_letter=False, dead_maxlen=10, write_id=write_id or new_token(), seq=seq)


def cancel_call(q: RedisStreamsQueue, job_id: str) -> scripts.Call[scripts.Cancelled]:
    return scripts.cancel(q._keys(job_id, MODEL), cancelled_event=CANCELLED, cancelled_error="CANCELLED: x",
                          now=time.time(), ttl_ms=60_000, group=GROUP, job_id=job_id, channel=q._cancel_channel)


def running(q: RedisStreamsQueue) -> tuple[str, str]:
    """(job id, token) of a job queued and claimed (started) by worker w."""
    q.enqueue(spec())
    job_id, entry_id = delivered(q)
    token = new_token()
    assert claim_call(q, job_id, entry_id, token).run(q._claim) is not None
    return job_id, token


def test_enqueue_answers_new_with_the_position_and_existing_for_a_retry(q):
    first = q._enqueue_call(spec(), "job-a", time.time())
    assert first.run(q._enqueue) == scripts.Enqueued("new", position=0)
    assert q._enqueue_call(spec(), "job-b", time.time()).run(q._enqueue) == scripts.Enqueued("new", position=1)
    assert first.run(q._enqueue) == scripts.Enqueued("existing", job_id="job-a")  # the same call again


def test_enqueue_answers_existing_and_conflict_for_an_idempotency_key(q):
    made = q.enqueue(spec("a", idempotency_key="k"))
    again = q._enqueue_call(spec("a", idempotency_key="k"), new_job_id(), time.time()).run(q._enqueue)
    assert again == scripts.Enqueued("existing", job_id=made.id)
    other = q._enqueue_call(spec("b", idempotency_key="k"), new_job_id(), time.time()).run(q._enqueue)
    assert other == scripts.Enqueued("conflict", job_id=made.id)


def test_enqueue_refuses_full_with_the_depth_and_busy_with_the_tenants_jobs(q):
    assert q._enqueue_call(spec(tenant="t"), new_job_id(), time.time(), 1).run(q._enqueue).outcome == "new"
    busy = q._enqueue_call(spec(tenant="t"), new_job_id(), time.time(), 1).run(q._enqueue)
    assert busy == scripts.Enqueued("busy", in_flight=1)
    q.enqueue(spec())
    full = q._enqueue_call(spec(), new_job_id(), time.time()).run(q._enqueue)
    assert full == scripts.Enqueued("full", depth=2)  # max_queue_depth


def test_claim_answers_the_claim_in_named_fields_and_the_same_for_a_retry(q):
    queued = q.enqueue(spec("claimed"))
    job_id, entry_id = delivered(q)
    token = new_token()
    got = claim_call(q, job_id, entry_id, token).run(q._claim)
    assert got is not None and job_id == queued.id
    assert (got.deliveries, got.cancel, got.started, got.resumed, got.seq) == (1, False, True, False, 2)
    assert b'"claimed"' in got.spec_json and got.created_at == pytest.approx(queued.created_at)
    assert claim_call(q, job_id, entry_id, token).run(q._claim) == got  # nothing applied twice
    assert q.get(job_id).deliveries == 1


def test_claim_without_start_leaves_the_job_unstarted(q):
    q.enqueue(spec())
    job_id, entry_id = delivered(q)
    got = claim_call(q, job_id, entry_id, new_token(), start=False).run(q._claim)
    assert got is not None and (got.started, got.seq) == (False, 1)


def test_claim_refuses_an_entry_of_another_worker_and_a_stale_one(q):
    q.enqueue(spec())
    job_id, entry_id = delivered(q, worker="w")
    assert claim_call(q, job_id, entry_id, new_token(), worker="other").run(q._claim) is None
    assert cancel_call(q, job_id).run(q._cancel).outcome == "cancelled"
    assert claim_call(q, job_id, entry_id, new_token(), worker="w").run(q._claim) is None  # the job ended


def test_publish_answers_written_cancel_requested_lost_and_out_of_step(q):
    job_id, token = running(q)  # events: Queued, Started
    ok = publish_call(q, job_id, token, seq=3).run(q._publish)
    assert ok == scripts.WriteReply(written=True) and ok.published is Published.OK
    behind = publish_call(q, job_id, token, seq=3).run(q._publish)  # the stream has 3 events: 3 is not next
    assert behind == scripts.WriteReply(written=False, out_of_step=True) and behind.published is Published.LOST
    lost = publish_call(q, job_id, "not-the-token").run(q._publish)
    assert lost == scripts.WriteReply(written=False) and lost.published is Published.LOST
    assert cancel_call(q, job_id).run(q._cancel).outcome == "flagged"
    flagged = publish_call(q, job_id, token).run(q._publish)
    assert flagged == scripts.WriteReply(written=True, cancel_requested=True)
    assert flagged.published is Published.CANCEL_REQUESTED


def test_finish_answers_written_once_and_then_lost_and_out_of_step(q):
    job_id, token = running(q)
    assert finish_call(q, job_id, token, seq=9).run(q._finish) == scripts.WriteReply(False, out_of_step=True)
    write_id = new_token()
    assert finish_call(q, job_id, token, write_id=write_id).run(q._finish) == scripts.WriteReply(True)
    assert finish_call(q, job_id, token, write_id=write_id).run(q._finish) == scripts.WriteReply(True)  # a retry
    assert finish_call(q, job_id, token).run(q._finish) == scripts.WriteReply(False)  # a second finish
    assert q.get(job_id).state == "completed"


def test_heartbeat_answers_held_with_the_cancel_flag_and_lost(q):
    job_id, token = running(q)
    keys = q._keys(job_id, MODEL)

    def beat(t: str) -> scripts.Held:
        return scripts.heartbeat(keys, token=t, now=time.time(), ttl_ms=60_000, group=GROUP, worker="w").run(
            q._heartbeat)

    assert beat(token) == scripts.Held(held=True)
    assert beat("not-the-token") == scripts.Held(held=False)
    cancel_call(q, job_id).run(q._cancel)
    assert beat(token) == scripts.Held(held=True, cancel_flag=True)


def hand_back_call(q: RedisStreamsQueue, job_id: str, token: str) -> scripts.Call[scripts.Held]:
    return scripts.hand_back(q._keys(job_id, MODEL), token=token, now=time.time(), ttl_ms=60_000, group=GROUP,
                             worker="w", idle_ms=300, job_id=job_id, cancelled_event=CANCELLED,
                             cancelled_error="CANCELLED: x")


def test_hand_back_answers_queued_again_cancelled_instead_and_lost(q):
    job_id, token = running(q)
    assert hand_back_call(q, job_id, "not-the-token").run(q._hand_back) == scripts.Held(held=False)
    assert hand_back_call(q, job_id, token).run(q._hand_back) == scripts.Held(held=True)
    assert q.get(job_id).state == "queued"
    other, other_token = running(q)
    cancel_call(q, other).run(q._cancel)
    assert hand_back_call(q, other, other_token).run(q._hand_back) == scripts.Held(held=True, cancel_flag=True)
    assert q.get(other).state == "cancelled"


def test_cancel_answers_unknown_cancelled_ended_and_flagged(q):
    assert cancel_call(q, "no-such-job").run(q._cancel) == scripts.Cancelled("unknown")
    job_id, _ = running(q)
    assert cancel_call(q, job_id).run(q._cancel) == scripts.Cancelled("flagged")
    queued = q.enqueue(spec())
    assert cancel_call(q, queued.id).run(q._cancel) == scripts.Cancelled("cancelled")
    assert cancel_call(q, queued.id).run(q._cancel) == scripts.Cancelled("ended")


def test_delete_answers_busy_deleted_and_gone(q):
    queued = q.enqueue(spec())
    job = q._job_prefix + queued.id

    def delete() -> scripts.Deleted:
        return scripts.delete(job, job + ":events", job_id=queued.id).run(q._delete)

    assert delete() == scripts.Deleted("busy", "queued")
    q.cancel(queued.id)
    assert delete() == scripts.Deleted("deleted", "cancelled")
    assert delete() == scripts.Deleted("gone", "")


def test_expire_queued_answers_how_many_it_failed(q):
    q.enqueue(spec("due", deadline=time.time() - 1))
    q.enqueue(spec("not due", deadline=time.time() + 60))

    def expire() -> scripts.Expired:
        return scripts.expire_queued(q._waiting_prefix + MODEL, q._deadlines_prefix + MODEL, q._work.prefix + MODEL,
                                     now=time.time(), ttl_ms=60_000, job_prefix=q._job_prefix,
                                     overdue_event=encode_event(q._overdue), overdue_error="DEADLINE_EXCEEDED: x",
                                     limit=10, group=GROUP).run(q._expire)

    assert expire() == scripts.Expired(failed=1)
    assert expire() == scripts.Expired(failed=0)


def test_take_token_answers_no_wait_then_the_wait_for_the_next(q):
    bucket = q._rate_key("t")
    assert scripts.take_token(bucket, rate_per_s=1.0, burst=1).run(q._take_token) == scripts.Token(wait_s=0.0)
    wait = scripts.take_token(bucket, rate_per_s=1.0, burst=1).run(q._take_token).wait_s
    assert 0.0 < wait <= 1.0


def test_forget_consumers_deletes_only_those_holding_nothing(q, r):
    q.enqueue(spec())
    delivered(q, worker="holder")  # holds a pending entry
    q._work.read_group("idle", [q._work.prefix + MODEL], None)  # nothing left: a consumer holding nothing
    stream = q._work.prefix + MODEL
    call = scripts.forget_consumers(stream, GROUP, ["holder", "idle"])
    assert call.run(q._work._forget) == scripts.Forgotten(gone=1)
    assert [c["name"] for c in r.xinfo_consumers(stream, GROUP)] == [b"holder"]
    assert call.run(q._work._forget) == scripts.Forgotten(gone=1)  # "idle" is still gone; "holder" still holds
    assert [c["name"] for c in r.xinfo_consumers(stream, GROUP)] == [b"holder"]


def test_the_asyncio_path_runs_the_same_calls_to_the_same_answers(q, redis_url):
    async def front() -> tuple[scripts.Enqueued, scripts.Enqueued, scripts.Token]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            enqueue = client.register_script(scripts_text("ENQUEUE"))
            take = client.register_script(scripts_text("TAKE_TOKEN"))
            call = q._enqueue_call(spec(), "async-job", time.time())
            new, again = await call.run_async(enqueue), await call.run_async(enqueue)
            token = await scripts.take_token(q._rate_key("a"), rate_per_s=1.0, burst=1).run_async(take)
            return new, again, token
        finally:
            await client.aclose()

    new, again, token = asyncio.run(front())
    assert new == scripts.Enqueued("new", position=0)
    assert again == scripts.Enqueued("existing", job_id="async-job")
    assert token == scripts.Token(wait_s=0.0)
    assert q.get("async-job").state == "queued"


def scripts_text(name: str) -> str:
    from difflens.queue import redis_lua

    return getattr(redis_lua, name)


@pytest.mark.parametrize(("call", "reply"), [
    (scripts.publish(scripts.JobKeys("j", "e", "w", "q", "d"), token="t", event=b"", started=False, now=0.0,
                     ttl_ms=1, write_id="x", seq=None), 4),
    (scripts.heartbeat(scripts.JobKeys("j", "e", "w", "q", "d"), token="t", now=0.0, ttl_ms=1, group="g",
                       worker="w"), -1),
    (scripts.cancel(scripts.JobKeys("j", "e", "w", "q", "d"), cancelled_event=b"", cancelled_error="", now=0.0,
                    ttl_ms=1, group="g", job_id="j", channel="c"), 3),
    (scripts.delete("j", "e", job_id="j"), [b"what", b""]),
])
def test_a_reply_no_script_gives_is_refused_naming_it(call, reply):
    with pytest.raises(ValueError, match="script answered"):
        call.decode(reply)
