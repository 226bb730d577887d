"""bench.latency_proxy (bench.service --redis-delay-ms): a real Redis reached through it answers correctly, in
order, and each round trip waits the delay both ways."""

from __future__ import annotations

import time

import redis

from bench.service import delayed


def test_redis_through_the_delay_proxy_is_intact_and_delayed(redis_url, queue_name):
    with delayed(redis_url, 25.0) as url:
        assert url != redis_url
        r = redis.Redis.from_url(url)
        try:
            r.ping()  # connect
            t0 = time.perf_counter()
            assert r.ping()
            assert time.perf_counter() - t0 >= 0.050  # 25 ms there, 25 ms back
            big = bytes(range(256)) * 8192  # 2 MiB: many chunks, which must keep their order
            pipe = r.pipeline(transaction=False)
            for i in range(3):
                pipe.set(f"{queue_name}:{i}", big[i:] + big[:i])
            pipe.execute()
            assert [r.get(f"{queue_name}:{i}") for i in range(3)] == [big[i:] + big[:i] for i in range(3)]
            r.delete(*(f"{queue_name}:{i}" for i in range(3)))
        finally:
            r.close()


def test_no_delay_means_the_redis_url_itself(redis_url):
    with delayed(redis_url, 0.0) as url:
        assert url == redis_url
