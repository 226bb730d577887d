"""The gRPC front's hot queue calls (enqueue, get, events, take_token) on redis.asyncio:
RedisStreamsQueue.async_front().

Same scripts, keys and semantics as the blocking calls of redis_streams.RedisStreamsQueue, whose key layout and
reply decoding it shares; what it saves is a thread hop per call (and with it most of the front's CPU per event).
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from difflens.jobs import Event, JobRecord, JobSpec
from difflens.queue import redis_lua as lua
from difflens.queue import redis_scripts as scripts
from difflens.queue.base import JobNotFound
from difflens.queue.common import new_job_id
from difflens.queue.redis_streams import (
    TERMINAL_STATES,
    RedisStreamsQueue,
    decode_events,
    is_waiting,
    record_from_hash,
)

# Connections beyond the streams' blocking reads, for the front's other calls (enqueue, get, a stream's first read).
OTHER_CONNECTIONS = 64


class AsyncRedisFront:
    """What the gRPC front does on the queue, as coroutines on one redis.asyncio client: enqueue, get, events.
    Same scripts, keys and semantics as RedisStreamsQueue's blocking calls (it borrows them from `queue`); what
    it saves is the thread hop per call (and with it, most of the front's CPU time per event).

    `streams`: the most job streams the front follows at once; each holds a connection during its blocking read.
    The pool has that many plus OTHER_CONNECTIONS, and a call that finds them all in use waits for one (redis-py's
    default pool instead has 100 and fails the 101st call at once, as if Redis could not be reached).
    """

    def __init__(self, queue: RedisStreamsQueue, url: str, streams: int) -> None:
        self._q = queue
        # One retry on a fresh connection when a pooled one turns out dead: after a Redis restart every connection
        # the pool held would otherwise fail one later call each with UNAVAILABLE (up to the front's peak
        # concurrency). Safe for every call made here: reads, and the enqueue script, which a retry with the same
        # job id finds already done.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=streams + OTHER_CONNECTIONS, timeout=None,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)), **queue.options)
        self._r: Any = redis.asyncio.Redis(connection_pool=pool)
        self._enqueue = self._r.register_script(lua.ENQUEUE)
        self._take_token = self._r.register_script(lua.TAKE_TOKEN)

    async def enqueue(self, spec: JobSpec, max_in_flight: int = 0) -> JobRecord:
        job_id, now = new_job_id(), time.time()
        reply = await self._q._enqueue_call(spec, job_id, now, max_in_flight).run_async(self._enqueue)
        if reply.outcome == "existing":
            return await self.get(reply.job_id)
        return self._q._enqueued(spec, job_id, now, reply, max_in_flight)

    async def take_token(self, bucket: str, rate_per_s: float, burst: int) -> float:
        if rate_per_s <= 0:
            return 0.0
        call = scripts.take_token(self._q._rate_key(bucket), rate_per_s=rate_per_s, burst=burst)
        return (await call.run_async(self._take_token)).wait_s

    async def get(self, job_id: str) -> JobRecord:
        h = await self._r.hgetall(self._q._job_prefix + job_id)
        rank = await self._r.zrank(self._q._waiting_of(h), job_id) if is_waiting(h) else None
        return record_from_hash(job_id, h, rank)

    async def events(self, job_id: str, after: int = -1, block_s: float = 0.0,
                     live: bool = False) -> list[tuple[int, Event]]:
        key, start = self._q._events_from(job_id, after)
        if live and block_s > 0:
            # The caller saw event `after` and it was not terminal, so everything still to come (the terminal
            # event included) is newer than it: the blocking read alone is exact, one round trip per batch.
            found = await self._r.xread({key: start}, block=max(1, int(block_s * 1000)))
            if found:
                return decode_events(found)
            block_s = 0.0  # nothing in time: read the state (the job may have expired) as below
        # The events and the state in one round trip; then, only for a live job with nothing new, the blocking read.
        # Not a MULTI: Redis refuses every MULTI while it is out of memory (maxmemory), and a full Redis must still
        # serve the jobs it holds. So another client's script may run between the two reads, as in the blocking
        # version: a job found ended with nothing read ended in between, and its events are read again.
        pipe = self._r.pipeline(transaction=False)
        pipe.xread({key: start})
        pipe.hget(self._q._job_prefix + job_id, "state")
        found, state = await pipe.execute()
        if not found:
            if state is None:
                raise JobNotFound(job_id)
            if state in TERMINAL_STATES:
                found = await self._r.xread({key: start})
            elif block_s > 0:
                found = await self._r.xread({key: start}, block=max(1, int(block_s * 1000)))
        return decode_events(found)

    async def close(self) -> None:
        await self._r.aclose(close_connection_pool=True)  # a pool handed in is not closed otherwise
