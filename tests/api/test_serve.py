"""`difflens serve`: the graceful drain of a real server process, and bad flags."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest

from difflens.cli import main
from difflens.client import DifflensClient
from difflens.jobs import Completed, Step
from tests.api.helpers import MODEL, job
from tests.support.waiting import wait_until


def _health_watch(target: str, seen: list[int], stop: threading.Event) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            for response in stream:
                seen.append(response.status)
                if stop.is_set():
                    break
        except grpc.RpcError:
            pass  # the server went away: the statuses seen are what counts


GRACE_S = 300  # the drain's grace: the process exits long before it unless something holds the drain


def test_sigterm_drains_running_streams_then_exits(tiny_dir, tmp_path):
    from grpc_health.v1 import health_pb2

    port_file, log_path = tmp_path / "port", tmp_path / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DIFFLENS_REDIS_URL", None)
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "difflens", "serve", "--embedded", "--port", "0",
                                 "--port-file", str(port_file), "--model", f"{MODEL}={tiny_dir}", "--drain-grace",
                                 str(GRACE_S)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: port_file.exists() or proc.poll() is not None, 300, 0.1, log_path.read_text)
        assert proc.poll() is None, log_path.read_text()
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        statuses: list[int] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_health_watch, args=(target, statuses, stop), daemon=True)
        watcher.start()
        with DifflensClient(target, retries=0) as client:
            stream = client.explain(job(steps=30, masks=32, batch=8), timeout=600)
            for event in stream:
                if isinstance(event, Step):
                    break
            proc.send_signal(signal.SIGTERM)
            sigterm_at = time.monotonic()
            wait_until(lambda: health_pb2.HealthCheckResponse.NOT_SERVING in statuses, 120, 0.05,
                       lambda: f"NOT_SERVING among {statuses}")
            with pytest.raises(grpc.RpcError) as refused:  # no new work while draining
                client.submit(job(steps=1))
            rest = list(stream)
        # before the grace ends: the drain waits for job streams only, not for the open health watch (which would
        # hold it the whole grace); the grace is long so that a loaded machine's slow stop is no failure
        assert proc.wait(timeout=sigterm_at + GRACE_S - 30 - time.monotonic()) == 0
        stop.set()
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log_path.read_text()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert isinstance(rest[-1], Completed), output  # the running stream finished
    assert sorted(e.index for e in stream.events if isinstance(e, Step)) == list(range(30))
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert "draining" in output and "difflens: stopped" in output


@pytest.mark.parametrize(("argv", "message"), [
    (["serve"], "--redis: the front needs the Redis URL"),
    (["serve", "--embedded", "--redis", "redis://127.0.0.1:1"], "--redis: not with --embedded"),
    (["serve", "--embedded", "--port", "70000"], "--port: got 70000; allowed 0..65535"),
    (["serve", "--embedded", "--model", "tiny"], "--model: got 'tiny'; expected NAME=DIR"),
    (["serve", "--embedded", "--max-queue-depth", "0"], "--max-queue-depth: got 0; must be >= 1"),
    (["serve", "--embedded", "--drain-grace", "-1"], "--drain-grace: got -1.0; must be >= 0"),
    (["serve", "--embedded", "--threads", "-1"], "--threads: got -1; allowed: an integer >= 0"),
    (["serve", "--embedded", "--port", "0", "--model", "x=/no/such/folder"], "/no/such/folder"),
    (["serve", "--redis", "redis://127.0.0.1:1"], "--auth-keys: serving on 127.0.0.1 needs API keys: --auth-keys PATH"),
    (["serve", "--embedded", "--host", "0.0.0.0"], "--auth-keys: serving on 0.0.0.0 needs API keys"),
    (["serve", "--embedded", "--no-auth", "--auth-keys", "k.json"], "--no-auth: not with --auth-keys"),
    (["serve", "--embedded", "--port", "0", "--auth-keys", "/no/such/keys.json"],
     "--auth-keys: /no/such/keys.json: [Errno 2]"),
    (["serve", "--embedded", "--tenant-labels", "acme,other"], "--tenant-labels: 'other' is the label"),
    (["serve", "--embedded", "--tenant-burst", "0"], "--tenant-burst: got 0; must be an integer >= 1"),
])
def test_bad_serve_flags_exit_2_naming_the_flag(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("DIFFLENS_REDIS_URL", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_only_an_embedded_server_on_loopback_goes_without_keys_unless_told(monkeypatch):
    from difflens.cli import build_parser
    from difflens.commands.serve import serve_settings

    monkeypatch.setenv("DIFFLENS_AUTH_KEYS", "/etc/difflens/auth/keys.json")
    front = ["serve", "--redis", "redis://r:6379/0", "--host", "0.0.0.0"]
    assert serve_settings(build_parser().parse_args(front)).auth.keys_file == "/etc/difflens/auth/keys.json"
    assert not serve_settings(build_parser().parse_args([*front, "--no-auth"])).auth.enabled  # the flag wins
    monkeypatch.delenv("DIFFLENS_AUTH_KEYS")
    for host in ("127.0.0.1", "::1", "localhost"):
        assert not serve_settings(build_parser().parse_args(["serve", "--embedded", "--host", host])).auth.enabled


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_port_in_use_exits_2_naming_its_flag(flag, tiny_dir, capsys, monkeypatch):
    import socket

    monkeypatch.delenv("DIFFLENS_REDIS_URL", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["serve", "--embedded", "--model", f"tiny={tiny_dir}", flag, str(port)]
        if flag == "--metrics-port":
            argv += ["--port", "0"]
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag}: cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_a_busy_metrics_port_is_told_before_redis_is_waited_for(capsys, monkeypatch):
    """The front waited for Redis (up to DIFFLENS_REDIS_WAIT_S) and reported only that, never the busy port."""
    import socket

    from tests.api.helpers import free_port

    monkeypatch.setenv("DIFFLENS_REDIS_WAIT_S", "0.5")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["serve", "--redis", f"redis://127.0.0.1:{free_port()}/0", "--port", "0", "--metrics-port", str(port),
                "--no-auth"]
        assert main(argv) == 2
    assert f"--metrics-port: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_ctrl_c_while_the_stream_resumes_exits_130_without_a_traceback(tiny_dir, tmp_path):
    """The front died mid-call and the CLI is resuming; an interrupt then cannot cancel the job (no front
    answers): it says so, with the job id, instead of a traceback."""
    from difflens.api.server import BackgroundServer
    from tests.api.helpers import settings

    srv = BackgroundServer(settings(tiny_dir)).start()  # no worker: the job waits, queued
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "difflens", "explain", MODEL, "a red circle", "--server",
                             srv.target, "--steps", "2", "--out", str(tmp_path / "out")],
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        wait_until(lambda: any("queued" in line for line in lines), 120, 0.1, lambda: "".join(lines))
        srv.stop(grace_s=0)
        wait_until(lambda: any("broke" in line for line in lines), 120, 0.1, lambda: "".join(lines))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    text = "".join(lines)
    assert "could not cancel job" in text and "Traceback" not in text, text
    assert not (tmp_path / "out").exists()


def test_ctrl_c_before_the_server_named_the_job_says_so_and_how_to_find_it(tmp_path):
    """A server that accepts the connection but never answers: no event names the job, and the cancel's lookup
    cannot reach a front either. The CLI must not claim it cancelled a job of no name."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "difflens", "explain", MODEL, "a red circle", "--server",
                                 f"127.0.0.1:{mute.getsockname()[1]}", "--steps", "2", "--out",
                                 str(tmp_path / "out")], stderr=subprocess.PIPE, text=True, env=env)
        try:
            mute.settimeout(60)
            conn, _ = mute.accept()  # the call is on its way: it waits for a server that never speaks
            with conn:
                time.sleep(0.5)
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130
    assert "could not cancel the job (the server had not named it yet" in err and "idempotency key client-" in err
    assert "Traceback" not in err and "job  cancelled" not in err, err
