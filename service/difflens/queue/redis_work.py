"""Which work entry a worker gets next, out of the work streams of its models (redis_streams.py runs the claim
script on it): the consumer groups, a reclaim scan per stream, and reads that take the streams in turns.

A read of several streams with COUNT 1 returns an entry of each that has one, and a worker takes one job per claim.
So a worker of several models first reads its streams one at a time, then blocks on all of them; an entry that
still comes back beside another (the streams filled while it waited) is handed back at once for any worker's
reclaim scan, instead of waiting out the visibility timeout in this worker's pending list.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from typing import Any, NamedTuple

import redis

from difflens.config import ServiceSettings
from difflens.queue import redis_scripts
from difflens.queue.common import text

log = logging.getLogger(__name__)

GROUP = "workers"  # the consumer group every worker reads the work streams with


def work_stream(queue_name: str, model: str) -> str:
    """The work stream of `model`'s jobs: the key a worker of the model reads, with the consumer group GROUP."""
    return f"{queue_name}:work:{model}"


class WorkEntry(NamedTuple):
    """A work entry delivered to this worker. `fields` (job, spec, enqueue time) only on its first delivery."""

    stream: str
    entry_id: bytes
    job_id: str
    fields: dict[bytes, bytes] | None


# KEYS[1] a work stream. ARGV[1] the group, ARGV[2..] consumer names. Deletes those that hold no pending entry (in
# one step: a consumer deleted with entries would take them out of the pending list, beyond any reclaim).
FORGET_CONSUMERS = """
local n = 0
for i = 2, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[i]) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[i])
    n = n + 1
  end
end
return n
"""


class WorkStreams:
    """The work streams P:work:<model> as one worker process reads them. Thread-safe (a lock guards the scan
    cursors and the turn)."""

    def __init__(self, r: Any, settings: ServiceSettings) -> None:
        self._r = r
        self.settings = settings
        self.prefix = work_stream(settings.queue_name, "")
        # XAUTOCLAIM scans the pending list; doing it on every claim would cost a round trip per job for
        # something only needed on the scale of the visibility timeout.
        self._reclaim_every_s = min(1.0, settings.visibility_timeout_s / 3)
        self._idle_ms = max(1, int(settings.visibility_timeout_s * 1000))
        self._last_reclaim = 0.0
        self._last_prune = time.monotonic()
        self._cursors: dict[str, bytes | str] = {}  # work stream -> where its reclaim scan goes on
        self._lock = threading.Lock()
        self._grouped: set[str] = set()  # work streams whose consumer group this object made or found
        self._turn = 0  # which stream is read first: turns, so no model starves the others
        self._forget = r.register_script(FORGET_CONSUMERS)

    def model_of(self, stream: str) -> str:
        return stream[len(self.prefix):]

    def next_entry(self, worker: str, models: Collection[str], block_s: float) -> WorkEntry | None:
        """A reclaimable entry of the streams of `models`, else a new one (waiting up to block_s), else None."""
        streams = self.streams(models)
        return self._reclaimable(worker, streams) or self._read_new(worker, streams, block_s)

    def prepare(self, models: Collection[str]) -> None:
        """The consumer group of each model's work stream, made now (with the stream) where missing."""
        for model in models:
            self._create_group(work_stream(self.settings.queue_name, model))

    def streams(self, models: Collection[str]) -> list[str]:
        """The work streams of `models`, their consumer groups made if this object has not yet, in turns: the
        first one read changes from claim to claim."""
        streams = [self.prefix + m for m in sorted(models)]
        for stream in streams:
            if stream not in self._grouped:
                self._create_group(stream)
        with self._lock:
            self._turn = (self._turn + 1) % len(streams)
            turn = self._turn
        return streams[turn:] + streams[:turn]

    def read_group(self, worker: str, streams: list[str], block_ms: int | None) -> WorkEntry | None:
        """One XREADGROUP of `streams`, COUNT 1. A blocking read of several streams can still return an entry of
        more than one (they filled while it waited); the first is taken and the others are given up (`_release`)."""
        reply = self._r.xreadgroup(GROUP, worker, {s: ">" for s in streams}, count=1, block=block_ms)
        entries = [(text(stream), entry_id, fields) for stream, items in reply or () for entry_id, fields in items]
        if not entries:
            return None
        for stream, entry_id, _ in entries[1:]:
            self._release(worker, stream, entry_id)
        stream, entry_id, fields = entries[0]
        return WorkEntry(stream, entry_id, text(fields[b"job"]), fields)

    def _create_group(self, stream: str) -> None:
        """The workers' consumer group on a work stream, made with the stream unless it exists. From id 0: jobs
        queued before any worker of the model started, or before a lost group was made again, are handed out."""
        try:
            self._r.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._grouped.add(stream)

    def _group_lost(self, e: redis.ResponseError, streams: list[str]) -> bool:
        """Whether `e` says a consumer group is gone - then the groups of `streams` are made again. A Redis that
        restarted without its data (or was flushed) has lost them while fronts go on adding work entries to new
        streams; without this every worker would fail every read until restarted, and those jobs would wait
        forever. A read blocked while its stream was deleted ends with UNBLOCKED instead of NOGROUP."""
        if not str(e).startswith(("NOGROUP", "UNBLOCKED")):
            return False
        log.warning("queue %s: the consumer group %r was gone (Redis restarted without its data, or was flushed); "
                    "made it again", self.settings.queue_name, GROUP)
        for stream in streams:
            self._create_group(stream)
        return True

    def _reclaimable(self, worker: str, streams: list[str]) -> WorkEntry | None:
        """An entry of `streams` whose holder stopped heartbeating for longer than the visibility timeout, now
        ours (no fields: not a first delivery).

        XAUTOCLAIM looks at no more than 10 x COUNT pending entries per call, so with many live jobs held the scan
        must walk on from the cursor it returns: restarting at 0-0 would never get past the oldest live ones."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_reclaim < self._reclaim_every_s:
                return None
            self._last_reclaim = now
            prune = now - self._last_prune >= 10 * self.settings.visibility_timeout_s
            if prune:
                self._last_prune = now
        if prune:
            for stream in streams:
                self.prune(stream)
        for stream in streams:
            with self._lock:
                cursor = self._cursors.get(stream, "0-0")
            try:
                next_cursor, claimed, *_ = self._r.xautoclaim(stream, GROUP, worker, self._idle_ms,
                                                              start_id=cursor, count=1)
            except redis.ResponseError as e:
                if not self._group_lost(e, streams):
                    raise
                next_cursor, claimed = "0-0", []
            with self._lock:
                self._cursors[stream] = next_cursor
                if claimed or next_cursor != b"0-0":
                    self._last_reclaim = 0.0  # the scan is not finished: go on at the next claim
            if claimed and claimed[0][1]:  # an entry deleted meanwhile comes back without fields
                entry_id, fields = claimed[0]
                return WorkEntry(stream, entry_id, text(fields[b"job"]), None)
        return None

    def forget(self, streams: Collection[str], workers: Collection[str]) -> None:
        """Delete the consumers `workers` of `streams`' group where they hold no pending entry. Worker names are
        unique per process start, so without this every start would leave one behind in every stream it read."""
        for stream in streams:
            try:
                redis_scripts.forget_consumers(stream, GROUP, workers).run(self._forget)
            except redis.ResponseError as e:
                if not self._group_lost(e, [stream]):
                    raise

    def prune(self, stream: str) -> None:
        """Forget the consumers of `stream` idle for 10 visibility timeouts (workers SIGKILLed or gone without
        retiring; their entries were reclaimed by others meanwhile). A live one deleted this way is made again by
        its next read."""
        try:
            idle = [text(c["name"]) for c in self._r.xinfo_consumers(stream, GROUP)
                    if int(c["pending"]) == 0 and int(c["idle"]) > 10 * self._idle_ms]
        except redis.ResponseError as e:
            if self._group_lost(e, [stream]):
                return
            raise
        if idle:
            self.forget([stream], idle)

    def _read_new(self, worker: str, streams: list[str], block_s: float) -> WorkEntry | None:
        """A new work entry of `streams` for `worker`, or None after block_s."""
        # never block past the next reclaim scan, so abandoned jobs are found while the stream is idle
        block_ms = int(min(block_s, self._reclaim_every_s) * 1000)
        try:
            if len(streams) > 1:
                # One stream at a time first: a read of several hands this worker an entry of each that has one.
                for stream in streams:
                    entry = self.read_group(worker, [stream], None)
                    if entry is not None:
                        return entry
            return self.read_group(worker, streams, block_ms if block_ms > 0 else None)
        except redis.ResponseError as e:
            if not self._group_lost(e, streams):
                raise
            return None

    def _release(self, worker: str, stream: str, entry_id: bytes) -> None:
        """Give up a work entry delivered to `worker` that it will not claim: its idle time is set to the
        visibility timeout, so the next reclaim scan of any worker of the model takes it. Its job's delivery count
        is unchanged (only the claim script counts)."""
        self._r.xclaim(stream, GROUP, worker, 0, [entry_id], idle=self._idle_ms, justid=True)
        with self._lock:
            self._last_reclaim = 0.0
        log.debug("work entry %s of %s: delivered beside another, handed back for reclaim", entry_id, stream)
