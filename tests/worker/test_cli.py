"""`difflens worker` as a process on a real Redis: takes a job, and on SIGTERM finishes it and exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from difflens.cli import main
from difflens.jobs import Completed, Started, Step
from tests.support.promtool import promtool_report
from tests.support.waiting import wait_until
from tests.worker.helpers import settings, spec, wait_for, wait_terminal


def test_worker_process_finishes_its_job_on_sigterm(tiny_dir, redis_url, queue_name, tmp_path):
    from difflens.queue.redis_streams import RedisStreamsQueue

    s = settings(tiny_dir, queue_name=queue_name)
    queue = RedisStreamsQueue(redis_url, s)
    job_id = queue.enqueue(spec(steps=8, masks=4)).id
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DIFFLENS_REDIS_URL", None)
    log = (tmp_path / "worker.log").open("w+")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "difflens", "worker", "--redis", redis_url, "--queue", queue_name,
         "--model", f"tiny={tiny_dir}", "--name", "cli-worker", "--max-jobs", "1", "--metrics-port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(queue, job_id, Step, timeout=180)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).read().decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    output = log.read()
    events = wait_terminal(queue, job_id, timeout=10)
    assert Started("cli-worker", 1) in events, output
    assert isinstance(events[-1], Completed), output  # the held job was finished, not dropped
    assert [e.index for e in events if isinstance(e, Step)] == list(range(8))
    assert "SIGTERM: finishing held jobs" in output
    assert ready == "worker cli-worker ready\n"
    assert 'difflens_queue_wait_seconds_count{model="tiny"} 1.0' in scraped
    assert 'difflens_step_duration_seconds_count{method="denoise",model="tiny"' in scraped
    assert promtool_report(scraped) in ("", None)  # None: no promtool here (tests/api/test_ops.py skips visibly)
    queue.close()


def test_a_worker_stopped_past_its_drain_grace_hands_the_job_to_another(make_worker, tiny_dir, redis_url,
                                                                        queue_name, tmp_path):
    """SIGTERM with a long job held: after --drain-grace the job goes back to the queue and the process exits 0,
    instead of holding its orchestrator's grace period until a SIGKILL (after which the job would wait out the
    visibility timeout and count a delivery). Another worker finishes it; no step is published twice."""
    import time

    from difflens.queue.redis_streams import RedisStreamsQueue

    s = settings(tiny_dir, queue_name=queue_name, visibility_timeout_s=30.0, heartbeat_interval_s=1.0,
                 max_deliveries=1)
    queue = RedisStreamsQueue(redis_url, s)
    job_id = queue.enqueue(spec(steps=60, masks=16)).id
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DIFFLENS_VISIBILITY_TIMEOUT_S": "30",
           "DIFFLENS_HEARTBEAT_INTERVAL_S": "1"}
    env.pop("DIFFLENS_REDIS_URL", None)
    log = (tmp_path / "worker.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "difflens", "worker", "--redis", redis_url, "--queue", queue_name,
         "--model", f"tiny={tiny_dir}", "--name", "leaving", "--max-jobs", "1", "--drain-grace", "0.5"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(queue, job_id, Step, timeout=180)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    output = log.read()
    assert took < 20, output  # the grace and the step in progress, not the rest of a 60-step job
    assert "handed back to the queue" in output, output
    rec = queue.get(job_id)
    assert (rec.state, rec.queue_position, rec.worker) == ("queued", 0, ""), rec  # waiting again, at the head
    make_worker(s, queue, name="heir")
    events = wait_terminal(queue, job_id, timeout=180)
    assert [e for e in events if isinstance(e, Started)] == [Started("leaving", 1), Started("heir", 1)]
    assert [e.index for e in events if isinstance(e, Step)] == list(range(60))
    assert isinstance(events[-1], Completed), events[-1]
    queue.close()


@pytest.mark.parametrize(("argv", "message"), [
    (["worker"], "--redis: a worker process needs the Redis URL"),
    (["worker", "--redis", "redis://127.0.0.1:1", "--max-jobs", "0"], "--max-jobs: got 0; must be >= 1"),
    (["worker", "--redis", "redis://127.0.0.1:1", "--threads", "-2"], "--threads: got -2; allowed: an integer >= 0"),
    (["worker", "--redis", "redis://127.0.0.1:1", "--model", "tiny"], "--model: got 'tiny'; expected NAME=DIR"),
    (["worker", "--redis", "redis://127.0.0.1:1", "--backend", "jit"],
     "--backend: got 'jit'; allowed: eager, compile, triton"),
    (["worker", "--redis", "redis://127.0.0.1:1", "--triton-model", "sd15"],
     "--triton-model: only with --backend triton (the backend is eager)"),
    (["worker", "--redis", "redis://127.0.0.1:1", "--drain-grace", "-1"], "--drain-grace: got -1.0; must be >= 0"),
])
def test_bad_worker_flags_exit_2_naming_the_flag(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("DIFFLENS_REDIS_URL", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_worker_whose_redis_never_answers_exits_2_with_one_line(tiny_dir, capsys, monkeypatch):
    from tests.support.redis_server import _free_port

    monkeypatch.setenv("DIFFLENS_REDIS_WAIT_S", "0.5")
    url = f"redis://127.0.0.1:{_free_port()}/0"
    assert main(["worker", "--redis", url, "--model", f"tiny={tiny_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"difflens: error: --redis: cannot reach {url} (waited 0.5 s, DIFFLENS_REDIS_WAIT_S)" in err
    assert "Traceback" not in err


def test_a_missing_model_folder_fails_before_any_job(tmp_path, capsys):
    argv = ["worker", "--redis", "redis://127.0.0.1:1", "--model", f"m={tmp_path / 'none'}"]
    assert main(argv) == 2
    assert "folder does not exist" in capsys.readouterr().err


def test_an_audit_dir_that_cannot_be_written_fails_before_any_job(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["worker", "--redis", "redis://127.0.0.1:1", "--audit-dir", str(f)]) == 2
    assert "--audit-dir: " in capsys.readouterr().err
    assert main(["serve", "--redis", "redis://127.0.0.1:1", "--audit-dir", str(tmp_path / "a")]) == 2
    assert "--audit-dir: only with --embedded" in capsys.readouterr().err


def test_a_worker_is_not_ready_until_its_queue_answers(tiny_dir, tmp_path):
    """/readyz (the startup and readiness probes of its pod) says 503 while the worker loads its models or waits for
    Redis, /healthz 200: a pool scaled up while Redis restarts is not counted ready, and not restarted either."""
    import urllib.error

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DIFFLENS_REDIS_WAIT_S": "60"}
    log = (tmp_path / "worker.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "difflens", "worker", "--redis", "redis://127.0.0.1:1/0",
                             "--model", f"tiny={tiny_dir}", "--metrics-port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        seen: list[str] = []
        wait_until(lambda: "waiting up to" in (tmp_path / "worker.log").read_text() or proc.poll() is not None, 300,
                   0.1, (tmp_path / "worker.log").read_text)  # models loaded, Redis awaited
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10)
        seen.append(not_ready.value.read().decode())
        alive = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status
    finally:
        proc.kill()
        proc.wait()
    assert not_ready.value.code == 503 and seen == ["models loaded; waiting for the queue\n"]
    assert alive == 200
