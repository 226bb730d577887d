"""A real Triton server for the tests: `difflens triton-serve` (nvidia-pytriton's tritonserver with the Python
backend, on CPU) in the Triton environment that `make triton-venv` builds, on free 127.0.0.1 ports. Without that
environment the tests that need it skip, naming the make target."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from difflens.commands.triton_serve import DEFAULT_VENV

SHM = Path("/dev/shm")
START_TIMEOUT_S = 180.0  # about 7 s on a quiet 2-core machine; a busy one takes several times that


def require_triton_env() -> Path:
    """The Triton environment, or a skip that says how to make it."""
    venv = Path(os.environ.get("DIFFLENS_TRITON_VENV") or DEFAULT_VENV)
    if not any(venv.glob(".installed-*")):
        pytest.skip(f"no Triton environment at {venv}: `make triton-venv` builds it (make test does)")
    return venv


class TritonServer:
    """`difflens triton-serve MODEL_DIR` in its own process group (tritonserver and its Python backend stub are its
    children). `kill()` crashes the server; `start()` again serves on the same gRPC port."""

    def __init__(self, model_dir: Path, name: str = "tiny", max_batch: int = 4, dtype: str = "float32") -> None:
        self.venv = require_triton_env()
        self.model_dir, self.name, self.max_batch, self.dtype = model_dir, name, max_batch, dtype
        self._dir = tempfile.TemporaryDirectory(prefix="difflens-triton-test-")
        self.log = Path(self._dir.name) / "server.log"
        self.port = 0
        self.metrics_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_s = 0.0  # how long the last start took
        self._shm_before: set[Path] = set()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TritonServer:
        port_file = Path(self._dir.name) / "port.json"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "difflens", "triton-serve", str(self.model_dir), "--model-name", self.name,
               "--port", str(self.port), "--metrics-port", "0", "--max-batch", str(self.max_batch), "--dtype",
               self.dtype, "--threads", "1", "--port-file", str(port_file), "--venv", str(self.venv)]
        self._shm_before = set(SHM.glob("psm_*"))
        t0 = time.monotonic()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() - t0 > START_TIMEOUT_S:
                self.kill()
                raise RuntimeError(f"difflens triton-serve did not start; its log:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.1)
        self.started_s = time.monotonic() - t0
        ports = json.loads(port_file.read_text())
        self.port, self.metrics_port = ports["port"], ports["metrics_port"]
        return self

    def kill(self) -> None:
        """SIGKILL to tritonserver itself: the server goes away at once, mid-call or not, as in a crash. pytriton's
        process then sees it gone and stops, removing its workspace and shared memory (killing that process too
        would leave both behind)."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if child.name() == "tritonserver":
                child.kill()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        # The Python backend's stub dies with tritonserver, before it can unlink the shared memory (multiprocessing's
        # psm_* segments) it made; a killed server's segments are those made while it ran (the tests run one at a time).
        for leaked in set(SHM.glob("psm_*")) - self._shm_before:
            leaked.unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM (a clean stop), then whatever is left is killed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # children a clean stop left behind, if any
            except ProcessLookupError:
                pass
            self.proc.wait(30)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the server's Prometheus metrics (Triton's nv_inference_*), 0 when absent."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):  # Triton's counters lack _total: the family has it
            for sample in family.samples if family.name == name else ():
                if all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def metric_reaches(self, name: str, value: float, timeout_s: float = 10.0, **labels: str) -> float:
        """The metric once it equals `value` (Triton counts a request after its response has left: a scrape right
        after the call may come first), else its last value after timeout_s."""
        end = time.monotonic() + timeout_s
        while (got := self.metric(name, **labels)) != value and time.monotonic() < end:
            time.sleep(0.1)
        return got

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()
