"""Two Worker objects side by side on one real Redis Streams queue."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from difflens.jobs import Completed, Started, Step
from tests.worker.helpers import settings, solo, spec, wait_terminal


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
    assert front.depth() == 0
    front.close()
