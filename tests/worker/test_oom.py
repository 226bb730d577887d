"""A worker out of device memory (injected at its model's UNet runner, tests/support/oom.py): a job whose shared
DF-RISE batches do not fit finishes at half the batch and says so in its record; a job that does not fit at one
sample per call fails RESOURCE_EXHAUSTED, and the worker takes the next job."""

from __future__ import annotations

import json

import torch

from difflens.jobs import Completed, Failed, Step
from tests.support.oom import OutOfMemoryRunner, batched
from tests.worker.helpers import MODEL, solo, spec, wait_terminal


def _worker_out_of_memory(worker_settings, memory_queue, tiny_model, runner_of):
    """A Worker on the queue whose model's base runner is runner_of(unet); the caller stops it."""
    from difflens.models import ModelRegistry
    from difflens.worker import Worker

    registry = ModelRegistry(worker_settings, preloaded={MODEL: tiny_model})
    registry.get(MODEL).runner = runner_of(tiny_model.unet)
    worker = Worker(worker_settings, memory_queue, registry, name="w")
    worker.start()
    return worker


def test_a_job_whose_batches_run_out_of_memory_finishes_at_half_the_batch(worker_settings, memory_queue, tiny_model):
    """DF-RISE's calls of 8 masks (16 samples with CFG) do not fit, 4 masks do (8 samples): the job completes with
    the engine's maps, and its audit record says its calls were cut to 8 samples."""
    job = spec(steps=2, masks=8, batch=8)
    worker = _worker_out_of_memory(worker_settings, memory_queue, tiny_model, lambda unet: OutOfMemoryRunner(unet, 10))
    try:
        events = wait_terminal(memory_queue, memory_queue.enqueue(job).id)
    finally:
        worker.stop(timeout=60)
    assert isinstance(events[-1], Completed), events[-1]
    record = json.loads(events[-1].audit_json)
    assert record["runtime"]["unet_batch_after_oom"] == 8
    ref = solo(tiny_model, job)
    for step, want in zip([e for e in events if isinstance(e, Step)], ref.steps, strict=True):
        torch.testing.assert_close(torch.from_numpy(step.maps["rise"]), want.maps["rise"], rtol=0, atol=1e-5)


def test_a_job_that_does_not_fit_at_one_sample_fails_resource_exhausted_and_the_next_job_runs(
        worker_settings, memory_queue, tiny_model):
    """DF-RISE calls of 64 x 32 images run out of memory at every size (denoising them fits): that job fails
    RESOURCE_EXHAUSTED once its calls are down to one sample; the default-size job after it completes, and its
    record says nothing of memory."""
    worker = _worker_out_of_memory(worker_settings, memory_queue, tiny_model, lambda unet: OutOfMemoryRunner(
        unet, 64, fails=lambda lat, t: batched(lat, t) and lat.shape[-1] == 32))
    try:
        doomed = wait_terminal(memory_queue, memory_queue.enqueue(spec(steps=2, width=64, height=32)).id)
        after = wait_terminal(memory_queue, memory_queue.enqueue(spec(steps=2)).id)
    finally:
        worker.stop(timeout=60)
    assert isinstance(doomed[-1], Failed) and doomed[-1].code == "RESOURCE_EXHAUSTED", doomed[-1]
    assert "does not fit in the worker's device memory" in doomed[-1].message
    assert isinstance(after[-1], Completed), after[-1]
    assert "unet_batch_after_oom" not in json.loads(after[-1].audit_json)["runtime"]
