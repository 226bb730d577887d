"""The front's domain layer (no protobuf): validate and enqueue, read, cancel and follow jobs, for the servicer.

The hot calls (enqueue, get, events) go through the queue's asyncio front when it has one (Redis: redis.asyncio,
no thread per call); otherwise, and for the rest (cancel, depth), the queue's blocking calls run on private
thread pools, so the event loop of the gRPC server never waits on them: one for the waits of the job streams
being followed (up to settings.max_streams of them, the most a front follows at once), one for everything else,
so that the waits never hold up a GetJob or a Submit. Following a job waits for events at most FOLLOW_BLOCK_S at
a time, so a cancelled call or a drain is noticed within that.

Tenants: with authentication on, every call names its caller's tenant, and a job of another tenant is, to it,
a job that does not exist (JobNotFound, word for word); `admit` takes a token of the tenant's request rate.
Without authentication (tenant None) every job is everyone's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from difflens import metrics
from difflens.auth.keys import Identity
from difflens.auth.settings import OTHER_TENANTS
from difflens.catalog import ModelCatalog
from difflens.config import ServiceSettings
from difflens.errors import NotReady, ResourceExhausted
from difflens.jobs import Event, JobRecord, JobSpec, Queued
from difflens.outage import Outage
from difflens.queue.base import AsyncFront, JobNotFound, JobQueue, is_terminal
from difflens.queue.common import TenantBusy, is_job_id
from difflens.validation import validate

log = logging.getLogger(__name__)

T = TypeVar("T")
FOLLOW_BLOCK_S = 0.5
DEPTH_SAMPLE_S = 1.0
QUEUE_THREADS = 64  # the queue's blocking calls other than the streams' waits (those have max_streams threads)
STREAMS_FULL_RETRY_S = 1.0


def _check_id(job_id: str) -> None:
    if not is_job_id(job_id):
        raise JobNotFound(job_id)


class Front:
    """What every RPC does, in domain terms. While `draining`, new submissions and new watches fail with NotReady
    (the client goes to another replica) and the streams already running go on; `wait_idle` waits for them."""

    def __init__(self, settings: ServiceSettings, queue: JobQueue, catalog: ModelCatalog) -> None:
        self.settings = settings
        self.queue = queue
        self.catalog = catalog
        self.draining = False
        self._active = 0  # calls submitting or following a job right now (see active())
        self._streams = 0  # job streams open now (see stream())
        self._idle = asyncio.Condition()
        self._pool = ThreadPoolExecutor(QUEUE_THREADS, thread_name_prefix="front-queue")
        self._async: AsyncFront | None = queue.async_front(settings.max_streams)
        # Without an asyncio front, each stream's wait for events holds a thread (threads start as needed)
        self._follow_pool = ThreadPoolExecutor(settings.max_streams, thread_name_prefix="front-follow") \
            if self._async is None else None
        # model -> (jobs waiting, live workers) as last sampled (sample_depth); ListModels reports it
        self.queue_stats: dict[str, tuple[int, int]] = {}

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _events(self, job_id: str, after: int, block_s: float, live: bool = False) -> list[tuple[int, Event]]:
        if self._async is not None:
            return await self._async.events(job_id, after, block_s, live)
        return await asyncio.get_running_loop().run_in_executor(self._follow_pool, self.queue.events, job_id, after,
                                                                block_s)

    @contextlib.asynccontextmanager
    async def stream(self, job_id: str | None = None) -> AsyncIterator[None]:
        """One job stream (Explain, WatchJob of `job_id`) for as long as it is followed. Refused, in this order:
        NotReady while draining (the client goes to another replica), JobNotFound for an id of another form, and
        ResourceExhausted when this front already follows settings.max_streams. An Explain takes it before it
        enqueues: a refused call queues nothing."""
        if self.draining:
            raise NotReady("this front is draining (shutting down); retry on another replica")
        if job_id is not None:
            _check_id(job_id)
        limit = self.settings.max_streams
        if self._streams >= limit:
            raise ResourceExhausted(
                f"this front is following {self._streams} job streams, its most at once (max_streams={limit}); "
                f"retry in {STREAMS_FULL_RETRY_S:g} s, or on another replica", retry_after_s=STREAMS_FULL_RETRY_S)
        self._streams += 1
        try:
            yield
        finally:
            self._streams -= 1

    @contextlib.asynccontextmanager
    async def active(self) -> AsyncIterator[None]:
        """A call in progress that drain must wait for (wait_idle): a submission whose enqueue is in flight, a
        stream following a job, or an Explain from its submit to its last event (the two must not leave a gap)."""
        self._active += 1
        try:
            yield
        finally:
            async with self._idle:
                self._active -= 1
                self._idle.notify_all()

    async def admit(self, caller: Identity) -> None:
        """Take a token of the caller's tenant's request rate (a bucket every front shares), else ResourceExhausted
        with the wait until one is there."""
        limits = caller.limits
        if limits.rate_per_s > 0:
            args = (caller.tenant, limits.rate_per_s, limits.burst)
            wait = (await self._async.take_token(*args) if self._async is not None else
                    await self._run(self.queue.take_token, *args))
            if wait > 0:
                self._count(caller.tenant, "rate_limited")
                raise ResourceExhausted(f"tenant {caller.tenant!r} is over its request rate ({limits.rate_per_s:g} "
                                        f"calls/s, bursts of {limits.burst}); retry in {wait:g} s",
                                        retry_after_s=wait)
        self._count(caller.tenant, "admitted")

    def _count(self, tenant: str, outcome: str) -> None:
        """difflens_tenant_calls_total: the tenant's own label only where --tenant-labels lists it, so the label's
        values stay a small known set however many tenants the key file holds."""
        label = tenant if tenant in self.settings.auth.tenant_labels else OTHER_TENANTS
        metrics.TENANT_CALLS.labels(label, outcome).inc()

    async def submit(self, spec: JobSpec, max_in_flight: int = 0) -> JobRecord:
        """Validate (InvalidArgument), then enqueue (ResourceExhausted when full, or when the spec's tenant has
        `max_in_flight` jobs queued or running; the existing job for a repeated idempotency key). Nothing is
        queued for an invalid spec."""
        if self.draining:
            raise NotReady("this front is draining (shutting down); retry on another replica")
        spec = validate(spec, self.catalog, self.settings.limits, self.settings.max_message_bytes)
        async with self.active():  # drain waits for the enqueue: its job may exist once it returns
            # difflens_queue_depth: sample_depth, off the hot path
            try:
                if self._async is not None:
                    return await self._async.enqueue(spec, max_in_flight)
                return await self._run(self.queue.enqueue, spec, max_in_flight)
            except TenantBusy:
                self._count(spec.tenant, "in_flight_limited")
                raise

    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job's record; JobNotFound also for a job of another tenant than `tenant` (None: any)."""
        _check_id(job_id)
        if self._async is not None:
            record = await self._async.get(job_id)
        else:
            record = await self._run(self.queue.get, job_id)
        if tenant is not None and record.tenant != tenant:
            raise JobNotFound(job_id)  # the very error of an unknown id: nothing tells the two apart
        return record

    async def cancel(self, job_id: str, tenant: str | None = None) -> JobRecord:
        if tenant is not None:
            await self.get(job_id, tenant)  # a job's tenant never changes: checked once is checked
        _check_id(job_id)
        return await self._run(self.queue.cancel, job_id)

    async def delete(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """Delete a job that ended, before its records expire -> its last record (FailedPrecondition while it is
        queued or running)."""
        if tenant is not None:
            await self.get(job_id, tenant)
        _check_id(job_id)
        return await self._run(self.queue.delete, job_id)

    async def follow(self, job_id: str, after: int = -1, *, admit: bool = False, created: JobRecord | None = None,
                     tenant: str | None = None) -> AsyncIterator[tuple[int, Event]]:
        """(sequence, event) pairs with sequence > `after`, until the job's terminal event (JobNotFound if the
        job does not exist, or is not `tenant`'s). `admit`: follow even while draining (Explain, whose job this
        front just queued). `created`: what submit returned for this job; when it made the job, its event 0
        (Queued) is known without a read, and the first read already waits for the worker."""
        if self.draining and not admit:
            raise NotReady("this front is draining (shutting down); watch the job on another replica")
        _check_id(job_id)
        if tenant is not None:
            await self.get(job_id, tenant)
        async with self.active():
            block, live = 0.0, False  # the first read does not wait: an unknown job is reported at once
            if created is not None and created.created and after < 0:
                yield 0, Queued(position=created.queue_position)
                after, block, live = 0, FOLLOW_BLOCK_S, True
            while True:
                batch = await self._events(job_id, after, block, live)
                block = FOLLOW_BLOCK_S
                if not batch:
                    if not (await self.get(job_id)).done:
                        continue
                    # Done while we waited: its terminal event may have landed just after the wait ended.
                    batch = await self._events(job_id, after, 0.0)
                    if not batch:
                        return  # the caller asked to start past the terminal event
                for seq, event in batch:
                    after, live = seq, True  # not terminal, or we return below
                    yield seq, event
                    if is_terminal(event):
                        return

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is active (active(): submitting or following a job) (True), or `timeout_s` passed
        (False)."""
        async with self._idle:
            try:
                await asyncio.wait_for(self._idle.wait_for(lambda: self._active == 0), timeout_s)
            except TimeoutError:
                return False
        return True

    async def sample_depth(self, stop: asyncio.Event,
                           on_reachable: Callable[[bool], Awaitable[None]] | None = None) -> None:
        """Keep difflens_queue_depth{model}, difflens_live_workers{model} and `queue_stats` current for this
        front's models until `stop` (the queue is shared: other fronts enqueue too). The sample doubles as the
        queue's liveness: `on_reachable(False)` when it starts failing, (True) when it works again (the server's
        health status follows it)."""
        outage = Outage(log, "reaching the queue", logging.WARNING)
        while not stop.is_set():
            try:
                for model in self.catalog.names():
                    depth, workers = await self._run(self._stats, model)
                    metrics.QUEUE_DEPTH.labels(model).set(depth)
                    metrics.LIVE_WORKERS.labels(model).set(workers)
                    self.queue_stats[model] = (depth, workers)
                if outage.down and on_reachable is not None:
                    await on_reachable(True)
                outage.ok()
            except Exception:  # a queue outage must not end the sampler; the RPCs report it
                if not outage.down and on_reachable is not None:
                    await on_reachable(False)
                outage.failed()
            try:
                await asyncio.wait_for(stop.wait(), DEPTH_SAMPLE_S)
            except TimeoutError:
                pass

    def _stats(self, model: str) -> tuple[int, int]:
        self.queue.expire_overdue(model)  # queued jobs past their deadline end now, not when a worker comes
        return self.queue.depth(model), self.queue.live_workers(model)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._follow_pool is not None:
            self._follow_pool.shutdown(wait=False, cancel_futures=True)
        if self._async is not None:
            await self._async.close()
