"""A worker on the triton backend when its Triton server goes away: the job running then fails UNAVAILABLE, jobs
taken while no server answers fail the same way at once, and the worker completes the next job once a server is
back on the same address (a fresh gRPC channel, not one waiting out its reconnect backoff). Real server, killed
with SIGKILL (tritonserver and its Python backend with it, as a crashed pod)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from difflens import metrics
from difflens.config import Settings
from difflens.jobs import Completed, Failed, Step
from tests.support.waiting import wait_until
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


def _readyz(port):
    """(status, body) of the worker's /readyz; None before its metrics port listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except urllib.error.URLError:
        return None


def test_a_worker_is_not_ready_while_its_triton_server_is_gone(triton_server, tiny_dir, redis_url, queue_name,
                                                               tmp_path):
    """`difflens worker --backend triton` as a process: /readyz 200 once it serves, 503 naming the server once the
    server is killed (the readiness probe's answer is reused for a few seconds), 200 again once it is back."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "difflens", "worker", "--redis", redis_url, "--queue", queue_name, "--model",
             f"tiny={tiny_dir}", "--name", "w-ready", "--backend", "triton", "--triton-url", triton_server.url,
             "--metrics-port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        def answer(code):
            assert proc.poll() is None, log_path.read_text()
            got = _readyz(port)
            return got if got and got[0] == code else None

        assert wait_until(lambda: answer(200), 300, 0.2, log_path.read_text) == (200, "worker w-ready ready\n")
        triton_server.kill()
        _, why = wait_until(lambda: answer(503), 60, 0.2, log_path.read_text)
        assert why.startswith(f"Triton model 'tiny' at {triton_server.url}: "), why
        triton_server.start()  # the same gRPC port
        assert wait_until(lambda: answer(200), 60, 0.2, log_path.read_text) == (200, "worker w-ready ready\n")
    finally:
        proc.kill()
        proc.wait()
        if triton_server.proc is None or triton_server.proc.poll() is not None:
            triton_server.start()  # for the module's other tests


def test_replay_runs_a_triton_record_eager_in_process():
    """The record's server may be gone, and its UNet is the model folder's (start-up checked): replay needs neither."""
    from difflens.replay import runtime_settings

    runtime = {"device": "cpu", "dtype": "float32", "unet_backend": "triton", "requested_backend": "triton",
               "torch_threads": 1, "triton": {"url": "10.0.0.9:8001", "model": "sd15", "max_batch": 8}}
    settings = runtime_settings({"runtime": runtime}, None)
    assert (settings.unet_backend, settings.dtype, settings.threads, settings.triton_url) == ("eager", "float32", 1,
                                                                                             None)


def test_serve_embedded_readiness_follows_its_triton_server(triton_server, triton_settings, tiny_dir):
    """`serve --embedded` on the triton backend: its /readyz check asks the embedded worker's Triton server, as a
    worker's does - ready while it answers, not ready naming it once it is gone, ready again once it is back."""
    from difflens.api.server import DifflensServer
    from tests.api.helpers import settings as service_settings

    probe = metrics.Health()
    server = DifflensServer(service_settings(tiny_dir, engine=triton_settings), run_worker=True, probe=probe)
    assert probe.check is not None and probe.check() == (True, "")
    try:
        triton_server.kill()
        def unready():
            ok, why = probe.check()
            return None if ok else why

        why = wait_until(unready, 60, 0.2)
        assert why.startswith(f"Triton model 'tiny' at {triton_server.url}: "), why
        triton_server.start()
        assert wait_until(lambda: probe.check()[0] or None, 60, 0.2)
    finally:
        if triton_server.proc is None or triton_server.proc.poll() is not None:
            triton_server.start()
        del server


def test_serve_embedded_on_eager_has_no_triton_check(tiny_dir):
    from difflens.api.server import DifflensServer
    from tests.api.helpers import settings as service_settings

    probe = metrics.Health()
    DifflensServer(service_settings(tiny_dir), run_worker=True, probe=probe)
    assert probe.check is None
