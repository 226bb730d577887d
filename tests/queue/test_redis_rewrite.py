"""Redis losing acknowledged writes: what a host crash takes from an append-only file fsynced every second. The
private Redis's file is cut back to a mark taken after a known write (PrivateRedis.kill(lose_after=)), which is
exactly what such a crash leaves; then the queue's promises are checked on what Redis replays."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from difflens.config import ServiceSettings
from difflens.jobs import Completed, Progress, Queued, Started
from difflens.queue.base import Published
from difflens.queue.redis_rewrite import ClaimWrites
from difflens.queue.redis_streams import RedisStreamsQueue
from tests.queue.conftest import MODELS, spec
from tests.support.redis_server import PrivateRedis


@pytest.fixture(scope="module")
def server():
    with PrivateRedis(appendonly=True) as s:
        yield s


@pytest.fixture
def queue(server, queue_name):
    made: list[RedisStreamsQueue] = []

    def make(**overrides: object) -> RedisStreamsQueue:
        settings = replace(ServiceSettings(queue_name=queue_name, visibility_timeout_s=5.0,
                                           heartbeat_interval_s=0.5), **overrides)  # type: ignore[arg-type]
        made.append(RedisStreamsQueue(server.url, settings))
        return made[-1]

    yield make
    for q in made:
        q.close()


def crash(server: PrivateRedis, mark: dict) -> None:
    """The host goes down with what Redis wrote after `mark` not yet on disk, and Redis starts again on its file."""
    server.kill(lose_after=mark)
    server.start()


def steps(n: int, start: int = 0) -> list[Progress]:
    return [Progress(index=i, timestep=1000 - 10 * i, num_steps=20) for i in range(start, start + n)]


def test_a_claim_writes_its_lost_events_again_at_their_sequences(server, queue):
    """The holder's events 2 and 3 were acknowledged, then lost: its next event finds the stream out of step, and
    the lost ones are written again first, so a client that saw sequence 5 resumes after it and misses nothing."""
    q = queue()
    job = q.enqueue(spec())
    claim = q.claim("w", MODELS, block_s=2, start=True)
    assert claim is not None and claim.started
    first, lost, after = steps(2), steps(2, 2), steps(1, 4)
    for event in first:
        assert q.publish(claim, event) == Published.OK
    mark = server.aof_mark()
    for event in lost:
        assert q.publish(claim, event) == Published.OK
    seen = q.events(job.id)  # what a client had received
    crash(server, mark)
    assert [e for _, e in q.events(job.id)] == [Queued(0), Started("w", 1), *first]  # the loss is real
    assert q.publish(claim, after[0]) == Published.OK
    assert q.events(job.id) == [*seen, (6, after[0])]
    assert q.finish(claim, Completed(b"png", "{}"))
    assert [e for _, e in q.events(job.id, after=6)] == [Completed(b"png", "{}")]
    assert q.get(job.id).state == "completed"


def test_a_lost_terminal_event_runs_the_job_again_and_it_ends_once(server, queue):
    """The finish was acknowledged, then lost, and the worker has forgotten the job: it is running again as far as
    Redis knows, without heartbeats, so another worker reclaims it after the visibility timeout and ends it. Its
    stream ends with one terminal event, after the second delivery's Started."""
    q = queue(visibility_timeout_s=0.5, heartbeat_interval_s=0.1)
    job = q.enqueue(spec())
    claim = q.claim("w1", MODELS, block_s=2, start=True)
    for event in steps(2):
        q.publish(claim, event)
    mark = server.aof_mark()
    assert q.finish(claim, Completed(b"first", "{}"))
    crash(server, mark)
    assert q.get(job.id).state == "running"
    again = None
    end = time.monotonic() + 30
    while again is None and time.monotonic() < end:
        again = q.claim("w2", MODELS, block_s=0.5, start=True)
    assert again is not None and again.job_id == job.id and again.resumed and again.delivery == 2
    assert q.finish(again, Completed(b"second", "{}"))
    events = [e for _, e in q.events(job.id)]
    assert events == [Queued(0), Started("w1", 1), *steps(2), Started("w2", 2), Completed(b"second", "{}")]


def test_a_lost_claim_stops_its_holder_and_the_job_is_delivered_again(server, queue):
    """Everything after the enqueue was lost, the claim included: the holder's next write is refused (it stops
    without a word), and the job, queued again as Redis knows it, runs as a first delivery."""
    q = queue()
    job = q.enqueue(spec())
    mark = server.aof_mark()
    claim = q.claim("w1", MODELS, block_s=2, start=True)
    q.publish(claim, steps(1)[0])
    crash(server, mark)
    assert q.publish(claim, steps(1, 1)[0]) == Published.LOST
    again = q.claim("w2", MODELS, block_s=2, start=True)
    assert again is not None and (again.job_id, again.delivery, again.resumed) == (job.id, 1, False)
    assert [e for _, e in q.events(job.id)] == [Queued(0), Started("w2", 1)]


def test_a_loss_further_back_than_what_a_claim_keeps_cannot_be_written_again():
    writes = ClaimWrites(keep_bytes=4)
    writes.begin("t", 1)
    for seq in (2, 3):
        assert writes.next_seq("t") == seq
        writes.wrote("t", seq, b"ab", False)
    assert [w.seq for w in writes.lost("t", 1) or []] == [2, 3]
    writes.wrote("t", 4, b"cd", False)  # 6 bytes: the oldest goes
    assert writes.lost("t", 1) is None  # 2 is gone: the claim cannot repair the stream
    assert [w.seq for w in writes.lost("t", 2) or []] == [3, 4]
    writes.wrote("t", 5, b"a larger one", False)  # the latest is kept whatever its size
    assert [w.seq for w in writes.lost("t", 4) or []] == [5]
    assert writes.lost("t", 5) is None  # not behind at all
    writes.end("t")
    assert writes.next_seq("t") is None
