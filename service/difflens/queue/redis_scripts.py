"""Each Lua script of redis_lua.py behind one typed function: it names the script's KEYS and ARGV, and its `Call`
decodes the reply into a small frozen dataclass, so no caller indexes a reply or compares it with a bare number.

A function here only describes a call; `Call.run(script)` runs it on a script registered on a redis.Redis client
(the blocking queue, redis_streams.py) and `await Call.run_async(script)` on one registered on a redis.asyncio client
(the front's hot calls, redis_async.py), so both paths share one ARGV order and one decoding. The scripts' own
comments in redis_lua.py say what each does; the replies' meaning is stated once, on their dataclasses below.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from difflens.queue.base import Published
from difflens.queue.common import text

R = TypeVar("R")


@dataclass(frozen=True)
class Call(Generic[R]):
    """One run of a script: its KEYS, its ARGV and how its reply becomes an R."""

    keys: list[str]
    args: list[Any]
    decode: Callable[[Any], R]

    def run(self, script: Callable[..., Any]) -> R:
        """The reply of `script` (a blocking client's registered script), decoded."""
        return self.decode(script(keys=self.keys, args=self.args))

    async def run_async(self, script: Callable[..., Any]) -> R:
        """The reply of `script` (a redis.asyncio client's registered script), decoded."""
        return self.decode(await script(keys=self.keys, args=self.args))


@dataclass(frozen=True)
class JobKeys:
    """The keys of one job that most scripts take first, in their KEYS order (redis_lua.py's key list)."""

    job: str  # P:job:ID
    events: str  # P:job:ID:events
    work: str  # P:work:M
    waiting: str  # P:waiting:M
    deadlines: str  # P:deadlines:M

    def as_list(self) -> list[str]:
        return [self.job, self.events, self.work, self.waiting, self.deadlines]


def _optional(value: float | int | None) -> Any:
    """A number argument the scripts take as '' when absent."""
    return "" if value is None else value


# ------------------------------------------------------------ enqueue

EnqueueOutcome = Literal["new", "existing", "conflict", "busy", "full"]


@dataclass(frozen=True)
class Enqueued:
    """The enqueue script's answer. new: the job is queued at `position` (the depth before it); existing: `job_id`
    already holds this request (a retry, or the idempotency key's job); conflict: the idempotency key holds `job_id`,
    made for another request; busy: the tenant has `in_flight` jobs, its limit; full: the model's queue holds `depth`
    jobs, its limit."""

    outcome: EnqueueOutcome
    job_id: str = ""
    position: int = 0
    in_flight: int = 0
    depth: int = 0


def _enqueued(reply: Any) -> Enqueued:
    kind, value = text(reply[0]), reply[1]
    if kind in ("existing", "conflict"):
        return Enqueued(kind, job_id=text(value))  # type: ignore[arg-type]
    if kind == "new":
        return Enqueued("new", position=int(value))
    if kind == "busy":
        return Enqueued("busy", in_flight=int(value))
    if kind == "full":
        return Enqueued("full", depth=int(value))
    raise ValueError(f"the enqueue script answered {reply!r}")


def enqueue(keys: JobKeys, idem_key: str, counter: str, tenant_jobs: str, *, job_id: str, spec_json: str,
            model: str, deadline: float | None, now: float, ttl_ms: int, max_depth: int, idempotent: bool,
            job_prefix: str, fingerprint: str, tenant: str, max_in_flight: int) -> Call[Enqueued]:
    """Queue job `job_id` unless a retry, its idempotency key, its tenant's in-flight limit (`max_in_flight`, 0 for
    none) or the model's depth limit says otherwise."""
    return Call([*keys.as_list(), idem_key, counter, tenant_jobs],
                [job_id, spec_json, model, "" if deadline is None else repr(deadline), now, ttl_ms, max_depth,
                 1 if idempotent else 0, job_prefix, fingerprint, tenant, max_in_flight], _enqueued)


# ------------------------------------------------------------ claim

@dataclass(frozen=True)
class Claimed:
    """The claim script's answer when the entry is (still) this worker's: the job's delivery count with this one,
    its spec as queued, its cancel flag, when it was queued, whether this claim started it (a Started event is out),
    whether it was held before (by a worker that died or handed it back), and the job's event count (None from a
    script that does not say): the claim's writes go on from it."""

    deliveries: int
    spec_json: bytes
    cancel: bool
    created_at: float
    started: bool
    resumed: bool
    seq: int | None


def _claimed(reply: Any) -> Claimed | None:
    if not reply:  # the entry is stale (the job ended or expired) or no longer this worker's
        return None
    # a nil in a Lua table ends the reply there: the last fields may be missing
    return Claimed(deliveries=int(reply[0]), spec_json=reply[1], cancel=reply[2] == b"1",
                   created_at=float(reply[3]), started=bool(reply[4]), resumed=len(reply) > 5 and bool(reply[5]),
                   seq=int(reply[6]) if len(reply) > 6 else None)


def claim(keys: JobKeys, *, entry_id: bytes | str, group: str, token: str, worker: str, now: float, ttl_ms: int,
          job_id: str, start: bool, max_deliveries: int) -> Call[Claimed | None]:
    """Own the job behind work entry `entry_id` under `token`; with `start`, also start it (a Started event) when
    nothing is against it. None when the entry is stale or another worker's."""
    return Call(keys.as_list(), [entry_id, group, token, worker, now, ttl_ms, job_id, 1 if start else 0,
                                 max_deliveries], _claimed)


# ------------------------------------------------------------ publish, finish

@dataclass(frozen=True)
class WriteReply:
    """The publish and finish scripts' answer. `written`: the claim holds the job and the write is in (or was, for
    a retry of one whose reply was lost); `cancel_requested` (publish only): the job's cancel flag is up;
    `out_of_step`: nothing written, the job's events are not where the claim left them (redis_lua.OWNED)."""

    written: bool
    cancel_requested: bool = False
    out_of_step: bool = False

    @property
    def published(self) -> Published:
        """As the queue's publish() reports it (out of step: lost)."""
        if not self.written:
            return Published.LOST
        return Published.CANCEL_REQUESTED if self.cancel_requested else Published.OK


def _written(reply: Any) -> WriteReply:
    code = int(reply)
    if code not in (0, 1, 2, 3):
        raise ValueError(f"the publish or finish script answered {reply!r}")
    return WriteReply(written=code in (1, 2), cancel_requested=code == 2, out_of_step=code == 3)


def publish(keys: JobKeys, *, token: str, event: bytes, started: bool, now: float, ttl_ms: int, write_id: str,
            seq: int | None) -> Call[WriteReply]:
    """Append the non-terminal event `event` for the claim `token`, at sequence `seq` (None: wherever the stream
    is); `started` when it is the Started event (the job is running from then)."""
    return Call(keys.as_list(), [token, event, 1 if started else 0, now, ttl_ms, write_id, _optional(seq)], _written)


def finish(keys: JobKeys, dead: str, *, token: str, event: bytes, state: str, error: str, now: float, ttl_ms: int,
           group: str, job_id: str, dead_letter: bool, dead_maxlen: int, write_id: str,
           seq: int | None) -> Call[WriteReply]:
    """The at-most-once end of the claim `token`: the terminal `event`, the job's `state` and `error`; with
    `dead_letter`, also an entry in the dead-letter stream `dead`."""
    return Call([*keys.as_list(), dead], [token, event, state, error, now, ttl_ms, group, job_id,
                                          1 if dead_letter else 0, dead_maxlen, write_id, _optional(seq)], _written)


# ------------------------------------------------------------ heartbeat, hand back

@dataclass(frozen=True)
class Held:
    """The heartbeat and hand-back scripts' answer. `held`: the claim still held the job (heartbeat: and still
    does); `cancel_flag` (heartbeat): the job's cancel flag is up; (hand back): it was, so the job was cancelled
    instead of being queued again."""

    held: bool
    cancel_flag: bool = False


def _held(reply: Any) -> Held:
    code = int(reply)
    if code not in (0, 1, 2):
        raise ValueError(f"the heartbeat or hand-back script answered {reply!r}")
    return Held(held=code != 0, cancel_flag=code == 2)


def heartbeat(keys: JobKeys, *, token: str, now: float, ttl_ms: int, group: str, worker: str) -> Call[Held]:
    """The claim `token` is alive: its work entry's idle time starts again."""
    return Call(keys.as_list(), [token, now, ttl_ms, group, worker], _held)


def hand_back(keys: JobKeys, *, token: str, now: float, ttl_ms: int, group: str, worker: str, idle_ms: int,
              job_id: str, cancelled_event: bytes, cancelled_error: str) -> Call[Held]:
    """Queue the job of the claim `token` again, first in line (or cancel it, its flag being up)."""
    return Call(keys.as_list(), [token, now, ttl_ms, group, worker, idle_ms, job_id, cancelled_event,
                                 cancelled_error], _held)


# ------------------------------------------------------------ cancel, delete

CancelOutcome = Literal["unknown", "ended", "cancelled", "flagged"]
_CANCEL_OUTCOMES: dict[int, CancelOutcome] = {-1: "unknown", 0: "ended", 1: "cancelled", 2: "flagged"}


@dataclass(frozen=True)
class Cancelled:
    """The cancel script's answer. unknown: no such job; ended: it had already ended; cancelled: it was queued (or
    handed back) and this call ended it; flagged: a worker holds it, its cancel flag is up and published."""

    outcome: CancelOutcome


def _cancelled(reply: Any) -> Cancelled:
    try:
        return Cancelled(_CANCEL_OUTCOMES[int(reply)])
    except KeyError:
        raise ValueError(f"the cancel script answered {reply!r}") from None


def cancel(keys: JobKeys, *, cancelled_event: bytes, cancelled_error: str, now: float, ttl_ms: int, group: str,
           job_id: str, channel: str) -> Call[Cancelled]:
    """Cancel job `job_id`: ended at once if nobody holds it, else flagged and announced on `channel`."""
    return Call(keys.as_list(), [cancelled_event, cancelled_error, now, ttl_ms, group, job_id, channel], _cancelled)


@dataclass(frozen=True)
class Deleted:
    """The delete script's answer. gone: no such job; busy: it has not ended (`state`), nothing was deleted;
    deleted: it had ended (`state`) and is gone now."""

    outcome: Literal["gone", "busy", "deleted"]
    state: str


def _deleted(reply: Any) -> Deleted:
    kind = text(reply[0])
    if kind not in ("gone", "busy", "deleted"):
        raise ValueError(f"the delete script answered {reply!r}")
    return Deleted(kind, text(reply[1]))  # type: ignore[arg-type]


def delete(job: str, events: str, *, job_id: str) -> Call[Deleted]:
    """Delete the ended job `job_id` (its hash `job`, its event stream `events`, its idempotency key)."""
    return Call([job, events], [job_id], _deleted)


# ------------------------------------------------------------ expire, token bucket, consumers

@dataclass(frozen=True)
class Expired:
    """The expire script's answer: how many queued jobs it failed because their deadline passed."""

    failed: int


def expire_queued(waiting: str, deadlines: str, work: str, *, now: float, ttl_ms: int, job_prefix: str,
                  overdue_event: bytes, overdue_error: str, limit: int, group: str) -> Call[Expired]:
    """Fail up to `limit` queued jobs of one model whose deadline is before `now`."""
    return Call([waiting, deadlines, work], [now, ttl_ms, job_prefix, overdue_event, overdue_error, limit, group],
                lambda reply: Expired(int(reply)))


@dataclass(frozen=True)
class Token:
    """The token bucket script's answer: 0 when a token was taken, else the seconds until one is there."""

    wait_s: float


def take_token(bucket: str, *, rate_per_s: float, burst: int) -> Call[Token]:
    """Take a token from the bucket `bucket` (refilled at `rate_per_s`, holding at most `burst`)."""
    return Call([bucket], [rate_per_s, burst], lambda reply: Token(int(reply) / 1000))


@dataclass(frozen=True)
class Forgotten:
    """The forget-consumers script's answer: how many of the named consumers held no pending entry and are gone now
    (deleted by this call, or not there to begin with: the script counts those too)."""

    gone: int


def forget_consumers(stream: str, group: str, workers: Collection[str]) -> Call[Forgotten]:
    """Delete the consumers `workers` of `stream`'s `group` that hold no pending entry."""
    return Call([stream], [group, *workers], lambda reply: Forgotten(int(reply)))
