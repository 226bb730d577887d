"""Cross-job UNet batching: the DF-RISE calls of a worker's concurrent jobs share UNet calls.

Each job thread gets its own `JobRunner` (an engine UNetRunner). Outside DF-RISE it calls the UNet directly, alone:
a batch's composition changes the last bits of its results (other BLAS paths), and the denoising trajectory must
stay bit-identical to `difflens explain`. Inside DF-RISE (the worker's explainer guard switches the runner into
batching mode) every raw() call goes to the model's `UNetBatcher`, which concatenates the pending requests of all
jobs that are in DF-RISE at that moment, up to `max_batch` samples per UNet call, runs them once and hands each
job its slice. A call is made as soon as every job in DF-RISE has a request waiting (nobody else can add to it)
or the samples fill a call, so no timer is involved. Only requests of one shape share a call (jobs of different
image sizes, or of different prompt lengths, run in turn). A family's added conditioning (SDXL's pooled embeddings
and time ids) travels with each request and is concatenated like the embeddings.

A call that runs out of device memory (torch.OutOfMemoryError, which a CUDA out-of-memory error is) is run again as
calls of half its samples, and calls of that shape stay at most that large for the worker's life; a call of one
sample that does not fit fails the jobs in it with the error (the worker fails them RESOURCE_EXHAUSTED and goes on).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from difflens.engine.runner import Added, UNetRunner
from difflens.models import RWLock

log = logging.getLogger(__name__)

# (latents, timesteps, embeds) -> output; called with a fourth argument, the added conditioning, when a request has it
RawFn = Callable[..., torch.Tensor]
ShapeKey = tuple


def shape_key(latents: torch.Tensor, embeds: torch.Tensor, added: Added | None = None) -> ShapeKey:
    """What requests must share to be concatenated into one call. latents: (n, C, h, w); embeds: (n, L, D);
    added: {name: (n, ...)} or None."""
    extra = tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted((added or {}).items()))
    return (tuple(latents.shape[1:]), latents.dtype, tuple(embeds.shape[1:]), embeds.dtype, extra)


@dataclass(eq=False)
class _Request:
    """One raw() call of one job. latents: (n, C, h, w); timesteps: (n,); embeds: (n, L, D); added: {name: (n, ...)}
    or None."""

    owner: int
    latents: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    added: Added | None = None
    sent: int = 0  # samples already handed to a UNet call (a request larger than max_batch spans calls)
    parts: list[torch.Tensor] = field(default_factory=list)
    received: int = 0
    error: BaseException | None = None
    shared: bool = False  # some call of it held other jobs' samples, or it was split

    @property
    def n(self) -> int:
        return int(self.latents.shape[0])

    @property
    def done(self) -> bool:
        return self.error is not None or self.received == self.n

    @property
    def key(self) -> ShapeKey:
        """Requests with the same key can be concatenated into one call."""
        return shape_key(self.latents, self.embeds, self.added)


@dataclass
class BatchStats:
    """What one UNet call held: samples, and how many distinct jobs they came from."""

    samples: int
    jobs: int


class UNetBatcher:
    """Collects the concurrent DF-RISE raw() requests of the jobs of one model into shared UNet calls.

    `fn(latents (N, C, h, w), timesteps (N,), embeds (N, L, D)) -> (N, C, h, w)` is the UNet call; `on_batch` sees
    each call's BatchStats (metrics, tests). `pad_to_bucket`: pad every call to a power of two (at most
    max_batch) so a compiled UNet sees few shapes; padding samples are zeros and are dropped.
    """

    def __init__(self, fn: RawFn, max_batch: int, on_batch: Callable[[BatchStats], None] | None = None,
                 pad_to_bucket: bool = False) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fn = fn
        self.max_batch = max_batch
        self.on_batch = on_batch
        self.pad_to_bucket = pad_to_bucket
        self._cv = threading.Condition()
        self._pending: list[_Request] = []
        self._participants = 0
        self._busy = False
        self._limits: dict[ShapeKey, int] = {}  # samples per call of a shape, where it ran out of memory at more

    def limit(self, latents: torch.Tensor, embeds: torch.Tensor, added: Added | None = None) -> int:
        """The most samples a call of these requests' shape holds: max_batch, or less after running out of memory.
        latents: (n, C, h, w); embeds: (n, L, D); added: {name: (n, ...)} or None."""
        with self._cv:
            return self._limit(shape_key(latents, embeds, added))

    def _limit(self, key: ShapeKey) -> int:
        return self._limits.get(key, self.max_batch)

    @contextmanager
    def participant(self) -> Iterator[None]:
        """While a job is inside DF-RISE: the batcher waits for its requests before making a call."""
        with self._cv:
            self._participants += 1
        try:
            yield
        finally:
            with self._cv:
                self._participants -= 1
                self._cv.notify_all()  # a waiting leader may now have every remaining participant's request

    def submit(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
               added: Added | None = None) -> tuple[torch.Tensor, bool]:
        """UNet output for one request, computed in a shared call. latents: (n, C, h, w); timesteps: (n,);
        embeds: (n, L, D); added: {name: (n, ...)} or None -> ((n, C, h, w), shared). Call only from inside
        `participant()`."""
        req = _Request(threading.get_ident(), latents, timesteps, embeds, added)
        with self._cv:
            self._pending.append(req)
            self._cv.notify_all()
        while True:
            with self._cv:
                while not req.done and (self._busy or not self._due()):
                    self._cv.wait()
                if req.done:
                    break
                # Leader: this thread runs the next call for everyone (its own request may not be in it).
                batch = self._take()
                self._busy = True
            try:
                self._run(batch)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
        if req.error is not None:
            raise req.error
        return torch.cat(req.parts), req.shared

    def _waiting(self) -> dict[ShapeKey, int]:
        """Samples not yet handed to a call, per request shape (in order of each shape's oldest request)."""
        waiting: dict[tuple, int] = {}
        for r in self._pending:
            waiting[r.key] = waiting.get(r.key, 0) + r.n - r.sent
        return waiting

    def _due(self) -> bool:
        if not self._pending:
            return False
        owners = {r.owner for r in self._pending}
        return len(owners) >= self._participants or any(n >= self._limit(k) for k, n in self._waiting().items())

    def _take(self) -> list[tuple[_Request, int, int]]:
        """(request, start, stop) slices of one shape, first come first served, up to its limit of samples: the
        first shape that fills a call, else the shape of the oldest request."""
        waiting = self._waiting()
        key = next((k for k, n in waiting.items() if n >= self._limit(k)), next(iter(waiting)))
        room, batch = self._limit(key), []
        for req in [r for r in self._pending if r.key == key]:
            if room == 0:
                break
            k = min(room, req.n - req.sent)
            batch.append((req, req.sent, req.sent + k))
            req.sent += k
            room -= k
            if req.sent == req.n:
                self._pending.remove(req)
        shared = len(batch) > 1
        for req, start, stop in batch:
            req.shared |= shared or stop - start < req.n
        return batch

    def _run(self, batch: list[tuple[_Request, int, int]]) -> None:
        n = sum(b - a for _, a, b in batch)
        size = min(self._limit(batch[0][0].key), 1 << (n - 1).bit_length()) if self.pad_to_bucket else n
        try:  # everything that can fail, so that an error reaches every request of the call
            lat = torch.cat([r.latents[a:b] for r, a, b in batch])
            ts = [r.timesteps[a:b] for r, a, b in batch]
            if len({t.dtype for t in ts}) > 1:
                ts = [t.float() for t in ts]  # the UNet's time projection casts to float32 anyway: same values
            tim = torch.cat(ts)
            emb = torch.cat([r.embeds[a:b] for r, a, b in batch])
            first = batch[0][0].added  # one shape key: every request has the same names, or none
            added = None if first is None else {
                k: torch.cat([r.added[k][a:b] for r, a, b in batch if r.added is not None]) for k in first}
            if size > n:
                lat, tim, emb = (_padded(x, size) for x in (lat, tim, emb))
                added = None if added is None else {k: _padded(v, size) for k, v in added.items()}
            with torch.no_grad():
                out = (self.fn(lat, tim, emb) if added is None else self.fn(lat, tim, emb, added))[:n]
        except torch.OutOfMemoryError as e:
            if size > 1:
                self._again_halved(batch, size, e)
            else:
                self._failed(batch, e)
            return
        except BaseException as e:
            self._failed(batch, e)
            if not isinstance(e, Exception):
                raise
            return
        with self._cv:
            pos = 0
            for r, a, b in batch:
                r.parts.append(out[pos:pos + b - a])
                r.received += b - a
                pos += b - a
        if self.on_batch is not None:
            self.on_batch(BatchStats(samples=n, jobs=len({r.owner for r, _, _ in batch})))

    def _failed(self, batch: list[tuple[_Request, int, int]], err: BaseException) -> None:
        """Every job in the call gets the error in its own thread (the leader's too, when its request is in it)."""
        with self._cv:
            for r, _, _ in batch:
                r.error = err
            self._pending = [r for r in self._pending if r.error is None]

    def _again_halved(self, batch: list[tuple[_Request, int, int]], size: int, err: BaseException) -> None:
        """A call of `size` samples ran out of memory: calls of its shape hold at most half as many from now on, and
        its slices go back to the head of the queue, to be run again in those smaller calls."""
        key, limit = batch[0][0].key, max(1, size // 2)
        with self._cv:
            self._limits[key] = min(limit, self._limit(key))
            again = [r for r, _, _ in batch]
            for r, start, _ in batch:
                r.sent = start  # each request's slice in the call was its latest: nothing after it was sent
            self._pending = again + [r for r in self._pending if r not in again]
        log.warning("a UNet call of %d samples ran out of memory (%s); calls of latents %s now hold at most %d",
                    size, str(err).splitlines()[0] if str(err) else type(err).__name__, key[0], limit)


def _padded(x: torch.Tensor, size: int) -> torch.Tensor:
    """x: (n, ...) -> (size, ...), zeros after the first n."""
    return torch.cat([x, x.new_zeros(size - x.shape[0], *x.shape[1:])])


class JobRunner(UNetRunner):
    """One job's runner over the model's shared UNet: alone for denoising, batched (via `batcher`) in DF-RISE.

    `base` is the process's runner of the model (its backend and compiled function are reused, not rebuilt);
    `lock` is the model's RWLock. `denoise_s` accumulates the wall time of the job's own UNet calls outside
    DF-RISE (the worker reads and resets it per step); `rise_shared` records whether any DF-RISE call of the
    current step shared a UNet call with other jobs or was split (then its maps are not bit-reproducible alone);
    `oom_batch` the fewest samples per call its DF-RISE requests ran at because the batcher ran out of memory (None:
    it never did).
    """

    halve_on_oom = False  # the shared batches halve themselves (UNetBatcher); denoising is one latent per call

    def __init__(self, base: UNetRunner, lock: RWLock, batcher: UNetBatcher) -> None:
        super().__init__(base.unet, "eager", call=base.call)  # eager: the compiled function is base's, reused below
        self.base = base
        self.backend = base.backend
        self.requested_backend = base.requested_backend
        self.lock = lock
        self.batcher = batcher
        self.batching = False
        self.denoise_s = 0.0
        self.rise_shared = False
        self.oom_batch: int | None = None

    def raw(self, latents: torch.Tensor, timestep: int | torch.Tensor, embeds: torch.Tensor,
            added: Added | None = None) -> torch.Tensor:
        """UNet output. latents: (N, C, h, w); embeds: (N, L, D); timestep: int or (N,); added: {name: (N, ...)} or
        None. -> (N, C, h, w)."""
        if self.batching:
            t = torch.as_tensor(timestep, device=latents.device)
            t = t.expand(latents.shape[0]) if t.dim() == 0 else t
            out, shared = self.batcher.submit(latents, t, embeds, added)
            self.rise_shared |= shared
            limit = self.batcher.limit(latents, embeds, added)
            if limit < self.batcher.max_batch:
                self.oom_batch = min(limit, self.oom_batch or limit)
            return out
        with self.lock.shared():
            t0 = time.perf_counter()
            out = self.base.raw(latents, timestep, embeds, added)
            self.denoise_s += time.perf_counter() - t0
        return out

    @contextmanager
    def guard(self, method: str) -> Iterator[None]:
        """The engine's explainer guard: DF-RISE batches with the other jobs (the model lock held shared for the
        whole step, so no hooked explainer starts meanwhile); DF-CAM and attention hold the lock exclusively."""
        if method != "rise":
            with self.lock.exclusive():
                yield
            return
        with self.lock.shared(), self.batcher.participant():
            self.batching = True
            try:
                yield
            finally:
                self.batching = False
