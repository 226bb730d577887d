"""Decisions both queue implementations make the same way: job ids, the queue-full error, what a claim finds.

Kept here so the Redis and in-process queues cannot drift apart on them (base.py states the semantics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Collection
from typing import TypeVar

from difflens.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from difflens.jobs import Completed, Event, Failed, JobSpec, JobStateName

T = TypeVar("T")
log = logging.getLogger(__name__)

# The front cannot know how fast workers drain the queue (jobs take milliseconds on a GPU, seconds on a CPU), so
# the hint is a fixed, short wait: long enough that retrying clients do not hammer a full queue.
QUEUE_FULL_RETRY_S = 1.0
CANCELLED_MESSAGE = "cancelled by the caller"
# A job that cannot finish because its queue goes with the process (serve --embedded, stopping).
SHUTDOWN_MESSAGE = "the server shut down before the job finished; submit it again"
QUEUED_DEADLINE_MESSAGE = "the job's deadline passed while it waited in the queue"
# The dead-letter record keeps the most recent this many jobs (Redis: approximately, XADD MAXLEN ~), so a fleet
# that keeps killing jobs cannot grow it without bound.
DEAD_LETTER_MAXLEN = 10_000


def retrying(what: str, call: Callable[[], T], budget_s: float, retry_if: Callable[[Exception], bool]) -> T:
    """call(), again after each exception `retry_if` accepts (a queue blip: a restart, a failover, a stall), with
    backoff from 50 ms to 1 s, for up to `budget_s` seconds (a worker's visibility timeout: past it the job may be
    another worker's); then the last exception. Logs once when it starts retrying and once when it got through."""
    end, delay, told = time.monotonic() + budget_s, 0.05, False
    while True:
        try:
            result = call()
        except Exception as e:
            if not retry_if(e) or time.monotonic() + delay > end:
                raise
            if not told:
                log.warning("the queue did not answer while %s (%s); retrying for up to %g s", what, e, budget_s)
                told = True
            time.sleep(delay)
            delay = min(1.0, delay * 2)
            continue
        if told:
            log.info("the queue answered again: %s done", what)
        return result


STORAGE_FULL_MESSAGE = "the job queue's storage (Redis) is full; retry later"


def storage_full(err: BaseException) -> bool:
    """Whether `err` is the queue's backend refusing a write for want of memory (Redis' maxmemory reached with a
    noeviction policy): the caller should back off, not see an internal error."""
    try:
        import redis
    except ImportError:  # no Redis client: the in-process queue has no such limit
        return False
    if isinstance(err, redis.OutOfMemoryError):
        return True
    # Redis 6.2 reports a script's refused write as a plain error: "Error running script ... -OOM command not
    # allowed when used memory > 'maxmemory'" (7.0 and later raise OutOfMemoryError)
    return isinstance(err, redis.ResponseError) and "OOM command not allowed" in str(err)


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    """Whether `text` has the form of new_job_id()'s ids. The front looks up nothing else: a Redis key is built
    from the id, and an id such as '<job id>:events' named another key of the same job."""
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def new_token() -> str:
    return uuid.uuid4().hex


def queue_full(model: str, depth: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"queue full: {depth} jobs waiting for model {model!r} (max_queue_depth={limit}, per model); "
        f"retry in {QUEUE_FULL_RETRY_S:g} s",
        retry_after_s=QUEUE_FULL_RETRY_S)


# A tenant at its limit of jobs in flight waits for one of them to end: seconds, on a CPU more.
IN_FLIGHT_RETRY_S = 2.0


class TenantBusy(ResourceExhausted):
    """The tenant has max_in_flight jobs queued or running; a new one waits for one of them to end."""

    def __init__(self, tenant: str, in_flight: int, limit: int) -> None:
        super().__init__(f"tenant {tenant!r} has {in_flight} jobs queued or running (max_in_flight={limit}); "
                         f"retry in {IN_FLIGHT_RETRY_S:g} s, or when one of them ends", retry_after_s=IN_FLIGHT_RETRY_S)


def idempotency_scope(spec: JobSpec) -> str:
    """Whose idempotency keys a spec's key is among: its tenant's where the front authenticated the call, else its
    caller's (x-difflens-caller or the TLS peer). A tenant's scope starts with a NUL, which no metadata value
    carries, so no caller can name it."""
    return f"\0tenant\0{spec.tenant}" if spec.tenant else spec.caller


def not_finished(job_id: str, state: str) -> FailedPrecondition:
    return FailedPrecondition(f"job {job_id!r} is {state}: only a job that ended (completed, failed, cancelled) can "
                              "be deleted; cancel it first (CancelJob), then delete it")


def request_fingerprint(spec: JobSpec) -> str:
    """What an idempotency key stands for: the request without its deadline (each retry's call deadline differs)."""
    return hashlib.sha256(dataclasses.replace(spec, deadline=None).to_json().encode()).hexdigest()


def idempotency_conflict(job_id: str) -> InvalidArgument:
    return InvalidArgument("idempotency_key", f"already used by this caller for a different request (job {job_id}); "
                                              "a retry must repeat the request exactly, a new request needs a new key")


def check_models(models: Collection[str]) -> None:
    """A claim names the models its worker serves; none is a caller's bug (it would wait forever)."""
    if not models:
        raise ValueError("claim needs the names of the models the worker serves")


def terminal_state(event: Event) -> JobStateName:
    """The state a terminal event leaves the job in."""
    if isinstance(event, Completed):
        return "completed"
    if isinstance(event, Failed):
        return "cancelled" if event.code == "CANCELLED" else "failed"
    raise TypeError(f"not a terminal event: {type(event).__name__}")


def error_of(event: Event) -> str:
    return f"{event.code}: {event.message}" if isinstance(event, Failed) else ""


def claim_verdict(*, cancel: bool, deadline: float | None, deliveries: int, max_deliveries: int,
                  now: float) -> Failed | None:
    """Why a job just taken off the queue must not be handed to the worker (None: hand it out).

    A cancel wins over the rest (the caller asked for exactly that); a job past its deadline fails as such; a job
    delivered more than `max_deliveries` times (its workers keep dying on it) is dead-lettered as ABORTED.
    """
    if cancel:
        return Failed("CANCELLED", CANCELLED_MESSAGE)
    if deadline is not None and now >= deadline:
        return Failed("DEADLINE_EXCEEDED", QUEUED_DEADLINE_MESSAGE)
    if deliveries > max_deliveries:
        return Failed("ABORTED", f"the job's worker stopped {deliveries - 1} times (max_deliveries="
                                 f"{max_deliveries}); moved to the dead-letter stream")
    return None


def settled() -> bool:
    """The confirm() of a claim_ahead claim that the queue already settled: it holds."""
    return True


def text(value: bytes | str | None) -> str:
    """A Redis reply field as str ('' for a missing one)."""
    return value.decode() if isinstance(value, bytes) else (value or "")
