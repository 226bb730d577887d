"""What a worker's claims wrote to their jobs' events lately, so that a claim can write it again when Redis loses it.

Redis answers a write before it is on disk. With `appendfsync everysec` a crash of its host (or of its disk) takes
the writes of up to the last second or two (one between fsyncs, two when a slow fsync holds the next write back),
and a replica promoted after a failover can lack as much; a SIGKILL of the process alone loses nothing, the kernel
still has what it wrote. After such a loss a job's event stream ends before events the worker was told were
written, and that a client may already have received: without a rewrite the worker's next event would take the
sequence number of a lost one, so a client resuming from the sequence it saw would skip events, and the stream
would keep a hole where the lost steps were.

So every event a claim writes names the sequence it is to get (the scripts' `seq` argument, redis_lua.OWNED): the
claim knows that sequence, since while it holds the job no one else appends to its events. When Redis says the
stream is out of step, the claim writes its own lost events again, the same bytes at the same sequences, and goes
on: a client resuming from any sequence it saw before the loss sees what it would have seen without it. A claim
makes no write while Redis is down, so what Redis loses of it is always its latest writes: it keeps the latest
REWRITE_KEEP_BYTES of them (a second of events of a GPU worker, all the events of a job on the shipped model). A
loss that reaches further back cannot be repaired by the claim, which then stops, and the job is reclaimed after
the visibility timeout by a worker that publishes the steps missing from the stream (the client skips those it has).

A "sequence" here is the job hash's `seq`: how many events the job has once the write is in (its event's stream id
is 0-seq, the sequence a client sees seq - 1).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

# How much of its latest writes a claim keeps (its last write whatever its size).
REWRITE_KEEP_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Written:
    """One event a claim wrote: its sequence (the job hash's `seq` after it: the event's stream id is 0-seq), its
    bytes as the publish script took them, whether it was Started."""

    seq: int
    data: bytes
    started: bool


@dataclass
class _Claim:
    seq: int  # the job hash's `seq` after the claim's latest write, as the claim knows it
    recent: deque[Written] = field(default_factory=deque)
    kept: int = 0  # bytes in `recent`


class ClaimWrites:
    """Per claim token: the job's latest sequence as the claim knows it and its latest writes, up to `keep_bytes`.
    Thread-safe (a job's thread and the worker's publisher thread write for one claim)."""

    def __init__(self, keep_bytes: int = REWRITE_KEEP_BYTES) -> None:
        self._keep_bytes = keep_bytes
        self._claims: dict[str, _Claim] = {}
        self._lock = threading.Lock()

    def begin(self, token: str, seq: int) -> None:
        """The claim `token` holds the job, which has `seq` events (its claim script's answer)."""
        with self._lock:
            self._claims[token] = _Claim(seq)

    def next_seq(self, token: str) -> int | None:
        """The sequence the claim's next write is to leave; None for a claim not begun (its writes unchecked)."""
        with self._lock:
            claim = self._claims.get(token)
            return None if claim is None else claim.seq + 1

    def wrote(self, token: str, seq: int | None, data: bytes, started: bool) -> None:
        """The event `data` was written at `seq` (next_seq's answer) and acknowledged."""
        with self._lock:
            claim = self._claims.get(token)
            if claim is None or seq is None:
                return
            claim.seq = seq
            claim.recent.append(Written(seq, data, started))
            claim.kept += len(data)
            while claim.kept > self._keep_bytes and len(claim.recent) > 1:
                claim.kept -= len(claim.recent.popleft().data)

    def lost(self, token: str, stream_seq: int) -> list[Written] | None:
        """The claim's events after `stream_seq` (the job hash's `seq` in Redis now), to write again in order; None
        when they cannot all be (some were no longer kept, or the stream is ahead of the claim)."""
        with self._lock:
            claim = self._claims.get(token)
            if claim is None or stream_seq >= claim.seq:
                return None
            lost = [w for w in claim.recent if w.seq > stream_seq]  # in order, one sequence after another
        return lost if lost and lost[0].seq == stream_seq + 1 else None

    def end(self, token: str) -> None:
        """The claim is over (finished, handed back, lost): forget it."""
        with self._lock:
            self._claims.pop(token, None)
