"""One claimed job, run to its terminal event: Started, a Step per explained step as it happens (and, when the
request asks for them, a Progress per step that is not explained), then Completed
(image and audit record) or Failed. Cancellation, deadlines and lost ownership are checked between denoising steps.

Step events are handed to the worker's publisher thread (`publisher`), so the denoising loop does not wait on the
queue's round trip for each explained step (~1.5 ms on Redis here, bench/service.py): the publish of step k
overlaps step k + 1, and the last one overlaps decoding, the PNG and the audit record. The publisher is one thread,
so a job's events keep their order; the terminal event waits for every publish before it. A publish that says the
claim lost the job, or that a cancel was requested, or that fails, is acted on at the next check between steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import torch

from difflens import audit, metrics
from difflens.config import ServiceSettings
from difflens.engine.explain import Explanation, StepExplanation, run_explanation
from difflens.engine.tokens import prompt_tokens
from difflens.engine.validate import resolve_generation
from difflens.errors import BackendUnavailable, Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted
from difflens.jobs import Completed, Event, Failed, FailureCode, Progress, Started, Step
from difflens.models import LoadedModel
from difflens.queue.base import Claim, JobNotFound, JobQueue, Published
from difflens.queue.common import (
    CANCELLED_MESSAGE,
    SHUTDOWN_MESSAGE,
    STORAGE_FULL_MESSAGE,
    retrying,
    storage_full,
)
from difflens.render.outputs import image_png
from difflens.worker.batching import JobRunner
from difflens.worker.events import step_event

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error while running the job (details are in the worker's log)"
AUDIT_STORE_MESSAGE = "the job's audit record could not be stored (details are in the worker's log)"
OUT_OF_MEMORY_MESSAGE = ("the job does not fit in the worker's device memory, even one sample per UNet call; use a "
                         "smaller image, fewer DF-CAM layers, or a worker with more memory")
DEADLINE_MESSAGE = "the job's deadline passed while it ran"
# The engine names the attention method "attn"; metrics and the contract say "attention".
METRIC_METHOD = {"rise": "rise", "cam": "cam", "attn": "attention"}


class LostClaim(Exception):
    """This worker no longer owns the job (it was reclaimed after a missed heartbeat): stop without a word."""


class HandBack(Exception):
    """The worker is stopping and will not finish the job: give it back to the queue for another worker."""


class ShuttingDown(Exception):
    """The process is going, its queue with it (serve --embedded): nobody could take the job over."""


class AuditNotStored(Exception):
    """The deployment keeps audit records (--audit-dir) and this job's could not be written: no image without it."""


@dataclass(frozen=True)
class Outcome:
    """How a job that raised `exception` ends: its Failed event (`code`; `message`, None: the exception's own
    text), the status label of difflens_jobs_total, the type of difflens_errors_total (None: no error counted), and
    the worker's log line (`log`, formatted with job= and error=; None: none) at `level`, traceback or not. `when`
    narrows the match (the first entry of OUTCOMES that matches is the one)."""

    exception: type[BaseException]
    code: FailureCode
    status: str
    error: str | None
    message: str | None = None
    log: str | None = None
    level: int = logging.WARNING
    trace: bool = False
    when: Callable[[BaseException], bool] | None = None


OUTCOMES: tuple[Outcome, ...] = (
    # the queue goes with the process (serve --embedded): nobody could take the job over
    Outcome(ShuttingDown, "UNAVAILABLE", "failed", "shutdown", SHUTDOWN_MESSAGE),
    Outcome(Cancelled, "CANCELLED", "cancelled", None, CANCELLED_MESSAGE),
    Outcome(DeadlineExceeded, "DEADLINE_EXCEEDED", "deadline_exceeded", "deadline_exceeded", DEADLINE_MESSAGE),
    Outcome(InvalidArgument, "INVALID_ARGUMENT", "failed", "invalid_argument"),
    # refused before its first UNet call: it would not fit (engine/memory.py)
    Outcome(ResourceExhausted, "RESOURCE_EXHAUSTED", "failed", "out_of_memory", log="job {job}: {error}"),
    # the worker goes on with its next job; the memory the call took is free again
    Outcome(torch.OutOfMemoryError, "RESOURCE_EXHAUSTED", "failed", "out_of_memory", OUT_OF_MEMORY_MESSAGE,
            log="job {job}: out of memory even at one sample per UNet call", trace=True),
    # the Triton server went away: this job fails, the worker goes on
    Outcome(BackendUnavailable, "UNAVAILABLE", "failed", "unet_backend", log="job {job}: {error}"),
    Outcome(AuditNotStored, "INTERNAL", "failed", "audit_store", AUDIT_STORE_MESSAGE, log="job {job}: {error}",
            level=logging.ERROR, trace=True),
    # its events did not fit in the queue's storage (the Failed event is small: it may still)
    Outcome(Exception, "RESOURCE_EXHAUSTED", "failed", "queue", STORAGE_FULL_MESSAGE, log="job {job} failed",
            level=logging.ERROR, trace=True, when=storage_full),
    Outcome(Exception, "INTERNAL", "failed", "internal", INTERNAL_MESSAGE, log="job {job} failed",
            level=logging.ERROR, trace=True),
)


def outcome_of(e: Exception) -> Outcome:
    """The first entry of OUTCOMES that `e` matches (the last matches every Exception)."""
    return next(o for o in OUTCOMES if isinstance(e, o.exception) and (o.when is None or o.when(e)))


@dataclass
class RunState:
    """What a JobRun learns and keeps as it runs (its dependencies are JobRun's own fields)."""

    denoise_s: dict[int, float] = field(default_factory=dict)
    rise_exact: dict[int, bool] = field(default_factory=dict)
    published: set[int] = field(default_factory=set)
    progressed: int = -1  # the last step index a Step or Progress event went out for (none again on re-delivery)
    words: list[str] = field(default_factory=list)
    pending: StepExplanation | None = None
    # The cancel flag as the last publish saw it, for the check right after it (None: ask the queue: pushed, or
    # else read).
    cancel_seen: bool | None = None
    in_flight: list[Future[Published | None]] = field(default_factory=list)
    publish_error: BaseException | None = None  # a step publish failed: the job's later steps are not published


@dataclass
class JobRun:
    """Runs `claim` on `entry` with `runner` (this job's JobRunner). `lost` is set by the worker's heartbeat
    thread (or a publish) when the queue says the claim lost the job. `publisher`: a one-thread executor for step
    events (None: publish them on the job's thread). `confirmed`: for a claim handed out ahead of its settling
    (JobQueue.claim_ahead), whether it holds; the job runs meanwhile but publishes nothing until it is True, and
    stops when it is False (None: settled). These are what the worker hands it; `state` is what the run keeps."""

    claim: Claim
    queue: JobQueue
    entry: LoadedModel
    runner: JobRunner
    settings: ServiceSettings
    lost: threading.Event = field(default_factory=threading.Event)
    publisher: Executor | None = None
    confirmed: Future[bool] | None = None
    handing_back: threading.Event | None = None  # set by a stopping worker: give the job back at the next step
    shutting_down: threading.Event | None = None  # set when the queue goes with the process: fail at the next step
    state: RunState = field(default_factory=RunState, init=False)

    @property
    def model_label(self) -> str:
        return self.entry.name

    def run(self) -> str | None:
        """Run to the end; returns the terminal status (a metrics label) or None when the job was lost."""
        claim, state, started = self.claim, self.state, time.time()
        if not claim.resumed:
            self._when_owned(lambda: metrics.QUEUE_WAIT.labels(self.model_label).observe(
                max(0.0, started - claim.enqueued_at)))
        else:  # reclaimed or handed back: the client already saw these steps from an earlier holder
            seen = [e for _, e in self._events_so_far() if isinstance(e, Step | Progress)]
            state.published = {e.index for e in seen if isinstance(e, Step)}
            state.progressed = max((e.index for e in seen), default=-1)
        try:
            if claim.started:  # the claim writes Started only if it saw no cancel flag (ahead: if confirmed)
                state.cancel_seen = False
            else:
                self._publish_or_stop(Started(worker=claim.worker, attempt=claim.delivery))
            exp = self._explain()
            png = image_png(exp.image)
            record = self._record(exp, png, started)
            text = audit.dumps(record)
            self._settle(wait=True)
            if self.settings.audit_dir is not None and self._owned():
                try:
                    audit.store(text, record, self.settings.audit_dir)
                except OSError as e:  # no image without its record: the deployment asked for them to be kept
                    raise AuditNotStored(f"audit record not stored in {self.settings.audit_dir}") from e
            return self._finish(Completed(png, text), "completed")
        except HandBack:
            self._hand_back()
            return None
        except LostClaim:
            if self.confirmed is not None and self.confirmed.done() and not self.confirmed.result():
                log.info("job %s: not taken after all: the queue failed or dropped it as it claimed it (cancelled, "
                         "past its deadline, or already ended); stopped", claim.job_id)
            else:
                log.info("job %s: lost to another worker (delivery %d); stopped", claim.job_id, claim.delivery)
            return None
        except Exception as e:
            return self._fail(e)

    def _fail(self, e: Exception) -> str | None:
        """End the job as OUTCOMES says for `e`: its log line, its Failed event, its metrics."""
        o = outcome_of(e)
        if o.log is not None:
            log.log(o.level, o.log.format(job=self.claim.job_id, error=e), exc_info=e if o.trace else None)
        return self._finish(Failed(o.code, str(e) if o.message is None else o.message), o.status, o.error)

    def _events_so_far(self) -> list[tuple[int, Event]]:
        """The job's events, read through a queue blip of up to the visibility timeout (the heartbeat thread holds
        the claim meanwhile): a failed read here used to kill the job thread and leave the job to be reclaimed."""
        return retrying(f"reading the events of job {self.claim.job_id}", lambda: self.queue.events(self.claim.job_id),
                        self.settings.visibility_timeout_s, lambda e: not isinstance(e, JobNotFound))

    def _explain(self) -> Explanation:
        spec, model = self.claim.spec, self.entry.model
        self._check_memory()
        self.state.words = [t.text for t in prompt_tokens(model.tokenizer, spec.params.prompt)]
        return run_explanation(model, spec.params, spec.explain, runner=self.runner, on_step=self._on_step,
                               on_progress=self._on_progress, check=self._check, guard=self.runner.guard)

    def _check_memory(self) -> None:
        """ResourceExhausted when one of the job's UNet calls would not fit in the device memory free now (the
        family's activations per sample at this latent size, engine/memory.py): refused at its claim, before
        anything runs, rather than dying on it. Out-of-memory errors at run time are the batcher's (it halves)."""
        if self.entry.memory is None:
            return
        from difflens.engine.families import of
        from difflens.engine.memory import check_fits

        model = self.entry.model
        params = resolve_generation(model, self.claim.spec.params)
        f = model.vae_scale_factor
        latent = (of(model).latent_channels(model), int(params.height or 0) // f, int(params.width or 0) // f)
        cfg = model.family.cfg and float(params.guidance_scale or 0) > 1  # FLUX: one branch whatever the scale
        check_fits(self.entry.memory, self.claim.spec.explain, latent, cfg,
                   model.device, max_batch=self.settings.worker_max_batch)

    def _check(self, index: int) -> None:
        """Before denoising step `index`: ownership, cancel flag, deadline, a stopping worker (in that order)."""
        pushed = self._settle(wait=False)
        if self.lost.is_set() or (self.confirmed is not None and self.confirmed.done() and not self._owned()):
            raise LostClaim
        if self._cancel_requested(pushed, index):
            raise Cancelled(f"cancelled before step {index}")
        deadline = self.claim.spec.deadline
        if deadline is not None and time.time() >= deadline:
            raise DeadlineExceeded(f"deadline passed before step {index}")
        # after the cancel and the deadline: a job to be stopped anyway ends here, not handed on
        if self.shutting_down is not None and self.shutting_down.is_set():
            raise ShuttingDown(f"before step {index}")
        if self.handing_back is not None and self.handing_back.is_set():
            raise HandBack(f"before step {index}")

    def _cancel_requested(self, pushed: bool, index: int) -> bool:
        """Whether the job's cancel flag is up, from the cheapest source that knows: a step publish settled just now
        saw it (`pushed`); else the answer of the last publish, if none came since it was used; else the queue's
        pushed signal, if it has one; else the flag read from the queue (unreadable: not now, a later step asks)."""
        last, self.state.cancel_seen = self.state.cancel_seen, None  # a publish's answer holds for one check
        if pushed:
            return True
        if last is not None:
            return last
        signalled = self.queue.cancel_signalled(self.claim.job_id)
        if signalled is not None:
            return signalled
        try:
            return self.queue.cancel_requested(self.claim.job_id)
        except Exception:  # the queue is unreachable for now: a cancel is noticed at a later step
            log.debug("job %s: cancel flag unreadable before step %d", self.claim.job_id, index, exc_info=True)
            metrics.ERRORS.labels("queue").inc()
            return False

    def _on_step(self, se: StepExplanation) -> None:
        """An explained step's maps exist; it is published from _on_progress, which knows the step count."""
        if "rise" in se.seconds:
            self.state.rise_exact[se.index] = not self.runner.rise_shared
        self.runner.rise_shared = False
        for name, seconds in se.seconds.items():
            metrics.STEP_DURATION.labels(self.model_label, METRIC_METHOD[name], metrics.t_bucket(se.timestep)) \
                .observe(seconds)
        if "rise" in se.seconds and se.rise is not None:  # the masks used: fewer than asked when stopped early
            metrics.RISE_MASKS.labels(self.model_label).inc(se.rise.masks_used)
        self.state.pending = se

    def _on_progress(self, index: int, total: int, timestep: int) -> None:
        state = self.state
        denoise_s, self.runner.denoise_s = self.runner.denoise_s, 0.0
        state.denoise_s[index] = denoise_s
        metrics.STEP_DURATION.labels(self.model_label, "denoise", metrics.t_bucket(timestep)).observe(denoise_s)
        se, state.pending = state.pending, None
        if se is None:
            if self.claim.spec.output.progress_events and index > state.progressed:
                state.progressed = index
                self._send(Progress(index=index, timestep=timestep, num_steps=total, latency_s=denoise_s))
            return
        if se.index in state.published:
            return
        latency = denoise_s + sum(se.seconds.values())
        event = step_event(se, state.words, self.claim.spec.output, self.entry.model, latency, total)
        state.published.add(se.index)
        state.progressed = max(state.progressed, se.index)
        self._send(event)

    def _send(self, event: Step | Progress) -> None:
        if self.publisher is None:
            self._publish_or_stop(event)
        else:
            self.state.in_flight.append(self.publisher.submit(self._publish_step, event))

    def _publish_step(self, event: Step | Progress) -> Published | None:
        """On the publisher thread. Once a publish failed or found the job lost, the job's later steps are dropped
        (None): its event stream must not show a gap before the Failed event."""
        if self.lost.is_set() or self.state.publish_error is not None:
            return None
        if not self._owned():
            self.lost.set()
            return None
        try:
            result = self.queue.publish(self.claim, event)
        except BaseException as e:
            self.state.publish_error = e
            raise
        if not result:
            self.lost.set()
        return result

    def _settle(self, wait: bool) -> bool:
        """Take the step publishes that are done (all of them, waiting for each, with `wait`), in order: one that
        failed re-raises its error, a lost claim raises LostClaim. Returns whether one saw the cancel flag."""
        cancel, in_flight = False, self.state.in_flight
        while in_flight and (wait or in_flight[0].done()):
            result = in_flight.pop(0).result()
            if self.lost.is_set():
                raise LostClaim
            cancel |= result == Published.CANCEL_REQUESTED
        return cancel

    def _when_owned(self, fn: Callable[[], None]) -> None:
        """Call `fn` once the claim holds (now, when it is settled): a claim handed out ahead may still be refused
        (deadline passed, cancelled, delivered too often), and such a job never left the queue for this worker."""
        if self.confirmed is None:
            fn()
        else:
            self.confirmed.add_done_callback(lambda f: fn() if not f.cancelled() and f.result() else None)

    def _owned(self) -> bool:
        """Whether the claim holds, once the queue settled it (waits for that)."""
        return self.confirmed is None or self.confirmed.result()

    def _publish_or_stop(self, event: Event) -> None:
        if not self._owned():
            raise LostClaim
        result = self.queue.publish(self.claim, event)
        if not result:
            raise LostClaim
        self.state.cancel_seen = result == Published.CANCEL_REQUESTED

    def _record(self, exp: Explanation, png: bytes, started: float) -> dict[str, Any]:
        claim, engine, runner = self.claim, self.settings.engine, self.runner
        runtime = audit.runtime_of(engine.device, engine.dtype, runner.backend, runner.requested_backend,
                                   self.entry.unet_server, oom_batch=runner.oom_batch)
        return audit.run_record(job_id=claim.job_id, worker=claim.worker, attempt=claim.delivery,
                                model_name=self.entry.name, folder=str(self.entry.folder), weights=self.entry.weights,
                                configs=self.entry.configs, spec=claim.spec, exp=exp, png=png, runtime=runtime,
                                enqueued_at=claim.enqueued_at, started=started, denoise_s=self.state.denoise_s,
                                rise_exact=self.state.rise_exact)

    def _hand_back(self) -> None:
        """Give the job back (the worker is stopping): its events so far stay, another worker runs it again, and
        the steps already published are not published twice (see run: a re-delivery)."""
        self._drain()  # the published steps first, so the next worker sees them
        if self._owned() and self.queue.hand_back(self.claim):
            log.info("job %s: handed back to the queue (this worker is stopping)", self.claim.job_id)

    def _drain(self) -> None:
        """Wait for every step publish still in flight, whether or not it succeeds (what a failed one meant no
        longer matters: the job is ending)."""
        for f in self.state.in_flight:
            f.exception()
        self.state.in_flight.clear()

    def _finish(self, event: Completed | Failed, status: str, error: str | None = None) -> str | None:
        self._drain()  # the terminal event goes after every step event
        if not self._owned():
            log.info("job %s: the claim did not hold (cancelled or expired meanwhile); %s dropped",
                     self.claim.job_id, type(event).__name__)
            return None
        if not self.queue.finish(self.claim, event):
            log.info("job %s: already terminal or lost; %s dropped", self.claim.job_id, type(event).__name__)
            return None
        metrics.JOBS.labels(status).inc()
        metrics.REQUEST_DURATION.labels(self.model_label, status).observe(
            max(0.0, time.time() - self.claim.enqueued_at))
        if error is not None:
            metrics.ERRORS.labels(error).inc()
        return status
