"""How a job ends for each exception its run raises (worker/job.py's OUTCOMES), through a real worker run: the
exception comes out of the model's UNet runner at the first denoising call, and the job's Failed event, its
difflens_jobs_total status, its difflens_errors_total type and the worker's log line are what they were before the
except branches became a table."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
import torch

from difflens import metrics
from difflens.engine.runner import UNetRunner
from difflens.errors import BackendUnavailable, Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted
from difflens.jobs import Failed
from difflens.queue.common import CANCELLED_MESSAGE, SHUTDOWN_MESSAGE, STORAGE_FULL_MESSAGE
from difflens.worker.job import AUDIT_STORE_MESSAGE, INTERNAL_MESSAGE, OUT_OF_MEMORY_MESSAGE, ShuttingDown
from tests.worker.helpers import MODEL, settings, spec, wait_terminal


class RaisingRunner(UNetRunner):
    """A UNet runner whose every call raises `error`, as a failing kernel, backend or device would."""

    def __init__(self, unet: Any, error: Exception) -> None:
        super().__init__(unet)
        self.error = error

    def raw(self, latents: torch.Tensor, timestep: Any, embeds: torch.Tensor, added: Any = None) -> torch.Tensor:
        raise self.error


def _errors_total() -> float:
    return sum(s.value for m in metrics.REGISTRY.collect() if m.name == "difflens_errors"
               for s in m.samples if s.name == "difflens_errors_total")


def _run(s, tiny_model, runner_of, caplog) -> tuple[Any, str, float, float, list[logging.LogRecord]]:
    """One job through a Worker whose model runner is runner_of(unet): its terminal event, its id, and the
    jobs_total / errors_total deltas and log records of the run."""
    from difflens.models import ModelRegistry
    from difflens.queue.memory import InProcessQueue
    from difflens.worker import Worker

    queue = InProcessQueue(s)
    registry = ModelRegistry(s, preloaded={MODEL: tiny_model})
    registry.get(MODEL).runner = runner_of(tiny_model.unet)
    errors = _errors_total()
    jobs = {st: metrics.REGISTRY.get_sample_value("difflens_jobs_total", {"status": st}) or 0.0
            for st in ("failed", "cancelled", "deadline_exceeded", "completed")}
    worker = Worker(s, queue, registry, name="w")
    with caplog.at_level(logging.DEBUG, logger="difflens.worker.job"):
        worker.start()
        try:
            job_id = queue.enqueue(spec(steps=1, methods=())).id
            events = wait_terminal(queue, job_id)
        finally:
            worker.stop(timeout=60)  # the job's thread has counted its metrics once it is joined
            queue.close()
    jobs_delta = {st: (metrics.REGISTRY.get_sample_value("difflens_jobs_total", {"status": st}) or 0.0) - v
                  for st, v in jobs.items()}
    said = [r for r in caplog.records if r.name == "difflens.worker.job" and job_id in r.getMessage()
            and r.levelno >= logging.WARNING]
    return events[-1], job_id, jobs_delta, _errors_total() - errors, said


def _error_count(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("difflens_errors_total", {"type": kind}) or 0.0


STORAGE_FULL = redis.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'.")
INVALID = InvalidArgument("params.width", "got 3; allowed: a multiple of 8")

# exception -> (Failed code, Failed message, jobs_total status, errors_total type, log level, traceback logged)
CASES = [
    (ShuttingDown("before step 0"), "UNAVAILABLE", SHUTDOWN_MESSAGE, "failed", "shutdown", None, False),
    (Cancelled("cancelled before step 0"), "CANCELLED", CANCELLED_MESSAGE, "cancelled", None, None, False),
    (DeadlineExceeded("deadline passed before step 0"), "DEADLINE_EXCEEDED", "the job's deadline passed while it ran",
     "deadline_exceeded", "deadline_exceeded", None, False),
    (INVALID, "INVALID_ARGUMENT", str(INVALID), "failed", "invalid_argument", None, False),
    (ResourceExhausted("one UNet call needs 9.0 GiB; 2.0 GiB free"), "RESOURCE_EXHAUSTED",
     "one UNet call needs 9.0 GiB; 2.0 GiB free", "failed", "out_of_memory", logging.WARNING, False),
    (torch.OutOfMemoryError("CUDA out of memory (injected)"), "RESOURCE_EXHAUSTED", OUT_OF_MEMORY_MESSAGE, "failed",
     "out_of_memory", logging.WARNING, True),
    (BackendUnavailable("the Triton server at 127.0.0.1:1 went away"), "UNAVAILABLE",
     "the Triton server at 127.0.0.1:1 went away", "failed", "unet_backend", logging.WARNING, False),
    (STORAGE_FULL, "RESOURCE_EXHAUSTED", STORAGE_FULL_MESSAGE, "failed", "queue", logging.ERROR, True),
    (RuntimeError("a kernel failed (injected)"), "INTERNAL", INTERNAL_MESSAGE, "failed", "internal", logging.ERROR,
     True),
]


@pytest.mark.parametrize(("error", "code", "message", "status", "kind", "level", "trace"), CASES,
                         ids=[type(c[0]).__name__ for c in CASES])
def test_each_exception_ends_the_job_as_it_did(worker_settings, tiny_model, caplog, error, code, message, status,
                                               kind, level, trace):
    before = _error_count(kind) if kind else 0.0
    last, _, jobs, errors, said = _run(worker_settings, tiny_model, lambda unet: RaisingRunner(unet, error), caplog)
    assert last == Failed(code, message)
    assert jobs == {st: float(st == status) for st in jobs}
    assert errors == (1.0 if kind else 0.0)
    if kind:
        assert _error_count(kind) - before == 1.0
    assert [r.levelno for r in said] == ([level] if level else [])
    assert [r.exc_info is not None for r in said] == ([trace] if level else [])


def test_an_audit_record_that_cannot_be_stored_fails_the_job_internal(tiny_dir, tiny_model, tmp_path, caplog):
    """--audit-dir names a file, not a folder: the record cannot be written, so the image is not delivered."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    before = _error_count("audit_store")
    last, job_id, jobs, errors, said = _run(settings(tiny_dir, audit_dir=str(blocker)), tiny_model, UNetRunner,
                                            caplog)
    assert last == Failed("INTERNAL", AUDIT_STORE_MESSAGE)
    assert jobs == {st: float(st == "failed") for st in jobs}
    assert errors == 1.0 and _error_count("audit_store") - before == 1.0
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (logging.ERROR, f"job {job_id}: audit record not stored in {blocker}")]
    assert said[0].exc_info is not None  # the OSError's traceback, for the operator
