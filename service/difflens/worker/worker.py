"""The worker: claims jobs, runs up to `worker_max_jobs` of them at once on the shared loaded models (their DF-RISE
masks share UNet batches), heartbeats the jobs it holds, and on stop finishes them before returning.

A job is claimed ahead (JobQueue.claim_ahead): its thread starts on it while this thread settles the claim (on
Redis, the claim script's round trip), and it publishes nothing until the claim holds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

from difflens import metrics
from difflens.config import ServiceSettings
from difflens.errors import InvalidArgument, ModelLoadError
from difflens.jobs import Failed
from difflens.models import LoadedModel, ModelRegistry
from difflens.outage import Outage
from difflens.queue.base import Claim, JobQueue
from difflens.worker.batching import BatchStats, JobRunner, UNetBatcher
from difflens.worker.job import JobRun

log = logging.getLogger(__name__)

CLAIM_BLOCK_S = 0.5  # how long one claim waits: bounds how late a stop is noticed


def default_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class UNetCallStats:
    """DF-RISE UNet calls this worker made: all of them, those holding samples of several jobs, the largest."""

    calls: int = 0
    shared_calls: int = 0
    max_samples: int = 0


class Worker:
    """Runs jobs from `queue` with the models of `registry`. `run(stop)` blocks; `start()` runs it in a daemon
    thread and `stop()` ends it (the jobs it holds are finished first, for up to drain_grace_s; those still running
    then are handed back to the queue)."""

    def __init__(self, settings: ServiceSettings, queue: JobQueue, registry: ModelRegistry,
                 name: str | None = None) -> None:
        if settings.worker_max_jobs < 1:
            raise InvalidArgument("worker_max_jobs", f"got {settings.worker_max_jobs}; must be >= 1")
        if settings.worker_max_batch < 1:
            raise InvalidArgument("worker_max_batch", f"got {settings.worker_max_batch}; must be >= 1")
        self.settings = settings
        self.queue = queue
        queue.on_ended = metrics.count_ended  # the jobs the queue ends in this process's claims
        self.registry = registry
        self.name = name or default_name()
        self.stats = UNetCallStats()
        self._batchers: dict[str, UNetBatcher] = {}
        # claim token -> the claim, its `lost` flag, whether it holds. By token, not job id: a worker can hold two
        # deliveries of one job for a moment (its heartbeats failed past the visibility timeout and its own
        # reclaim took the job back), and the older one's end must not drop the newer one from the heartbeats.
        self._held: dict[str, tuple[Claim, threading.Event, Future[bool]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._handing_back = threading.Event()  # held jobs give themselves back at their next step
        self._shutting_down = threading.Event()  # held jobs fail UNAVAILABLE at their next step
        self._thread: threading.Thread | None = None
        self._claims_outage = Outage(log, f"worker {self.name}: taking a job from the queue")
        self._beats_outage = Outage(log, f"worker {self.name}: heartbeating the jobs it holds")

    # ------------------------------------------------------------ lifecycle

    def start(self) -> threading.Thread:
        self._stop.clear()
        self._handing_back.clear()
        self._shutting_down.clear()
        self._announce()  # before it returns: a front started next (serve --embedded) counts it from its first sample
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name=f"worker-{self.name}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking jobs, let the held ones finish (up to drain_grace_s; the rest are handed back to the queue),
        return (waiting up to `timeout` seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def hand_back_now(self) -> None:
        """Stop the held jobs at their next step and give them back to the queue, without waiting out the drain
        grace (a second SIGTERM)."""
        self._handing_back.set()

    def fail_held(self) -> None:
        """Fail the held jobs UNAVAILABLE ('the server shut down') at their next step: for a queue that goes with
        this process (serve --embedded), where handing them back would hand them to nobody."""
        self._shutting_down.set()

    def held(self) -> list[str]:
        """Ids of the jobs this worker holds right now."""
        with self._lock:
            return list(dict.fromkeys(claim.job_id for claim, _, _ in self._held.values()))

    def run(self, stop: threading.Event) -> None:
        """Claim and run jobs until `stop` is set; then finish the jobs held and return."""
        slots = threading.BoundedSemaphore(self.settings.worker_max_jobs)
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeats, args=(beat_stop,), name=f"heartbeat-{self.name}",
                                daemon=True)
        beat.start()
        # Long-lived job threads, not one per job: torch's OpenMP runtime builds a thread team per calling thread,
        # and a fresh team for every job cost a tiny job ~20 ms on the 2-core CI machine (bench/service.py).
        pool = ThreadPoolExecutor(self.settings.worker_max_jobs, thread_name_prefix=f"job-{self.name}")
        # One thread publishes every job's step events (in order per job) while the job threads denoise on.
        publisher = ThreadPoolExecutor(1, thread_name_prefix=f"publish-{self.name}")
        log.info("worker %s: taking jobs (max_jobs=%d, max_batch=%d)", self.name, self.settings.worker_max_jobs,
                 self.settings.worker_max_batch)
        self._announce()
        try:
            while not stop.is_set():
                if not slots.acquire(timeout=CLAIM_BLOCK_S):
                    continue
                got = self._claim(stop)
                if got is None:
                    slots.release()
                    continue
                claim, confirm = got
                confirmed: Future[bool] = Future()
                pool.submit(self._job, claim, slots, publisher, confirmed)
                self._confirm(claim, confirm, confirmed)  # while the job thread already starts on it
        finally:
            self._drain()
            pool.shutdown(wait=True)
            publisher.shutdown(wait=True)
            beat_stop.set()
            beat.join()
            try:
                self.queue.retire(self.name, self.registry.names())
            except Exception:  # it drops out of the count within the visibility timeout anyway
                log.debug("worker %s: retire failed", self.name, exc_info=True)
            log.info("worker %s: stopped", self.name)

    # ------------------------------------------------------------ internals

    def _drain(self) -> None:
        """Let the held jobs finish for up to drain_grace_s; then the rest stop at their next step and go back to
        the queue, so that another worker takes them at once, not after the visibility timeout, and this stop
        does not count as one of their deliveries (an orchestrator's SIGKILL at the end of its grace would)."""
        end = time.monotonic() + self.settings.drain_grace_s
        while self.held() and time.monotonic() < end and not self._handing_back.is_set():
            self._handing_back.wait(min(0.1, max(0.0, end - time.monotonic())))
        held = self.held()
        if held:
            log.info("worker %s: handing back %d job(s) still running after the %g s drain grace: %s", self.name,
                     len(held), self.settings.drain_grace_s, ", ".join(held))
            self._handing_back.set()

    def _claim(self, stop: threading.Event) -> tuple[Claim, Callable[[], bool]] | None:
        try:
            got = self.queue.claim_ahead(self.name, self.registry.names(), block_s=CLAIM_BLOCK_S)
        except Exception:  # the queue's backend is down: keep the worker alive and retry
            self._claims_outage.failed()
            metrics.ERRORS.labels("queue").inc()
            stop.wait(1.0)
            return None
        self._claims_outage.ok()
        return got

    def _confirm(self, claim: Claim, confirm: Callable[[], bool], confirmed: Future[bool]) -> None:
        try:
            confirmed.set_result(confirm())
        except Exception:  # the job's entry stays pending: it is reclaimed after the visibility timeout
            log.exception("worker %s: claim of job %s failed; the job stops", self.name, claim.job_id)
            metrics.ERRORS.labels("queue").inc()
            confirmed.set_result(False)

    def _job(self, claim: Claim, slots: threading.BoundedSemaphore, publisher: Executor,
             confirmed: Future[bool]) -> None:
        lost = threading.Event()
        with self._lock:
            for older, older_lost, _ in self._held.values():
                if older.job_id == claim.job_id:  # the queue delivered the job again: the older claim is void
                    older_lost.set()
            self._held[claim.token] = (claim, lost, confirmed)
        try:
            self._run_claim(claim, lost, publisher, confirmed)
        except Exception:  # never let a job thread die silently (queue errors while finishing, ...)
            log.exception("worker %s: job %s: unhandled error", self.name, claim.job_id)
        finally:
            with self._lock:
                self._held.pop(claim.token, None)
            slots.release()

    def _run_claim(self, claim: Claim, lost: threading.Event, publisher: Executor, confirmed: Future[bool]) -> None:
        try:
            entry = self.registry.get(claim.spec.model)
        except InvalidArgument as e:
            # cannot happen through claim(), which hands out only jobs for this worker's models
            log.warning("worker %s: job %s asks for model %r, which this worker does not serve (%s); the job fails",
                        self.name, claim.job_id, claim.spec.model, ", ".join(self.registry.names()) or "none")
            self._fail_early(claim, confirmed, Failed("INVALID_ARGUMENT", str(e)), "invalid_argument")
            return
        except ModelLoadError:
            log.exception("worker %s: model %r cannot be loaded", self.name, claim.spec.model)
            self._fail_early(claim, confirmed, Failed("UNAVAILABLE", f"model {claim.spec.model!r} cannot be loaded "
                                                                     "by this worker"), "model_load")
            return
        runner = JobRunner(entry.runner, entry.lock, self._batcher(entry))
        JobRun(claim, self.queue, entry, runner, self.settings, lost, publisher, confirmed,
               handing_back=self._handing_back, shutting_down=self._shutting_down).run()

    def _fail_early(self, claim: Claim, confirmed: Future[bool], event: Failed, error: str) -> None:
        if confirmed.result() and self.queue.finish(claim, event):
            metrics.JOBS.labels("failed").inc()
            metrics.ERRORS.labels(error).inc()

    def _batcher(self, entry: LoadedModel) -> UNetBatcher:
        with self._lock:
            if entry.name not in self._batchers:
                hist = metrics.UNET_BATCH_SIZE.labels(entry.name)

                def on_batch(s: BatchStats) -> None:
                    hist.observe(s.samples)
                    with self._lock:
                        self.stats.calls += 1
                        self.stats.shared_calls += s.jobs > 1
                        self.stats.max_samples = max(self.stats.max_samples, s.samples)

                self._batchers[entry.name] = UNetBatcher(
                    entry.runner.raw, self.settings.worker_max_batch, on_batch,
                    pad_to_bucket=entry.runner.backend == "compile")
            return self._batchers[entry.name]

    def _announce(self) -> None:
        """Tell the queue this worker is up and which models it serves (fronts report live workers per model)."""
        try:
            self.queue.announce(self.name, self.registry.names())
        except Exception:  # the queue is down: the claim loop reports that outage
            log.debug("worker %s: announce failed", self.name, exc_info=True)

    def _heartbeats(self, stop: threading.Event) -> None:
        """Heartbeat every held job each interval (a DF-RISE step can outlast the visibility timeout, so this is
        a thread, not a check between steps); a refused heartbeat marks the job lost. Also announces the worker."""
        while not stop.wait(self.settings.heartbeat_interval_s):
            self._announce()
            with self._lock:
                held = list(self._held.values())
            for claim, lost, confirmed in held:
                if not (confirmed.done() and confirmed.result()):
                    continue  # not ours yet (or not at all): the claim script has not run
                try:
                    if not self.queue.heartbeat(claim):
                        lost.set()
                    self._beats_outage.ok()
                except Exception:  # one line per outage, not a traceback per job per interval
                    self._beats_outage.failed()
                    metrics.ERRORS.labels("queue").inc()
