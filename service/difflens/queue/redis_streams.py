"""The production queue: Redis Streams with a consumer group of workers (base.py states the semantics).

The keys, and the Lua scripts through which every check-then-write on a job goes: redis_lua.py; each script's call,
its KEYS and ARGV by name and its reply decoded into a dataclass: redis_scripts.py. Which work entry a worker gets
next (the per-model work streams, read in turns, and their reclaim scan): redis_work.py. Connecting (credentials,
TLS, waiting for Redis): redis_conn.py.

A worker learns of a cancel without a read per denoising step: its queue object subscribes to P:cancel before its
first claim (redis_cancel.CancelWatch), and `cancel_signalled` answers from what arrived, for jobs claimed while
that subscription was up and unbroken; otherwise it returns None and the worker reads the flag
(`cancel_requested`). The heartbeat script also returns the flag, so a message lost with a silently dead
connection delays a cancel by at most one heartbeat interval. The front's calls on asyncio: redis_async.py.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from difflens.config import ServiceSettings
from difflens.job_codec import decode_event, encode_event
from difflens.jobs import Event, Failed, JobRecord, JobSpec, Queued, Started
from difflens.queue import redis_lua as lua
from difflens.queue import redis_scripts as scripts
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
    retrying,
    settled,
    storage_full,
    terminal_state,
    text,
)
from difflens.queue.redis_cancel import CancelWatch

# the connection helpers, here too for the callers that import them from this module
from difflens.queue.redis_conn import (  # noqa: F401
    MIN_REDIS_VERSION,
    connect,
    redacted,
    tls_options,
    version_tuple,
    with_password,
)
from difflens.queue.redis_rewrite import ClaimWrites
from difflens.queue.redis_work import GROUP, WorkStreams

if TYPE_CHECKING:
    from difflens.queue.redis_async import AsyncRedisFront

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long the first claim waits for the cancel channel's subscription before claiming without it (its jobs then
# read the flag per step), and how often that connection pings Redis, so a dead one is noticed.
WATCH_READY_S = 2.0
WATCH_HEALTH_CHECK_S = 5


TERMINAL_STATES = (b"completed", b"failed", b"cancelled")


def _ahead_claim(job_id: str, fields: dict[bytes, bytes], worker: str) -> Claim | None:
    """The claim a new work entry (first delivery) becomes once the claim script starts it, made before it runs;
    None for an entry without the spec (queued by an older front) or with one this worker cannot read (the claim
    script's path then fails the job with the reason)."""
    spec = _entry_spec(fields)
    if spec is None or b"at" not in fields:
        return None
    return Claim(job_id=job_id, spec=spec, worker=worker, token=new_token(), delivery=1,
                 enqueued_at=float(fields[b"at"]), started=True)


def _entry_spec(fields: dict[bytes, bytes]) -> JobSpec | None:
    """The spec a work entry carries; None when it carries none or one this worker cannot read."""
    try:
        return JobSpec.from_json(fields[b"spec"]) if b"spec" in fields else None
    except (ValueError, KeyError, TypeError):
        return None


def record_from_hash(job_id: str, h: dict[bytes, bytes], rank: int | None) -> JobRecord:
    """A JobRecord from the job hash and its rank in the waiting set (JobNotFound when the hash is gone)."""
    if not h:
        raise JobNotFound(job_id)
    return JobRecord(id=job_id, state=text(h[b"state"]), model=text(h[b"model"]),  # type: ignore[arg-type]
                     created_at=float(h[b"created_at"]), updated_at=float(h[b"updated_at"]),
                     queue_position=int(rank or 0), error=text(h[b"error"]), worker=text(h[b"worker"]),
                     deliveries=int(h[b"deliveries"]), tenant=text(h.get(b"tenant")))


def is_waiting(h: dict[bytes, bytes]) -> bool:
    """Whether the job hash `h` is of a job still waiting to be claimed (its queue position is then read)."""
    return h.get(b"state") == b"queued"


def decode_events(found: Any) -> list[tuple[int, Event]]:
    """(sequence, event) pairs of an XREAD reply on one job's event stream (entry 0-n is sequence n - 1)."""
    if not found:
        return []
    return [(int(entry_id.split(b"-")[1]) - 1, _event_of(fields)) for entry_id, fields in found[0][1]]


def _event_of(fields: dict[bytes, bytes]) -> Event:
    """One event stream entry's event: encoded bytes, or the fields a script wrote (Queued, Started)."""
    if b"e" in fields:
        return decode_event(fields[b"e"])
    if b"s" in fields:
        return Started(worker=text(fields[b"w"]), attempt=int(fields[b"s"]))
    return Queued(position=int(fields[b"q"]))


class RedisStreamsQueue:
    """JobQueue on Redis Streams. `url_or_client`: a redis:// URL (this object owns its connection pool) or a
    redis.Redis created with decode_responses=False. Thread-safe: commands go through redis-py's connection pool,
    every check-then-write is one script, and the work streams' reader (redis_work.WorkStreams) has a lock."""

    def __init__(self, url_or_client: str | redis.Redis, settings: ServiceSettings) -> None:
        self.settings = settings
        self.on_ended: Callable[[Failed], None] | None = None
        self._owns_client = isinstance(url_or_client, str)
        self._url = url_or_client if isinstance(url_or_client, str) else None
        # a URL's connections, the cancel watch's and the asyncio front's included, take the TLS files
        self.options: dict[str, Any] = tls_options(settings, url_or_client) if isinstance(url_or_client, str) else {}
        self._r: Any = (redis.Redis.from_url(url_or_client, **self.options) if isinstance(url_or_client, str)
                        else url_or_client)
        p = settings.queue_name
        self._waiting_prefix, self._workers_prefix = f"{p}:waiting:", f"{p}:workers:"
        self._deadlines_prefix = f"{p}:deadlines:"
        self._counter, self._dead = f"{p}:enqueued", f"{p}:dead"
        self._job_prefix = f"{p}:job:"
        self._ttl_ms = max(1, int(settings.result_ttl_s * 1000))
        self._enqueue, self._claim, self._publish, self._finish, self._cancel, self._heartbeat, self._expire = (
            self._r.register_script(s)
            for s in (lua.ENQUEUE, lua.CLAIM, lua.PUBLISH, lua.FINISH, lua.CANCEL, lua.HEARTBEAT, lua.EXPIRE_QUEUED))
        self._hand_back = self._r.register_script(lua.HAND_BACK)
        self._delete, self._take_token = self._r.register_script(lua.DELETE), self._r.register_script(lua.TAKE_TOKEN)
        self._overdue = Failed("DEADLINE_EXCEEDED", QUEUED_DEADLINE_MESSAGE)
        self._cancel_bytes = encode_event(Failed("CANCELLED", CANCELLED_MESSAGE))
        self._work = WorkStreams(self._r, settings)
        self._cancel_channel = f"{p}:cancel"
        self._watch: CancelWatch | None = None  # started by the first claim: fronts never subscribe
        self._writes = ClaimWrites()  # what each claim wrote lately, written again if Redis loses it
        self._watch_lock = threading.Lock()

    def ping(self) -> None:
        """Raises redis' ConnectionError (and the like) unless Redis answers."""
        self._r.ping()

    def server_version(self) -> tuple[int, ...] | None:
        """The server's redis_version (INFO server) as integers, e.g. (7, 0, 15); None where it reports none that
        parses (a Redis-compatible server that does not say is let through)."""
        return version_tuple(self._r.info("server").get("redis_version", "")) or None

    # ------------------------------------------------------------ keys

    def _keys(self, job_id: str, model: str) -> scripts.JobKeys:
        job = self._job_prefix + job_id
        return scripts.JobKeys(job=job, events=job + ":events", work=self._work.prefix + model,
                               waiting=self._waiting_prefix + model, deadlines=self._deadlines_prefix + model)

    def _idem_key(self, spec: JobSpec) -> str:
        digest = hashlib.sha256(f"{idempotency_scope(spec)}\0{spec.idempotency_key}".encode()).hexdigest()
        return f"{self.settings.queue_name}:idem:{digest}"

    def _rate_key(self, bucket: str) -> str:
        return f"{self.settings.queue_name}:rate:{bucket}"

    # ------------------------------------------------------------ front side

    def enqueue(self, spec: JobSpec, max_in_flight: int = 0) -> JobRecord:
        job_id, now = new_job_id(), time.time()
        reply = self._enqueue_call(spec, job_id, now, max_in_flight).run(self._enqueue)
        if reply.outcome == "existing":
            return self.get(reply.job_id)
        return self._enqueued(spec, job_id, now, reply, max_in_flight)

    def _enqueue_call(self, spec: JobSpec, job_id: str, now: float,
                      max_in_flight: int = 0) -> scripts.Call[scripts.Enqueued]:
        """The enqueue script's call for `spec` as job `job_id`."""
        return scripts.enqueue(
            self._keys(job_id, spec.model), self._idem_key(spec), self._counter,
            f"{self.settings.queue_name}:tenant:{spec.tenant}:jobs", job_id=job_id, spec_json=spec.to_json(),
            model=spec.model, deadline=spec.deadline, now=now, ttl_ms=self._ttl_ms,
            max_depth=self.settings.max_queue_depth, idempotent=bool(spec.idempotency_key),
            job_prefix=self._job_prefix, fingerprint=request_fingerprint(spec) if spec.idempotency_key else "",
            tenant=spec.tenant, max_in_flight=max_in_flight if spec.tenant else 0)

    def _enqueued(self, spec: JobSpec, job_id: str, now: float, reply: scripts.Enqueued,
                  max_in_flight: int = 0) -> JobRecord:
        """The record of a job the enqueue script queued; the refusal it answered instead, raised."""
        if reply.outcome == "conflict":
            raise idempotency_conflict(reply.job_id)
        if reply.outcome == "full":
            raise queue_full(spec.model, reply.depth, self.settings.max_queue_depth)
        if reply.outcome == "busy":
            raise TenantBusy(spec.tenant, reply.in_flight, max_in_flight)
        return JobRecord(id=job_id, state="queued", model=spec.model, created_at=now, updated_at=now,
                         queue_position=reply.position, created=True, tenant=spec.tenant)

    def delete(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        job = self._job_prefix + job_id
        reply = scripts.delete(job, job + ":events", job_id=job_id).run(self._delete)
        if reply.outcome == "gone":  # expired or deleted since it was read
            raise JobNotFound(job_id)
        if reply.outcome == "busy":
            raise not_finished(job_id, reply.state)
        return dataclasses.replace(record, state=reply.state)  # type: ignore[arg-type]

    def take_token(self, bucket: str, rate_per_s: float, burst: int) -> float:
        if rate_per_s <= 0:
            return 0.0
        return scripts.take_token(self._rate_key(bucket), rate_per_s=rate_per_s, burst=burst).run(
            self._take_token).wait_s

    def get(self, job_id: str) -> JobRecord:
        h = self._r.hgetall(self._job_prefix + job_id)
        # the position is read only while the job waits (a second round trip); claimed meanwhile, it is 0
        return record_from_hash(job_id, h, self._r.zrank(self._waiting_of(h), job_id) if is_waiting(h) else None)

    def _waiting_of(self, h: dict[bytes, bytes]) -> str:
        return self._waiting_prefix + text(h[b"model"])

    def prepare(self, models: Collection[str]) -> None:
        self._work.prepare(models)

    def async_front(self, streams: int) -> AsyncRedisFront | None:
        """The front's calls on asyncio (redis.asyncio: no thread per call), for a queue made from a URL; its
        connections belong to the event loop that first uses it. None for a queue made from a client."""
        from difflens.queue.redis_async import AsyncRedisFront

        return AsyncRedisFront(self, self._url, streams) if self._url is not None else None

    def cancel(self, job_id: str) -> JobRecord:
        model = self._r.hget(self._job_prefix + job_id, "model")  # names the job's work stream; never changes
        done = None if model is None else scripts.cancel(
            self._keys(job_id, text(model)), cancelled_event=self._cancel_bytes,
            cancelled_error=f"CANCELLED: {CANCELLED_MESSAGE}", now=time.time(), ttl_ms=self._ttl_ms, group=GROUP,
            job_id=job_id, channel=self._cancel_channel).run(self._cancel)
        if done is None or done.outcome == "unknown":
            raise JobNotFound(job_id)
        if done.outcome == "cancelled" and self.on_ended is not None:  # it was queued: this call ended it
            self.on_ended(Failed("CANCELLED", CANCELLED_MESSAGE))
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return self._r.hget(self._job_prefix + job_id, "cancel") == b"1"

    def cancel_signalled(self, job_id: str) -> bool | None:
        """Whether a cancel of `job_id` (claimed through this object) was published, from the cancel channel
        without a round trip; None when the subscription was not up, or broke, since the job was claimed."""
        watch = self._watch
        return None if watch is None else watch.cancelled(job_id)

    def events(self, job_id: str, after: int = -1, block_s: float = 0.0) -> list[tuple[int, Event]]:
        key, start = self._events_from(job_id, after)
        found = self._r.xread({key: start})
        if not found:
            state = self._r.hget(self._job_prefix + job_id, "state")
            if state is None:
                raise JobNotFound(job_id)
            if state in TERMINAL_STATES:
                # The terminal event and the state are written by one script, so the job may have ended between
                # the read above and the HGET: read again, now that every event it will ever have is there.
                found = self._r.xread({key: start})
            elif block_s > 0:
                # XREAD from an explicit id returns at once if anything newer arrived since the first read.
                found = self._r.xread({key: start}, block=max(1, int(block_s * 1000)))
        return decode_events(found)

    def _events_from(self, job_id: str, after: int) -> tuple[str, str]:
        """The job's event stream and the XREAD id that returns the events with sequence > after."""
        return self._job_prefix + job_id + ":events", f"0-{max(after, -1) + 1}"

    def depth(self, model: str) -> int:
        return int(self._r.zcard(self._waiting_prefix + model))

    def expire_overdue(self, model: str, limit: int = 100) -> int:
        n = scripts.expire_queued(
            self._waiting_prefix + model, self._deadlines_prefix + model, self._work.prefix + model,
            now=time.time(), ttl_ms=self._ttl_ms, job_prefix=self._job_prefix,
            overdue_event=encode_event(self._overdue), overdue_error=error_of(self._overdue), limit=limit,
            group=GROUP).run(self._expire).failed
        if self.on_ended is not None:
            for _ in range(n):
                self.on_ended(self._overdue)
        return n

    def announce(self, worker: str, models: Collection[str]) -> None:
        """P:workers:M holds worker -> time of its last announce; entries older than the visibility timeout are
        dropped, and the key expires with them, so a fleet that is gone leaves nothing behind."""
        now, window_ms = time.time(), max(1, int(self.settings.visibility_timeout_s * 1000))
        pipe = self._r.pipeline(transaction=False)
        for model in models:
            key = self._workers_prefix + model
            pipe.zadd(key, {worker: now})
            pipe.zremrangebyscore(key, "-inf", now - window_ms / 1000)
            pipe.pexpire(key, window_ms)
        pipe.execute()

    def retire(self, worker: str, models: Collection[str]) -> None:
        pipe = self._r.pipeline(transaction=False)
        for model in models:
            pipe.zrem(self._workers_prefix + model, worker)
        pipe.execute()
        self._work.forget(self._work.streams(models), [worker])

    def live_workers(self, model: str) -> int:
        since = time.time() - self.settings.visibility_timeout_s
        return int(self._r.zcount(self._workers_prefix + model, since, "+inf"))

    def dead_letters(self) -> list[str]:
        """Ids of the jobs in the dead-letter stream, oldest first."""
        return [text(fields[b"job"]) for _, fields in self._r.xrange(self._dead)]

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        if self._owns_client:
            self._r.close()

    # ------------------------------------------------------------ worker side

    def claim(self, worker: str, models: Collection[str], block_s: float = 1.0,
              start: bool = False) -> Claim | None:
        got = self._claim_next(worker, models, block_s, start, ahead=False)
        return None if got is None else got[0]

    def claim_ahead(self, worker: str, models: Collection[str],
                    block_s: float = 1.0) -> tuple[Claim, Callable[[], bool]] | None:
        """claim(start=True), one round trip sooner for a new job: its work entry carries the spec, so the job is
        handed out as soon as the stream delivers it, and `confirm()` runs the claim script (from any thread) while
        the worker starts on it. confirm() says whether the claim holds; False (or an error) means the claim script
        failed or dropped the job as claim() would have, and nothing of it may be published. A reclaimed job, or
        an entry without a spec, is claimed as claim() does (confirm() then just says True)."""
        return self._claim_next(worker, models, block_s, start=True, ahead=True)

    def heartbeat(self, claim: Claim) -> bool:
        reply = scripts.heartbeat(self._keys(claim.job_id, claim.spec.model), token=claim.token, now=time.time(),
                                  ttl_ms=self._ttl_ms, group=GROUP, worker=claim.worker).run(self._heartbeat)
        if self._watch is not None:
            if reply.cancel_flag:
                self._watch.mark(claim.job_id)  # a cancel whose message was lost is caught here
            elif not reply.held:
                self._watch.forget(claim.job_id)  # reclaimed by another worker: it finishes the job, not us
        if not reply.held:
            self._writes.end(claim.token)
        return reply.held

    def publish(self, claim: Claim, event: Event) -> Published:
        if is_terminal(event):
            raise ValueError("publish takes non-terminal events; use finish() for Completed/Failed")
        data, started = encode_event(event), isinstance(event, Started)
        # out of step still, its lost events could not be written again: another delivery takes the job on
        result = self._in_step(claim, lambda seq: self._append(claim, data, started, seq)).published
        if result:
            self._writes.wrote(claim.token, self._writes.next_seq(claim.token), data, started)
        else:
            self._writes.end(claim.token)
            if self._watch is not None:
                self._watch.forget(claim.job_id)
        return result

    def _append(self, claim: Claim, data: bytes, started: bool, seq: int | None) -> scripts.WriteReply:
        """The publish script for one event at sequence `seq` (None: wherever the stream is), through blips."""
        keys, wrote = self._keys(claim.job_id, claim.spec.model), new_token()
        return self._through_blips(f"publishing an event of job {claim.job_id}", lambda: scripts.publish(
            keys, token=claim.token, event=data, started=started, now=time.time(), ttl_ms=self._ttl_ms,
            write_id=wrote, seq=seq).run(self._publish))

    def _in_step(self, claim: Claim, write: Callable[[int | None], scripts.WriteReply]) -> scripts.WriteReply:
        """write(seq) at the sequence the claim's next event is to get; when the script finds the job's events out
        of step (Redis lost some of the claim's acknowledged writes), the claim's lost events are written again and
        write() is tried once more. Its reply, still out of step if the lost events could not be written again."""
        reply = write(self._writes.next_seq(claim.token))
        if reply.out_of_step and self._rewrite(claim):
            reply = write(self._writes.next_seq(claim.token))
        return reply

    def _rewrite(self, claim: Claim) -> bool:
        """Write again the claim's events that the job's stream lost (redis_rewrite.py); False when it cannot."""
        job = self._job_prefix + claim.job_id
        stream_seq = int(self._through_blips(f"reading job {claim.job_id}", lambda: self._r.hget(job, "seq")) or -1)
        lost = self._writes.lost(claim.token, stream_seq)
        if lost is None:
            log.warning("job %s: its events end at %d, not where this claim left them (%s), and what it lost cannot be "
                        "written again; the claim stops", claim.job_id, stream_seq, self._writes.next_seq(claim.token))
            return False
        log.warning("job %s: Redis lost %d event(s) of it that it had acknowledged (restarted from an older state); "
                    "writing them again at sequences %d-%d", claim.job_id, len(lost), lost[0].seq, lost[-1].seq)
        return all(self._append(claim, w.data, w.started, w.seq).written for w in lost)

    def finish(self, claim: Claim, event: Event) -> bool:
        if not is_terminal(event):
            raise ValueError(f"finish takes Completed or Failed, got {type(event).__name__}")
        try:
            return self._in_step(claim, lambda seq: self._terminate(claim.job_id, claim.spec.model, claim.token, event,
                                                                    seq=seq)).written
        finally:
            self._writes.end(claim.token)

    def hand_back(self, claim: Claim) -> bool:
        self._writes.end(claim.token)
        if self._watch is not None:
            self._watch.forget(claim.job_id)
        reply = self._through_blips(f"handing back job {claim.job_id}", lambda: scripts.hand_back(
            self._keys(claim.job_id, claim.spec.model), token=claim.token, now=time.time(), ttl_ms=self._ttl_ms,
            group=GROUP, worker=claim.worker, idle_ms=max(1, int(self.settings.visibility_timeout_s * 1000)),
            job_id=claim.job_id, cancelled_event=self._cancel_bytes,
            cancelled_error=f"CANCELLED: {CANCELLED_MESSAGE}").run(self._hand_back))
        if reply.cancel_flag and self.on_ended is not None:  # cancelled instead of queued again
            self.on_ended(Failed("CANCELLED", CANCELLED_MESSAGE))
        return reply.held

    # ------------------------------------------------------------ claim internals

    def _claim_next(self, worker: str, models: Collection[str], block_s: float, start: bool, ahead: bool) \
            -> tuple[Claim, Callable[[], bool]] | None:
        """claim() and, with `ahead`, claim_ahead(): the next reclaimable or new entry of the work streams of
        `models`, owned (or failed and skipped, as claim_verdict says) by the claim script - or, for a new entry
        that carries its spec, handed out ahead with the script as its confirm()."""
        check_models(models)
        end = time.monotonic() + block_s
        watch = self._cancel_watch()
        while True:
            entry = self._work.next_entry(worker, models, end - time.monotonic())
            if entry is None:
                if time.monotonic() >= end:
                    return None
                continue
            stream, entry_id, job_id, fields = entry
            # the subscription as it is before the claim script reads the flag: every later cancel of this job
            # is published while it listens, unless it breaks (then the generation moves on)
            generation = watch.generation()
            first = _ahead_claim(job_id, fields, worker) if ahead and fields is not None else None
            if first is not None:
                return first, functools.partial(self._confirm_ahead, stream, entry_id, first, generation)
            # A spec this worker cannot read fails the job in _take: not after a Started event the script wrote
            unreadable = fields is not None and b"spec" in fields and _entry_spec(fields) is None
            claim = self._take(worker, stream, entry_id, job_id, start=start and not unreadable,
                               generation=generation)
            if claim is not None:
                return claim, settled

    def _confirm_ahead(self, stream: str, entry_id: bytes, ahead: Claim, generation: int | None) -> bool:
        """confirm() of a claim handed out ahead: the claim script, with the claim's own token."""
        taken = self._take(ahead.worker, stream, entry_id, ahead.job_id, start=True, token=ahead.token,
                           generation=generation)
        if taken is not None and (taken.delivery, taken.started) != (ahead.delivery, True):
            # cannot happen for a first delivery; if it did, the job is left to be reclaimed
            log.warning("job %s: claimed as delivery %d (started: %s), not as the first; stopped",
                        ahead.job_id, taken.delivery, taken.started)
            return False
        return taken is not None

    def _take(self, worker: str, stream: str, entry_id: bytes, job_id: str, start: bool, generation: int | None,
              token: str | None = None) -> Claim | None:
        """Own the job behind a work entry; fail it instead (and return None) if claim_verdict says so. The cancel
        watch then tracks the job from `generation`, its subscription's before the claim script ran."""
        token, model = token or new_token(), self._work.model_of(stream)
        stamp = [time.time()]

        def claim_script() -> scripts.Claimed | None:
            stamp[0] = time.time()  # each attempt's own: a deadline may pass during a blip
            return scripts.claim(self._keys(job_id, model), entry_id=entry_id, group=GROUP, token=token,
                                 worker=worker, now=stamp[0], ttl_ms=self._ttl_ms, job_id=job_id, start=start,
                                 max_deliveries=self.settings.max_deliveries).run(self._claim)

        # through blips: a lost reply used to leave the job running under a claim nobody held (a Started event
        # out, a delivery spent) until the visibility timeout; a retry with the token is answered, not re-applied,
        # and one that finds the entry reclaimed by another worker meanwhile changes nothing
        reply = self._through_blips(f"claiming job {job_id}", claim_script)
        now = stamp[0]
        if reply is None:
            return None
        try:
            spec = JobSpec.from_json(reply.spec_json)
        except (ValueError, KeyError, TypeError) as e:
            # a front newer than this worker: fail the job rather than crash every worker it reaches
            unreadable = Failed("INTERNAL", f"this worker cannot read the job's spec: {e}")
            if self._terminate(job_id, model, token, unreadable).written and self.on_ended is not None:
                self.on_ended(unreadable)
            return None
        failed = claim_verdict(cancel=reply.cancel, deadline=spec.deadline, deliveries=reply.deliveries,
                               max_deliveries=self.settings.max_deliveries, now=now)
        if failed is not None:
            if self._terminate(job_id, model, token, failed, dead_letter=failed.code == "ABORTED").written \
                    and self.on_ended is not None:
                self.on_ended(failed)
            return None
        if self._watch is not None:
            self._watch.track(job_id, generation)
        if reply.seq is not None:  # the job's event count: the claim's writes are checked against it from here on
            self._writes.begin(token, reply.seq)
        return Claim(job_id=job_id, spec=spec, worker=worker, token=token, delivery=reply.deliveries,
                     enqueued_at=reply.created_at, started=reply.started, resumed=reply.resumed)

    def _cancel_watch(self) -> CancelWatch:
        with self._watch_lock:
            if self._watch is None:
                client = (redis.Redis.from_url(self._url, health_check_interval=WATCH_HEALTH_CHECK_S, **self.options)
                          if self._url is not None else self._r)
                self._watch = CancelWatch(client, self._cancel_channel, owns_client=self._url is not None)
                if not self._watch.wait_up(WATCH_READY_S):
                    log.warning("cancel channel %s: not subscribed after %.0f s; jobs read their cancel flag per "
                                "step until it is", self._cancel_channel, WATCH_READY_S)
            return self._watch

    def _terminate(self, job_id: str, model: str, token: str, event: Event, dead_letter: bool = False,
                   seq: int | None = None) -> scripts.WriteReply:
        """The at-most-once finish of the claim `token`: written, or not (lost, or already terminal), or out of step
        (nothing written) when `seq` is not the job's next sequence. `dead_letter` also records the job in P:dead."""
        if self._watch is not None:
            self._watch.forget(job_id)
        keys, data, wrote = self._keys(job_id, model), encode_event(event), new_token()
        return self._through_blips(f"ending job {job_id}", lambda: scripts.finish(
            keys, self._dead, token=token, event=data, state=terminal_state(event), error=error_of(event),
            now=time.time(), ttl_ms=self._ttl_ms, group=GROUP, job_id=job_id, dead_letter=dead_letter,
            dead_maxlen=DEAD_LETTER_MAXLEN, write_id=wrote, seq=seq).run(self._finish))

    def _through_blips(self, what: str, call: Callable[[], T]) -> T:
        """A worker's write to a job it holds, retried through a Redis blip (a restart, a failover, a stall: a
        ConnectionError or TimeoutError; or Redis out of memory, refusing writes until keys expire or an operator
        frees some) for up to the visibility timeout, after which the job may be another worker's - the scripts'
        ownership check then says so. Without this a blip of a second failed a running job, or abandoned it to be
        re-run from its first step. Each retry repeats the script with the same write id, so one whose reply was
        lost is not applied twice."""
        return retrying(what, call, self.settings.visibility_timeout_s,
                        lambda e: isinstance(e, redis.ConnectionError | redis.TimeoutError) or storage_full(e))
