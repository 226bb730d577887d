"""Two Worker objects side by side on one real Redis Streams queue."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
from PIL import Image

from difflens.jobs import Completed, Failed, JobSpec, Started, Step
from tests.support.waiting import wait_until
from tests.worker.helpers import MODEL, settings, solo, spec, wait_for, wait_terminal


def test_two_workers_share_a_redis_queue(make_worker, tiny_dir, tiny_model, redis_url, queue_name):
    from difflens.queue.redis_streams import RedisStreamsQueue

    s = settings(tiny_dir, queue_name=queue_name, worker_max_jobs=1)
    front = RedisStreamsQueue(redis_url, s)
    jobs = [spec(f"a {c} circle", seed=k, steps=2, masks=4) for k, c in enumerate(("red", "blue", "green", "pink"))]
    ids = [front.enqueue(j).id for j in jobs]
    # Each worker has its own connection, as separate processes would.
    make_worker(s, RedisStreamsQueue(redis_url, s), name="redis-a")
    make_worker(s, RedisStreamsQueue(redis_url, s), name="redis-b")
    workers = set()
    for job, job_id in zip(jobs, ids, strict=True):
        events = wait_terminal(front, job_id)
        started = [e for e in events if isinstance(e, Started)]
        assert len(started) == 1
        workers.add(started[0].worker)
        assert [e.index for e in events if isinstance(e, Step)] == [0, 1]
        done = events[-1]
        assert isinstance(done, Completed)
        image = np.asarray(Image.open(io.BytesIO(done.image_png)).convert("RGB"))
        np.testing.assert_array_equal(image, solo(tiny_model, job).image)
        assert front.get(job_id).state == "completed"
    assert workers == {"redis-a", "redis-b"}  # one job at a time each: both had to work
    assert front.depth(MODEL) == 0
    front.close()


def test_workers_of_different_models_on_one_redis_take_only_their_own_jobs(make_worker, tiny_dir, redis_url,
                                                                           queue_name):
    """A fleet whose workers serve different models shares one Redis. Before work streams were per model, a job
    went to whichever worker read it first, and one without its model failed it INVALID_ARGUMENT."""
    from difflens.queue.redis_streams import RedisStreamsQueue

    other = "tiny-copy"
    front = RedisStreamsQueue(redis_url, settings(tiny_dir, queue_name=queue_name))
    jobs = [replace(spec(f"a {c} circle", seed=k, steps=2, masks=4), model=m)
            for k, (c, m) in enumerate(zip(("red", "blue", "green", "pink"), (MODEL, other, other, MODEL),
                                           strict=True))]
    ids = [front.enqueue(j).id for j in jobs]
    for name, model in (("serves-tiny", MODEL), ("serves-copy", other)):
        s = settings(tiny_dir, queue_name=queue_name, models=((model, str(tiny_dir)),), worker_max_jobs=1)
        make_worker(s, RedisStreamsQueue(redis_url, s), name=name, models=(model,))
    for job, job_id in zip(jobs, ids, strict=True):
        events = wait_terminal(front, job_id)
        assert isinstance(events[-1], Completed), events[-1]
        started = [e.worker for e in events if isinstance(e, Started)]
        assert started == ["serves-tiny" if job.model == MODEL else "serves-copy"]
    assert front.depth(MODEL) == front.depth(other) == 0
    assert front.live_workers(MODEL) == front.live_workers(other) == 1  # each announced its own model only
    front.close()


def test_a_job_whose_deadline_passed_in_the_queue_is_not_logged_as_lost_to_another_worker(make_worker, tiny_dir,
                                                                                          redis_url, queue_name,
                                                                                          caplog):
    """A worker starts on a new job before its claim settles; when the claim script fails the job instead (its
    deadline passed while it waited), the worker stops, and its log said the job was lost to another worker."""
    import logging
    import time

    from difflens.queue.redis_streams import RedisStreamsQueue

    s = settings(tiny_dir, queue_name=queue_name)
    front = RedisStreamsQueue(redis_url, s)
    job_id = front.enqueue(replace(spec(steps=2, masks=4), deadline=time.time() - 1)).id  # passed while it waited
    with caplog.at_level(logging.INFO, logger="difflens.worker.job"):
        make_worker(s, RedisStreamsQueue(redis_url, s), name="late")
        events = wait_terminal(front, job_id)
        # the job thread logs once it notices, after the queue failed the job
        wait_until(lambda: any(job_id in r.getMessage() for r in caplog.records), 60, 0.05, "the job's log line")
    assert isinstance(events[-1], Failed) and events[-1].code == "DEADLINE_EXCEEDED"
    said = [r.getMessage() for r in caplog.records if job_id in r.getMessage()]
    assert any("not taken after all" in m for m in said) and not any("another worker" in m for m in said), said
    front.close()


def test_a_cancel_reaches_the_worker_over_the_channel_without_a_read_per_step(make_worker, tiny_dir, redis_url,
                                                                             queue_name):
    """Between explained steps the worker checks for a cancel before every denoising step. On Redis the check is
    answered by the cancel channel the worker's queue subscribes to, not by a read of the flag per step; a cancel
    from another front still stops the job before its next explained step."""
    from dataclasses import replace

    from difflens.engine.options import StepSelector
    from difflens.jobs import Failed
    from difflens.queue.redis_streams import RedisStreamsQueue

    s = settings(tiny_dir, queue_name=queue_name, worker_max_jobs=1)
    front, worker_queue = RedisStreamsQueue(redis_url, s), RedisStreamsQueue(redis_url, s)
    reads = []
    read_flag = worker_queue.cancel_requested
    worker_queue.cancel_requested = lambda job_id: reads.append(job_id) or read_flag(job_id)  # type: ignore[method-assign]
    make_worker(s, worker_queue, name="redis-signal")

    def every_tenth(steps: int) -> JobSpec:
        job = spec(steps=steps, masks=4)
        return replace(job, explain=replace(job.explain, steps=StepSelector("every", every=10)))

    done = wait_terminal(front, front.enqueue(every_tenth(12)).id)
    assert isinstance(done[-1], Completed) and [e.index for e in done if isinstance(e, Step)] == [0, 10]
    assert reads == []  # 12 checks, none of them a read

    job_id = front.enqueue(every_tenth(400)).id
    wait_for(front, job_id, Step)
    front.cancel(job_id)
    events = wait_terminal(front, job_id)
    assert events[-1] == Failed("CANCELLED", "cancelled by the caller")
    assert [e.index for e in events if isinstance(e, Step)] in ([0], [0, 10])
    assert reads == []
    front.close()


def test_a_worker_outlives_a_redis_restart_that_lost_every_key(make_worker, tiny_dir, queue_name, caplog):
    """Redis without persistence restarted (a pod rescheduled): every key is gone, the work stream's consumer group
    with them. The worker rides out the outage with one error record, not one per retry, makes the group again
    and runs the jobs queued since, with no restart of its own."""
    import logging
    import time

    from difflens.queue.redis_streams import RedisStreamsQueue
    from tests.support.redis_server import PrivateRedis

    caplog.set_level(logging.INFO)
    with PrivateRedis() as server:
        s = settings(tiny_dir, queue_name=queue_name, worker_max_jobs=1)
        front = RedisStreamsQueue(server.url, s)
        worker = make_worker(s, RedisStreamsQueue(server.url, s), name="restart")
        assert isinstance(wait_terminal(front, front.enqueue(spec(steps=1)).id)[-1], Completed)
        server.stop()
        time.sleep(3.0)  # the worker retries its claim every second meanwhile
        server.start()
        job_id = front.enqueue(spec("a blue square", steps=2)).id
        events = wait_terminal(front, job_id, timeout=60)
        assert [type(e) for e in events][-1] is Completed and front.get(job_id).state == "completed"
        worker.stop(timeout=60)
        front.close()
    mine = [r for r in caplog.records if r.name.startswith("difflens.")]
    failed = [r for r in mine if r.levelno >= logging.ERROR and "taking a job" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info, [r.getMessage() for r in failed]
    assert any("works again after" in r.getMessage() for r in mine)
    assert any("consumer group" in r.getMessage() and "made it again" in r.getMessage() for r in mine)
