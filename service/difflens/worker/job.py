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

import numpy as np
import torch

from difflens import audit, metrics
from difflens.config import ServiceSettings
from difflens.engine.explain import Explanation, StepExplanation, run_explanation
from difflens.engine.tokens import prompt_tokens
from difflens.engine.validate import resolve_generation
from difflens.errors import BackendUnavailable, Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted
from difflens.jobs import Completed, Event, Failed, Progress, Started, Step
from difflens.models import LoadedModel
from difflens.queue.base import Claim, JobNotFound, JobQueue, Published
from difflens.queue.common import (
    CANCELLED_MESSAGE,
    SHUTDOWN_MESSAGE,
    STORAGE_FULL_MESSAGE,
    retrying,
    storage_full,
)
from difflens.worker.batching import JobRunner
from difflens.worker.events import step_event

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error while running the job (details are in the worker's log)"
AUDIT_STORE_MESSAGE = "the job's audit record could not be stored (details are in the worker's log)"
OUT_OF_MEMORY_MESSAGE = ("the job does not fit in the worker's device memory, even one sample per UNet call; use a "
                         "smaller image, fewer DF-CAM layers, or a worker with more memory")
# The engine names the attention method "attn"; metrics and the contract say "attention".
METRIC_METHOD = {"rise": "rise", "cam": "cam", "attn": "attention"}


class LostClaim(Exception):
    """This worker no longer owns the job (it was reclaimed after a missed heartbeat): stop without a word."""


class HandBack(Exception):
    """The worker is stopping and will not finish the job: give it back to the queue for another worker."""


class ShuttingDown(Exception):
    """The process is going, its queue with it (serve --embedded): nobody could take the job over."""


@dataclass
class JobRun:
    """Runs `claim` on `entry` with `runner` (this job's JobRunner). `lost` is set by the worker's heartbeat
    thread (or a publish) when the queue says the claim lost the job. `publisher`: a one-thread executor for step
    events (None: publish them on the job's thread). `confirmed`: for a claim handed out ahead of its settling
    (JobQueue.claim_ahead), whether it holds; the job runs meanwhile but publishes nothing until it is True, and
    stops when it is False (None: settled)."""

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

    @property
    def model_label(self) -> str:
        return self.entry.name

    def run(self) -> str | None:
        """Run to the end; returns the terminal status (a metrics label) or None when the job was lost."""
        claim, started = self.claim, time.time()
        if not claim.resumed:
            self._when_owned(lambda: metrics.QUEUE_WAIT.labels(self.model_label).observe(
                max(0.0, started - claim.enqueued_at)))
        else:  # reclaimed or handed back: the client already saw these steps from an earlier holder
            seen = [e for _, e in self._events_so_far() if isinstance(e, Step | Progress)]
            self.published = {e.index for e in seen if isinstance(e, Step)}
            self.progressed = max((e.index for e in seen), default=-1)
        try:
            if claim.started:  # the claim writes Started only if it saw no cancel flag (ahead: if confirmed)
                self.cancel_seen = False
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
                except OSError:  # no image without its record: the deployment asked for them to be kept
                    log.exception("job %s: audit record not stored in %s", claim.job_id, self.settings.audit_dir)
                    return self._finish(Failed("INTERNAL", AUDIT_STORE_MESSAGE), "failed", error="audit_store")
            return self._finish(Completed(png, text), "completed")
        except HandBack:
            self._hand_back()
            return None
        except ShuttingDown:
            return self._finish(Failed("UNAVAILABLE", SHUTDOWN_MESSAGE), "failed", error="shutdown")
        except LostClaim:
            if self.confirmed is not None and self.confirmed.done() and not self.confirmed.result():
                log.info("job %s: not taken after all: the queue failed or dropped it as it claimed it (cancelled, "
                         "past its deadline, or already ended); stopped", claim.job_id)
            else:
                log.info("job %s: lost to another worker (delivery %d); stopped", claim.job_id, claim.delivery)
            return None
        except Cancelled:
            return self._finish(Failed("CANCELLED", CANCELLED_MESSAGE), "cancelled")
        except DeadlineExceeded:
            return self._finish(Failed("DEADLINE_EXCEEDED", "the job's deadline passed while it ran"),
                                "deadline_exceeded", error="deadline_exceeded")
        except InvalidArgument as e:
            return self._finish(Failed("INVALID_ARGUMENT", str(e)), "failed", error="invalid_argument")
        except ResourceExhausted as e:  # refused before its first UNet call: it would not fit (engine/memory.py)
            log.warning("job %s: %s", claim.job_id, e)
            return self._finish(Failed("RESOURCE_EXHAUSTED", str(e)), "failed", error="out_of_memory")
        except torch.OutOfMemoryError:  # the worker goes on with its next job; memory the call took is free again
            log.warning("job %s: out of memory even at one sample per UNet call", claim.job_id, exc_info=True)
            return self._finish(Failed("RESOURCE_EXHAUSTED", OUT_OF_MEMORY_MESSAGE), "failed", error="out_of_memory")
        except BackendUnavailable as e:  # the Triton server went away: this job fails, the worker goes on
            log.warning("job %s: %s", claim.job_id, e)
            return self._finish(Failed("UNAVAILABLE", str(e)), "failed", error="unet_backend")
        except Exception as e:
            log.exception("job %s failed", claim.job_id)
            if storage_full(e):  # its events did not fit (the Failed event is small: it may still)
                return self._finish(Failed("RESOURCE_EXHAUSTED", STORAGE_FULL_MESSAGE), "failed", error="queue")
            return self._finish(Failed("INTERNAL", INTERNAL_MESSAGE), "failed", error="internal")

    def _events_so_far(self) -> list[tuple[int, Event]]:
        """The job's events, read through a queue blip of up to the visibility timeout (the heartbeat thread holds
        the claim meanwhile): a failed read here used to kill the job thread and leave the job to be reclaimed."""
        return retrying(f"reading the events of job {self.claim.job_id}", lambda: self.queue.events(self.claim.job_id),
                        self.settings.visibility_timeout_s, lambda e: not isinstance(e, JobNotFound))

    def _explain(self) -> Explanation:
        spec, model = self.claim.spec, self.entry.model
        self._check_memory()
        self.words = [t.text for t in prompt_tokens(model.tokenizer, spec.params.prompt)]
        return run_explanation(model, spec.params, spec.explain, runner=self.runner, on_step=self._on_step,
                               on_progress=self._on_progress, check=self._check, guard=self.runner.guard)

    def _check_memory(self) -> None:
        """ResourceExhausted when one of the job's UNet calls would not fit in the device memory free now (the
        family's activations per sample at this latent size, engine/memory.py): refused at its claim, before
        anything runs, rather than dying on it. Out-of-memory errors at run time are the batcher's (it halves)."""
        if self.entry.memory is None:
            return
        from difflens.engine.memory import check_fits

        model = self.entry.model
        params = resolve_generation(model, self.claim.spec.params)
        f = model.vae_scale_factor
        latent = (int(model.unet.config.in_channels), int(params.height or 0) // f, int(params.width or 0) // f)
        check_fits(self.entry.memory, self.claim.spec.explain, latent, float(params.guidance_scale or 0) > 1,
                   model.device, max_batch=self.settings.worker_max_batch)

    def _check(self, index: int) -> None:
        """Before denoising step `index`: ownership, cancel flag, deadline, a stopping worker (in that order)."""
        pushed = self._settle(wait=False)
        if self.lost.is_set() or (self.confirmed is not None and self.confirmed.done() and not self._owned()):
            raise LostClaim
        seen, self.cancel_seen = True if pushed else self.cancel_seen, None
        if seen is None:
            seen = self.queue.cancel_signalled(self.claim.job_id)
        if seen is None:
            try:
                seen = self.queue.cancel_requested(self.claim.job_id)
            except Exception:  # the queue is unreachable for now: a cancel is noticed at a later step
                log.debug("job %s: cancel flag unreadable before step %d", self.claim.job_id, index, exc_info=True)
                metrics.ERRORS.labels("queue").inc()
                seen = False
        if seen:
            raise Cancelled(f"cancelled before step {index}")
        deadline = self.claim.spec.deadline
        if deadline is not None and time.time() >= deadline:
            raise DeadlineExceeded(f"deadline passed before step {index}")
        # after the cancel and the deadline: a job to be stopped anyway ends here, not handed on
        if self.shutting_down is not None and self.shutting_down.is_set():
            raise ShuttingDown(f"before step {index}")
        if self.handing_back is not None and self.handing_back.is_set():
            raise HandBack(f"before step {index}")

    def _on_step(self, se: StepExplanation) -> None:
        """An explained step's maps exist; it is published from _on_progress, which knows the step count."""
        if "rise" in se.seconds:
            self.rise_exact[se.index] = not self.runner.rise_shared
        self.runner.rise_shared = False
        for name, seconds in se.seconds.items():
            metrics.STEP_DURATION.labels(self.model_label, METRIC_METHOD[name], metrics.t_bucket(se.timestep)) \
                .observe(seconds)
        if "rise" in se.seconds and se.rise is not None:  # the masks used: fewer than asked when stopped early
            metrics.RISE_MASKS.labels(self.model_label).inc(se.rise.masks_used)
        self.pending = se

    def _on_progress(self, index: int, total: int, timestep: int) -> None:
        denoise_s, self.runner.denoise_s = self.runner.denoise_s, 0.0
        self.denoise_s[index] = denoise_s
        metrics.STEP_DURATION.labels(self.model_label, "denoise", metrics.t_bucket(timestep)).observe(denoise_s)
        se, self.pending = self.pending, None
        if se is None:
            if self.claim.spec.output.progress_events and index > self.progressed:
                self.progressed = index
                self._send(Progress(index=index, timestep=timestep, num_steps=total, latency_s=denoise_s))
            return
        if se.index in self.published:
            return
        latency = denoise_s + sum(se.seconds.values())
        event = step_event(se, self.words, self.claim.spec.output, self.entry.model, latency, total)
        self.published.add(se.index)
        self.progressed = max(self.progressed, se.index)
        self._send(event)

    def _send(self, event: Step | Progress) -> None:
        if self.publisher is None:
            self._publish_or_stop(event)
        else:
            self.in_flight.append(self.publisher.submit(self._publish_step, event))

    def _publish_step(self, event: Step | Progress) -> Published | None:
        """On the publisher thread. Once a publish failed or found the job lost, the job's later steps are dropped
        (None): its event stream must not show a gap before the Failed event."""
        if self.lost.is_set() or self.publish_error is not None:
            return None
        if not self._owned():
            self.lost.set()
            return None
        try:
            result = self.queue.publish(self.claim, event)
        except BaseException as e:
            self.publish_error = e
            raise
        if not result:
            self.lost.set()
        return result

    def _settle(self, wait: bool) -> bool:
        """Take the step publishes that are done (all of them, waiting for each, with `wait`), in order: one that
        failed re-raises its error, a lost claim raises LostClaim. Returns whether one saw the cancel flag."""
        cancel = False
        while self.in_flight and (wait or self.in_flight[0].done()):
            result = self.in_flight.pop(0).result()
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
        self.cancel_seen = result == Published.CANCEL_REQUESTED

    def _record(self, exp: Explanation, png: bytes, started: float) -> dict[str, Any]:
        claim, engine = self.claim, self.settings.engine
        now = time.time()
        timings = {"queue_wait_s": round(max(0.0, started - claim.enqueued_at), 6),
                   "run_s": round(now - started, 6), "total_s": round(now - claim.enqueued_at, 6),
                   "steps": audit.step_timings(exp, self.denoise_s)}
        runtime = audit.runtime_of(engine.device, engine.dtype, self.runner.backend, self.runner.requested_backend,
                                   self.entry.unet_server)
        if self.runner.oom_batch is not None:  # out of memory at --max-batch: its DF-RISE calls were this small
            runtime["unet_batch_after_oom"] = self.runner.oom_batch
        return audit.build_record(job_id=claim.job_id, worker=claim.worker, attempt=claim.delivery,
                                  model_name=self.entry.name, weights=self.entry.weights, configs=self.entry.configs,
                                  folder=str(self.entry.folder),
                                  spec=claim.spec, exp=exp,
                                  png=png, runtime=runtime, timings=timings, rise_exact=self.rise_exact)

    def _hand_back(self) -> None:
        """Give the job back (the worker is stopping): its events so far stay, another worker runs it again, and
        the steps already published are not published twice (see run: a re-delivery)."""
        for f in self.in_flight:  # the published steps first, so the next worker sees them
            f.exception()
        self.in_flight.clear()
        if self._owned() and self.queue.hand_back(self.claim):
            log.info("job %s: handed back to the queue (this worker is stopping)", self.claim.job_id)

    def _finish(self, event: Completed | Failed, status: str, error: str | None = None) -> str | None:
        for f in self.in_flight:  # the terminal event goes after every step event (which may fail: no matter now)
            f.exception()
        self.in_flight.clear()
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


def image_png(image: np.ndarray) -> bytes:
    """image: (H, W, 3) uint8 -> PNG bytes (render's encoder: the same bytes `difflens explain` writes)."""
    from PIL import Image

    from difflens.render.compose import png_bytes

    return png_bytes(Image.fromarray(np.asarray(image, np.uint8)))
