"""The queue interface between the gRPC front and the workers.

Two implementations sit side by side: `redis_streams.RedisStreamsQueue` (production: Redis Streams, a consumer
group of workers, reclaim of abandoned jobs, dead-letter stream, per-job state and event streams with a TTL) and
`memory.InProcessQueue` (the embedded default: one process, same semantics, no Redis).

Semantics every implementation keeps:
- Every model has its own queue: a worker claims only jobs for the models it names (`models`), so workers that
  serve different models can share one Redis, and each model's workers can be scaled on its own queue's depth.
  `max_queue_depth`, `depth(model)` and a job's queue position are per model.
- `enqueue` validates nothing (the front already did) but enforces the depth limit (ResourceExhausted with a
  retry hint) and idempotency: the same (scope, idempotency_key) returns the existing job instead of a new one,
  for as long as that job's record lives (common.idempotency_scope: the spec's tenant, else its caller); the same
  key with a different request (common.request_fingerprint: everything but the deadline) raises InvalidArgument on
  idempotency_key. With `max_in_flight` > 0 it refuses (common.TenantBusy, a ResourceExhausted) a job whose
  tenant already has that many jobs queued or running (jobs enqueued with a limit count; a repeated key is no new
  job and is never refused). The record keeps the spec's tenant (JobRecord.tenant). It appends a `Queued` event as
  the job's event 0.
- `take_token(bucket, rate_per_s, burst)` is a token bucket per name shared by every front of the queue (Redis:
  one script): 0.0 when the call may go on (a token taken), else the seconds until a token is there. The front
  takes one per call of an authenticated tenant.
- `delete` removes a job that ended (its record and events, and its idempotency key) before its records expire,
  returning its last record; a job not ended yet raises FailedPrecondition naming its state.
- `claim` hands a worker one job for one of its models: a new one, or one whose worker stopped heartbeating for
  longer than the visibility timeout (reclaimed; `Claim.delivery` counts deliveries). A job delivered more than
  `max_deliveries` times is moved to the dead-letter stream and failed instead of being handed out. Jobs already
  cancelled or past their deadline are failed at claim time and not handed out. With `start=True` the claim also
  appends `Started(worker, delivery)` and moves the job to running in the same atomic step (`Claim.started`): the
  worker's first event costs no round trip of its own, and a job failed at claim time never shows a Started event.
- `claim_ahead` is claim(start=True) that may hand the job out before the claim is settled, with a `confirm()`
  that settles it (Redis: the claim script, run while the worker already starts on the job; one round trip off
  every job's latency). Until confirm() returned True the worker publishes nothing of the job; False means the
  queue failed or dropped it as claim() would have (cancelled or expired meanwhile), and the worker just stops.
- `publish` appends an event to the job's event stream, but only while the claim still owns the job (a reclaimed
  job's first worker, if it was only slow, gets `Published.LOST` back and must stop). `Started` moves the job to
  running. The reply also says whether a cancel was requested (`Published.CANCEL_REQUESTED`): the worker, which
  publishes a step and then checks for a cancel before the next, needs no separate read for it.
- `finish` appends the terminal event (Completed or Failed) and marks the job terminal atomically, at most once
  per job: it returns False if the job was already terminal or the claim lost ownership, so a client sees exactly
  one terminal event. It also acknowledges the job in its model's work stream.
- `hand_back` gives up a job the claim holds without ending it (its worker is stopping and will not finish it in
  time): the job is queued again at the head of its model's queue (position 0), with its events (it counts toward
  the depth, a cancel ends it at once, its deadline is enforced as for any queued job); a worker of its model takes
  it at once (Redis: at its next reclaim scan, within about a second, not after the visibility timeout), and this
  delivery does not count toward `max_deliveries` (the next Started shows the same attempt
  number). False when the claim no longer holds it.
- A queued job whose deadline passes fails with DEADLINE_EXCEEDED within a second (`expire_overdue`, from the
  front's sampler), so it stops counting toward the depth without waiting for a worker of its model.
- `cancel` on a queued job makes it terminal at once (a Failed(CANCELLED) event); on a running job it raises the
  cancel flag that the worker checks between denoising steps and then finishes with Failed(CANCELLED).
  `cancel_requested` reads the flag; `cancel_signalled` answers without a read where the queue pushes cancels to
  the worker that claimed the job (Redis: a pub/sub channel), possibly a moment late, and None where it cannot
  vouch for the job (the worker then reads the flag).
- `announce(worker, models)` says a worker is up and serves `models` (workers call it every heartbeat interval);
  `live_workers(model)` counts the workers heard from within the visibility timeout (the window after which their
  jobs would be reclaimed too); `retire` takes a stopping worker out at once. What a front reports, so a caller
  can tell a job that waits for a busy worker from one that no worker serves.
- `events(job_id, after, block_s)` returns (sequence, event) pairs with sequence > after, waiting up to block_s
  for the first one; sequences are 0, 1, 2, ... per job. This is how Explain and WatchJob stream from any front.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from difflens.jobs import TERMINAL_EVENTS, Event, Failed, JobRecord, JobSpec


class JobNotFound(LookupError):
    """No job with this id (never existed, or its records expired)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} not found")


class Published(IntEnum):
    """What `publish` did. LOST is falsy: `if not queue.publish(...)` means the claim lost the job."""

    LOST = 0
    OK = 1
    CANCEL_REQUESTED = 2  # published; the job's cancel flag is raised


@dataclass(frozen=True)
class Claim:
    """A job handed to a worker. `token` identifies this delivery (ownership checks); delivery counts from 1."""

    job_id: str
    spec: JobSpec
    worker: str
    token: str
    delivery: int
    enqueued_at: float
    started: bool = False  # claimed with start=True: Started is already the job's latest event
    resumed: bool = False  # the job ran before (reclaimed from a dead worker, or handed back): it may have steps


class JobQueue(Protocol):
    # Called with the terminal event when the queue itself ends a job - the caller cancelled it while queued, or a
    # claim found it cancelled, past its deadline, delivered too often or unreadable - once its at-most-once
    # finish succeeded (metrics: jobs a worker finishes it counts itself). None: nobody listens.
    on_ended: Callable[[Failed], None] | None

    def enqueue(self, spec: JobSpec, max_in_flight: int = 0) -> JobRecord: ...

    def get(self, job_id: str) -> JobRecord: ...

    def delete(self, job_id: str) -> JobRecord: ...

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> float: ...

    def claim(self, worker: str, models: Collection[str], block_s: float = 1.0,
              start: bool = False) -> Claim | None: ...

    def claim_ahead(self, worker: str, models: Collection[str],
                    block_s: float = 1.0) -> tuple[Claim, Callable[[], bool]] | None: ...

    def heartbeat(self, claim: Claim) -> bool: ...

    def publish(self, claim: Claim, event: Event) -> Published: ...

    def finish(self, claim: Claim, event: Event) -> bool: ...

    def hand_back(self, claim: Claim) -> bool: ...

    def cancel(self, job_id: str) -> JobRecord: ...

    def cancel_requested(self, job_id: str) -> bool: ...

    def cancel_signalled(self, job_id: str) -> bool | None: ...

    def events(self, job_id: str, after: int = -1, block_s: float = 0.0) -> list[tuple[int, Event]]:
        """(sequence, event) pairs with sequence > `after`, waiting up to `block_s` for the first. Empty only when
        nothing newer arrived in time, or the job is terminal and `after` is at or past its terminal event.
        JobNotFound for an unknown (or expired) job."""
        ...

    def depth(self, model: str) -> int:
        """Jobs waiting (never claimed) for `model`."""
        ...

    def expire_overdue(self, model: str, limit: int = 100) -> int:
        """Fail (DEADLINE_EXCEEDED) up to `limit` queued jobs of `model` whose deadline passed -> how many. The
        front calls it as it samples the depth."""
        ...

    def prepare(self, models: Collection[str]) -> None:
        """Make what the workers of `models` will read from, before any of them runs: a front calls it at start-up,
        so an autoscaler that watches a model's queue (KEDA reads the Redis consumer group) sees it from the
        first job on, while the model's pool is still at zero. Idempotent."""
        ...

    def announce(self, worker: str, models: Collection[str]) -> None: ...

    def retire(self, worker: str, models: Collection[str]) -> None: ...

    def live_workers(self, model: str) -> int: ...

    def async_front(self, streams: int) -> AsyncFront | None:
        """enqueue / get / events as coroutines for the front's event loop, or None (the front then runs the
        blocking calls on a thread pool). `streams`: the most events() waits it must serve at once (the front's
        max_streams), besides its other calls. Called once, from the loop that will use it."""
        ...

    def close(self) -> None: ...


class AsyncFront(Protocol):
    """The front's hot calls without a thread per call; same semantics as JobQueue's."""

    async def enqueue(self, spec: JobSpec, max_in_flight: int = 0) -> JobRecord: ...

    async def get(self, job_id: str) -> JobRecord: ...

    async def take_token(self, bucket: str, rate_per_s: float, burst: int) -> float: ...

    async def events(self, job_id: str, after: int = -1, block_s: float = 0.0,
                     live: bool = False) -> list[tuple[int, Event]]:
        """JobQueue.events. `live`: the caller saw event `after` and it was not terminal, which lets the
        implementation skip its existence / state read while events keep coming."""
        ...

    async def close(self) -> None: ...


def is_terminal(event: Event) -> bool:
    return isinstance(event, TERMINAL_EVENTS)
