"""The in-process queue: base.py's semantics in one process with a lock and a condition variable.

The embedded default (`difflens serve --embedded`): the front and its worker threads share one of these.
Everything the Redis queue does happens here too: idempotency, the depth limit, heartbeats and reclaim after the
visibility timeout (a worker thread that stops heartbeating loses its job), a dead-letter list, records that
expire `result_ttl_s` after their last write.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

from difflens.config import ServiceSettings
from difflens.jobs import Event, Failed, JobRecord, JobSpec, JobStateName, Queued, Started
from difflens.queue.base import Claim, JobNotFound, Published, is_terminal
from difflens.queue.common import (
    CANCELLED_MESSAGE,
    DEAD_LETTER_MAXLEN,
    QUEUED_DEADLINE_MESSAGE,
    TenantBusy,
    check_models,
    claim_verdict,
    error_of,
    idempotency_conflict,
    idempotency_scope,
    new_job_id,
    new_token,
    not_finished,
    queue_full,
    request_fingerprint,
    settled,
    terminal_state,
)

# Expired records are swept at most this often (a sweep walks every job).
_SWEEP_EVERY_S = 1.0


HANDED_BACK = "-"  # the owner of a job handed back: held by nobody, yet not "never claimed" (cancel raises the flag)


@dataclass
class _Job:
    id: str
    spec: JobSpec
    created_at: float
    updated_at: float
    state: JobStateName = "queued"
    events: list[Event] = field(default_factory=list)
    owner: str = ""  # token of the claim that holds the job; "" while never claimed
    worker: str = ""
    deliveries: int = 0
    error: str = ""
    cancel: bool = False
    beat: float = 0.0  # monotonic time of the holder's last claim or heartbeat

    @property
    def done(self) -> bool:
        return self.state in ("completed", "failed", "cancelled")


class InProcessQueue:
    """JobQueue in memory; thread-safe. `clock` (unix seconds) is for deadlines and records; reclaim uses the
    monotonic clock."""

    def __init__(self, settings: ServiceSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.on_ended: Callable[[Failed], None] | None = None
        self._clock = clock
        self._cond = threading.Condition()
        self._jobs: dict[str, _Job] = {}
        self._waiting: dict[str, None] = {}  # insertion-ordered: the queue
        self._held: dict[str, None] = {}  # claimed, not terminal: candidates for reclaim
        self._idem: dict[tuple[str, str], str] = {}
        self._dead: deque[str] = deque(maxlen=DEAD_LETTER_MAXLEN)  # oldest dropped first, as on Redis
        self._swept = time.monotonic()
        self._workers: dict[str, dict[str, float]] = {}  # model -> worker -> monotonic time of its last announce
        self._buckets: dict[str, tuple[float, float]] = {}  # take_token: name -> (tokens, monotonic time)
        self._buckets_lock = threading.Lock()  # not _cond: a call's token never waits behind a claim's scan

    # ------------------------------------------------------------ front side

    def enqueue(self, spec: JobSpec, max_in_flight: int = 0) -> JobRecord:
        with self._cond:
            self._sweep()
            key = (idempotency_scope(spec), spec.idempotency_key)
            if spec.idempotency_key and key in self._idem and self._idem[key] in self._jobs:
                existing = self._jobs[self._idem[key]]
                if request_fingerprint(existing.spec) != request_fingerprint(spec):
                    raise idempotency_conflict(existing.id)
                return self._record(existing)
            if max_in_flight > 0 and spec.tenant:
                in_flight = sum(j.spec.tenant == spec.tenant and not j.done for j in self._jobs.values())
                if in_flight >= max_in_flight:
                    raise TenantBusy(spec.tenant, in_flight, max_in_flight)
            depth = self._depth(spec.model)
            if depth >= self.settings.max_queue_depth:
                raise queue_full(spec.model, depth, self.settings.max_queue_depth)
            now = self._clock()
            job = _Job(new_job_id(), spec, now, now)
            job.events.append(Queued(position=depth))
            self._jobs[job.id] = job
            self._waiting[job.id] = None
            if spec.idempotency_key:
                self._idem[key] = job.id
            self._cond.notify_all()
            return replace(self._record(job), created=True)

    def get(self, job_id: str) -> JobRecord:
        with self._cond:
            return self._record(self._job(job_id))

    def delete(self, job_id: str) -> JobRecord:
        with self._cond:
            job = self._job(job_id)
            if not job.done:
                raise not_finished(job_id, job.state)
            record = self._record(job)
            self._forget(job)
            self._cond.notify_all()  # a stream waiting on it ends: the job is not found any more
            return record

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> float:
        """The token bucket of the Redis queue's script, on the monotonic clock."""
        if rate_per_s <= 0:
            return 0.0
        now = time.monotonic()
        with self._buckets_lock:
            tokens, at = self._buckets.get(bucket, (float(burst), now))
            tokens = min(float(burst), tokens + (now - at) * rate_per_s)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / rate_per_s
            self._buckets[bucket] = (tokens - 1 if wait == 0 else tokens, now)
            return wait

    def cancel(self, job_id: str) -> JobRecord:
        with self._cond:
            job = self._job(job_id)
            if not job.done:
                if job.owner and job.owner != HANDED_BACK:
                    job.cancel = True
                    self._touch(job)
                else:  # never claimed, or handed back: nobody holds it
                    self._ended(job, Failed("CANCELLED", CANCELLED_MESSAGE))
            return self._record(job)

    def cancel_requested(self, job_id: str) -> bool:
        with self._cond:
            job = self._jobs.get(job_id)
            return job is not None and job.cancel

    def cancel_signalled(self, job_id: str) -> bool | None:
        return self.cancel_requested(job_id)  # the flag is in this process: reading it costs no round trip

    def events(self, job_id: str, after: int = -1, block_s: float = 0.0) -> list[tuple[int, Event]]:
        end = time.monotonic() + block_s
        with self._cond:
            while True:
                job = self._job(job_id)
                if len(job.events) > after + 1:
                    return [(i, job.events[i]) for i in range(max(after + 1, 0), len(job.events))]
                left = end - time.monotonic()
                if left <= 0 or job.done:
                    return []
                self._cond.wait(left)

    def async_front(self, streams: int) -> None:
        """None: events() waits on a threading.Condition, so the front calls it from threads."""
        return None

    def depth(self, model: str) -> int:
        with self._cond:
            return self._depth(model)

    def expire_overdue(self, model: str, limit: int = 100) -> int:
        with self._cond:
            self._sweep()
            now = self._clock()
            overdue = [job for job in (self._jobs[j] for j in self._waiting)
                       if job.spec.model == model and job.spec.deadline is not None and now >= job.spec.deadline]
            for job in overdue[:limit]:
                self._ended(job, Failed("DEADLINE_EXCEEDED", QUEUED_DEADLINE_MESSAGE))
            return min(len(overdue), limit)

    def prepare(self, models: Collection[str]) -> None:
        """Nothing to make: a model's queue exists from its first job, and nothing outside watches it."""

    def announce(self, worker: str, models: Collection[str]) -> None:
        now = time.monotonic()
        with self._cond:
            for model in models:
                self._workers.setdefault(model, {})[worker] = now

    def retire(self, worker: str, models: Collection[str]) -> None:
        with self._cond:
            for model in models:
                self._workers.get(model, {}).pop(worker, None)

    def live_workers(self, model: str) -> int:
        since = time.monotonic() - self.settings.visibility_timeout_s
        with self._cond:
            return sum(t >= since for t in self._workers.get(model, {}).values())

    def dead_letters(self) -> list[str]:
        """Ids of the jobs moved to the dead-letter list, oldest first."""
        with self._cond:
            return list(self._dead)

    def close(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def end_all(self, event: Failed) -> int:
        """End every job not ended yet with `event` (the process, and this queue with it, is going: serve
        --embedded stopping): their streams get it at once, instead of waiting for a step that may outlast the
        server. A worker's later publish or finish of such a job finds it ended. Returns how many were ended."""
        with self._cond:
            open_jobs = [job for job in self._jobs.values() if not job.done]
            for job in open_jobs:
                self._ended(job, event)
            return len(open_jobs)

    # ------------------------------------------------------------ worker side

    def claim(self, worker: str, models: Collection[str], block_s: float = 1.0,
              start: bool = False) -> Claim | None:
        check_models(models)
        served = frozenset(models)
        end = time.monotonic() + block_s
        with self._cond:
            self._sweep()
            while True:
                job = self._next_job(served)
                if job is not None:
                    claim = self._hand_out(job, worker, start)
                    if claim is not None:
                        return claim
                    continue
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, self._until_reclaimable(served)))

    def claim_ahead(self, worker: str, models: Collection[str],
                    block_s: float = 1.0) -> tuple[Claim, Callable[[], bool]] | None:
        """claim(start=True): in one process the claim costs no round trip to get ahead of."""
        claim = self.claim(worker, models, block_s, start=True)
        return None if claim is None else (claim, settled)

    def heartbeat(self, claim: Claim) -> bool:
        with self._cond:
            job = self._owned(claim)
            if job is None:
                return False
            job.beat = time.monotonic()
            self._touch(job)
            return True

    def publish(self, claim: Claim, event: Event) -> Published:
        if is_terminal(event):
            raise ValueError("publish takes non-terminal events; use finish() for Completed/Failed")
        with self._cond:
            job = self._owned(claim)
            if job is None:
                return Published.LOST
            if isinstance(event, Started):
                job.state = "running"
            job.events.append(event)
            self._touch(job)
            self._cond.notify_all()
            return Published.CANCEL_REQUESTED if job.cancel else Published.OK

    def finish(self, claim: Claim, event: Event) -> bool:
        if not is_terminal(event):
            raise ValueError(f"finish takes Completed or Failed, got {type(event).__name__}")
        with self._cond:
            job = self._owned(claim)
            if job is None:
                return False
            self._terminate(job, event)
            return True

    def hand_back(self, claim: Claim) -> bool:
        with self._cond:
            job = self._owned(claim)
            if job is None:
                return False
            if job.cancel:  # nobody would act on the flag: end it as cancelled instead
                self._ended(job, Failed("CANCELLED", CANCELLED_MESSAGE))
                return True
            job.deliveries -= 1  # not a failed attempt
            job.owner, job.worker, job.state = HANDED_BACK, "", "queued"
            self._held.pop(job.id, None)
            self._waiting = {job.id: None, **self._waiting}  # queued again, first in line
            self._touch(job)
            self._cond.notify_all()
            return True

    # ------------------------------------------------------------ internals (caller holds the lock)

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None or job.updated_at < self._clock() - self.settings.result_ttl_s:
            raise JobNotFound(job_id)
        return job

    def _owned(self, claim: Claim) -> _Job | None:
        job = self._jobs.get(claim.job_id)
        if job is None or job.done or job.owner != claim.token:
            return None
        return job

    def _depth(self, model: str) -> int:
        return sum(self._jobs[j].spec.model == model for j in self._waiting)

    def _record(self, job: _Job) -> JobRecord:
        position = 0  # waiting jobs of the same model ahead of it: those its workers take first
        if job.id in self._waiting:
            for ahead in self._waiting:
                if ahead == job.id:
                    break
                position += self._jobs[ahead].spec.model == job.spec.model
        return JobRecord(id=job.id, state=job.state, model=job.spec.model, created_at=job.created_at,
                         updated_at=job.updated_at, queue_position=position, error=job.error, worker=job.worker,
                         deliveries=job.deliveries, tenant=job.spec.tenant)

    def _touch(self, job: _Job) -> None:
        job.updated_at = self._clock()

    def _ended(self, job: _Job, event: Failed) -> None:
        """The queue ends the job itself (see JobQueue.on_ended)."""
        self._terminate(job, event)
        if self.on_ended is not None:
            self.on_ended(event)

    def _terminate(self, job: _Job, event: Event) -> None:
        job.events.append(event)
        job.state = terminal_state(event)
        job.error = error_of(event)
        self._waiting.pop(job.id, None)
        self._held.pop(job.id, None)
        self._touch(job)
        self._cond.notify_all()

    def _next_job(self, models: frozenset[str]) -> _Job | None:
        """Of the jobs for `models`: a held one whose holder stopped heartbeating (reclaim first, as XAUTOCLAIM
        does), else the oldest waiting one."""
        now = time.monotonic()
        for job_id in self._held:
            job = self._jobs[job_id]
            if job.spec.model in models and now - job.beat > self.settings.visibility_timeout_s:
                return job
        for job_id in self._waiting:
            if self._jobs[job_id].spec.model in models:
                return self._jobs[job_id]
        return None

    def _until_reclaimable(self, models: frozenset[str]) -> float:
        """How long a claim for `models` may wait before a job of theirs can have become reclaimable. Jobs of other
        models do not count: one of them long reclaimable (no worker of its model here) would make every such
        claim wake each millisecond."""
        beats = [self._jobs[j].beat for j in self._held if self._jobs[j].spec.model in models]
        if not beats:
            return self.settings.visibility_timeout_s
        return max(0.001, min(beats) + self.settings.visibility_timeout_s - time.monotonic())

    def _hand_out(self, job: _Job, worker: str, start: bool) -> Claim | None:
        resumed = job.owner != ""  # held before: by a worker that stopped heartbeating, or handed back
        self._waiting.pop(job.id, None)
        job.deliveries += 1
        job.owner, job.worker, job.beat = new_token(), worker, time.monotonic()
        self._held[job.id] = None
        self._touch(job)
        failed = claim_verdict(cancel=job.cancel, deadline=job.spec.deadline, deliveries=job.deliveries,
                               max_deliveries=self.settings.max_deliveries, now=self._clock())
        if failed is not None:
            if failed.code == "ABORTED":
                self._dead.append(job.id)
            self._ended(job, failed)
            return None
        if start:
            job.state = "running"
            job.events.append(Started(worker=worker, attempt=job.deliveries))
            self._cond.notify_all()
        return Claim(job_id=job.id, spec=job.spec, worker=worker, token=job.owner, delivery=job.deliveries,
                     enqueued_at=job.created_at, started=start, resumed=resumed)

    def _sweep(self) -> None:
        """Forget jobs not written for result_ttl_s (as the Redis keys expire)."""
        mono = time.monotonic()
        if mono - self._swept < _SWEEP_EVERY_S:
            return
        self._swept = mono
        cutoff = self._clock() - self.settings.result_ttl_s
        for job in [j for j in self._jobs.values() if j.updated_at < cutoff]:
            self._forget(job)

    def _forget(self, job: _Job) -> None:
        """The job's records go (expired, or deleted), and its idempotency key with them."""
        del self._jobs[job.id]
        self._waiting.pop(job.id, None)
        self._held.pop(job.id, None)
        key = (idempotency_scope(job.spec), job.spec.idempotency_key)
        if self._idem.get(key) == job.id:
            del self._idem[key]
