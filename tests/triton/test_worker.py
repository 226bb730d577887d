"""A worker on the triton backend when its Triton server goes away: the job running then fails UNAVAILABLE, jobs
taken while no server answers fail the same way at once, and the worker completes the next job once a server is
back on the same address (a fresh gRPC channel, not one waiting out its reconnect backoff). Real server, killed
with SIGKILL (tritonserver and its Python backend with it, as a crashed pod)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from difflens import metrics
from difflens.config import Settings
from difflens.jobs import Completed, Failed, Step
from tests.worker.helpers import MODEL, settings, solo, spec, wait_for, wait_terminal


def _unavailable(events, url):
    last = events[-1]
    assert isinstance(last, Failed) and last.code == "UNAVAILABLE", last
    assert url in last.message and "submit the job again" in last.message


def test_a_server_gone_mid_job_fails_that_job_and_the_worker_serves_the_next(triton_server, tiny_dir, tiny_model):
    from difflens.models import ModelRegistry
    from difflens.queue.memory import InProcessQueue
    from difflens.worker import Worker

    engine = Settings(unet_backend="triton", triton_url=triton_server.url, triton_wait_s=0.0)
    s = settings(tiny_dir, engine=engine)  # the Triton model is the difflens model's own name: "tiny"
    queue = InProcessQueue(s)
    worker = Worker(s, queue, ModelRegistry(s, preloaded={MODEL: tiny_model}), name="w-triton")
    errors = metrics.REGISTRY.get_sample_value("difflens_errors_total", {"type": "unet_backend"}) or 0.0
    worker.start()
    try:
        running = queue.enqueue(spec(steps=40, masks=8, batch=8)).id
        wait_for(queue, running, Step)  # it is under way: its first step is out
        triton_server.kill()
        _unavailable(wait_terminal(queue, running), triton_server.url)

        _unavailable(wait_terminal(queue, queue.enqueue(spec(steps=2)).id), triton_server.url)

        triton_server.start()  # the same gRPC port
        job = spec("a blue square", seed=2, steps=3, masks=8, batch=8)
        done = wait_terminal(queue, queue.enqueue(job).id)[-1]
        assert isinstance(done, Completed), done
        image = np.asarray(Image.open(io.BytesIO(done.image_png)).convert("RGB"))
        assert np.abs(image.astype(int) - solo(tiny_model, job).image.astype(int)).max() <= 1
        runtime = json.loads(done.audit_json)["runtime"]
        assert runtime["unet_backend"] == "triton"
        assert runtime["triton"] == {"url": triton_server.url, "model": "tiny", "max_batch": 4}
    finally:
        worker.stop(timeout=60)
        queue.close()
    assert metrics.REGISTRY.get_sample_value("difflens_errors_total", {"type": "unet_backend"}) == errors + 2


def test_replay_runs_a_triton_record_eager_in_process():
    """The record's server may be gone, and its UNet is the model folder's (start-up checked): replay needs neither."""
    from difflens.replay import runtime_settings

    runtime = {"device": "cpu", "dtype": "float32", "unet_backend": "triton", "requested_backend": "triton",
               "torch_threads": 1, "triton": {"url": "10.0.0.9:8001", "model": "sd15", "max_batch": 8}}
    settings = runtime_settings({"runtime": runtime}, None)
    assert (settings.unet_backend, settings.dtype, settings.threads, settings.triton_url) == ("eager", "float32", 1,
                                                                                             None)
