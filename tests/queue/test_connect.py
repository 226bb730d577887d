"""Connecting to a Redis that wants a password: DIFFLENS_REDIS_PASSWORD (one Kubernetes Secret key for the pods and
KEDA's TriggerAuthentication) where the URL carries none; never printed."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
import redis

from difflens.cli import main
from difflens.config import ServiceSettings
from difflens.errors import NotReady
from difflens.queue.redis_streams import connect, with_password
from difflens.queue.redis_work import GROUP, work_stream
from tests.support.redis_server import _binary
from tests.support.waiting import wait_until

PASSWORD = "s3cr:t/@x y"  # characters a URL must escape


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, password=PASSWORD).ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--requirepass", PASSWORD, "--dir", str(tmp_path_factory.mktemp("redis"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: _answers(url) or proc.poll() is not None, 60, 0.05, "the locked redis-server to start")
    assert proc.poll() is None
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://h:6379/0", "redis://:s3cr%3At%2F%40x%20y@h:6379/0"),
    ("rediss://app@h:6380/2", "rediss://app:s3cr%3At%2F%40x%20y@h:6380/2"),
    ("redis://:own@h/0", "redis://:own@h/0"),  # the URL's own password wins
    ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1&password=s3cr%3At%2F%40x%20y"),
])
def test_the_password_goes_into_the_url_escaped(url, expected):
    assert with_password(url, PASSWORD) == expected
    assert with_password(url, None) == url


def test_the_environment_password_opens_a_locked_redis_and_is_never_shown(locked_redis, queue_name):
    settings = ServiceSettings.from_env({"DIFFLENS_REDIS_URL": locked_redis, "DIFFLENS_REDIS_PASSWORD": PASSWORD,
                                         "DIFFLENS_QUEUE": queue_name})
    assert PASSWORD not in repr(settings)
    queue = connect(settings)
    try:
        queue.prepare(["m"])
    finally:
        queue.close()
    r = redis.Redis.from_url(locked_redis, password=PASSWORD)
    assert [g["name"] for g in r.xinfo_groups(work_stream(queue_name, "m"))] == [GROUP.encode()]


def test_a_wrong_password_is_refused_at_once_without_showing_it(locked_redis):
    settings = ServiceSettings.from_env({"DIFFLENS_REDIS_URL": locked_redis, "DIFFLENS_REDIS_PASSWORD": "nope-123",
                                         "DIFFLENS_REDIS_WAIT_S": "30"})
    t0 = time.monotonic()
    with pytest.raises(NotReady) as e:
        connect(settings)
    assert time.monotonic() - t0 < 30  # at once, not after DIFFLENS_REDIS_WAIT_S
    assert "refused the credentials" in str(e.value) and "nope-123" not in str(e.value)


def test_ensure_groups_makes_each_models_group_and_exits_0(locked_redis, queue_name, monkeypatch, capsys):
    monkeypatch.setenv("DIFFLENS_REDIS_PASSWORD", PASSWORD)
    assert main(["ensure-groups", "--redis", locked_redis, "--queue", queue_name, "--model", "a=/models/a",
                 "--model", "b"]) == 0
    r = redis.Redis.from_url(locked_redis, password=PASSWORD)
    for model in ("a", "b"):
        assert [g["name"] for g in r.xinfo_groups(work_stream(queue_name, model))] == [GROUP.encode()]
    assert main(["ensure-groups", "--redis", locked_redis, "--queue", queue_name, "--model", "a"]) == 0  # again: ok
    assert f"{queue_name}:work:a, {queue_name}:work:b" in capsys.readouterr().err


def test_ensure_groups_without_redis_names_the_flag(monkeypatch, capsys):
    monkeypatch.delenv("DIFFLENS_REDIS_URL", raising=False)
    assert main(["ensure-groups", "--model", "a"]) == 2
    assert "--redis: needs the Redis URL" in capsys.readouterr().err
