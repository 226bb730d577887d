"""The queue on a Redis that wants TLS with client certificates (rediss://, DIFFLENS_REDIS_TLS_*) and an ACL user
that may touch only the queue's keys and channel, with the commands docs/security.md lists (the rule is read from
there): every queue call, front and worker, blocking and asyncio, works under that least-privilege user."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from difflens.config import ServiceSettings
from difflens.engine.options import GenerationParams
from difflens.errors import NotReady
from difflens.jobs import Completed, JobSpec, Step
from difflens.queue.redis_streams import connect
from tests.support.certs import issue, make_ca
from tests.support.redis_server import _binary
from tests.support.waiting import wait_until

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
QUEUE = "difflens"
PASSWORD = "queue-pw"


def documented_acl() -> str:
    """The ACL rule docs/security.md gives for the queue's user (a line `user difflens on >... <rules>`)."""
    found = re.search(r"^user difflens on >\S+ (.+)$", DOC.read_text(), re.MULTILINE)
    assert found, "docs/security.md lost its ACL rule"
    return found.group(1)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory):
    d = tmp_path_factory.mktemp("redis-tls")
    ca = make_ca(d, "redis-ca")
    server, client = issue(ca, d, "redis"), issue(ca, d, "difflens", client=True)
    acl = d / "users.acl"
    acl.write_text(f"user default off\nuser admin on >admin-pw ~* &* +@all\n"
                   f"user difflens on >{PASSWORD} {documented_acl()}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(d), "--tls-cert-file", str(server.cert),
                             "--tls-key-file", str(server.key), "--tls-ca-cert-file", str(ca.cert),
                             "--tls-auth-clients", "yes", "--aclfile", str(acl)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca.cert),
                        ssl_certfile=str(client.cert), ssl_keyfile=str(client.key), username="admin",
                        password="admin-pw")
    wait_until(lambda: _answers(admin) or proc.poll() is not None, 60, 0.05, "redis-server with TLS to start")
    assert proc.poll() is None, "redis-server with TLS did not start"
    env = {"DIFFLENS_REDIS_URL": f"rediss://127.0.0.1:{port}/0", "DIFFLENS_REDIS_USERNAME": "difflens",
           "DIFFLENS_REDIS_PASSWORD": PASSWORD, "DIFFLENS_REDIS_TLS_CA": str(ca.cert),
           "DIFFLENS_REDIS_TLS_CERT": str(client.cert), "DIFFLENS_REDIS_TLS_KEY": str(client.key),
           "DIFFLENS_QUEUE": QUEUE, "DIFFLENS_VISIBILITY_TIMEOUT_S": "1", "DIFFLENS_HEARTBEAT_INTERVAL_S": "0.2",
           "DIFFLENS_REDIS_WAIT_S": "0.5"}
    yield env, admin
    admin.close()
    proc.terminate()
    proc.wait(10)


def test_every_queue_call_works_under_the_least_privilege_user_over_tls(secure_redis):
    env, admin = secure_redis
    admin.acl_log_reset()
    q = connect(ServiceSettings.from_env(env))
    try:
        q.prepare(["m"])
        spec = dataclasses.replace(JobSpec("m", GenerationParams("a red circle")), tenant="acme",
                                   idempotency_key="k", deadline=time.time() + 60)
        job = q.enqueue(spec, max_in_flight=5)
        assert q.get(job.id).tenant == "acme" and len(q.events(job.id)) == 1
        assert q.take_token("acme", 10, 5) == 0.0
        q.announce("w", ["m"])
        assert (q.live_workers("m"), q.depth("m"), q.expire_overdue("m")) == (1, 1, 0)
        claim = q.claim("w", ["m"], block_s=2, start=True)
        assert claim is not None and q.heartbeat(claim) and q.publish(claim, Step(0, 900, 2))
        q.cancel(job.id)
        wait_until(lambda: q.cancel_signalled(job.id), 60, 0.05, "the cancel heard")  # pub/sub on the queue's channel
        assert q.finish(claim, Completed(b"png", "{}")) and q.delete(job.id).state == "completed"
        second = q.enqueue(dataclasses.replace(spec, idempotency_key="k2"))
        ahead = q.claim_ahead("w", ["m"], block_s=2)
        assert ahead is not None and ahead[1]() and q.hand_back(ahead[0])
        again = q.claim("w", ["m"], block_s=3, start=True)
        assert again is not None and again.job_id == second.id
        q.retire("w", ["m"])
        assert q.dead_letters() == []

        async def front() -> None:
            f = q.async_front(4)
            made = await f.enqueue(dataclasses.replace(spec, idempotency_key="k3"), 5)
            assert (await f.get(made.id)).state == "queued" and len(await f.events(made.id, -1, 0.1)) == 1
            assert await f.take_token("acme", 10, 5) == 0.0
            await f.close()

        asyncio.run(front())
    finally:
        q.close()
    assert admin.acl_log() == []  # nothing was refused along the way


def test_the_user_may_not_touch_keys_outside_the_queue(secure_redis):
    env, _ = secure_redis
    q = connect(ServiceSettings.from_env({**env, "DIFFLENS_QUEUE": "elsewhere"}))
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            q.prepare(["m"])
    finally:
        q.close()


@pytest.mark.parametrize(("change", "says"), [
    ({"DIFFLENS_REDIS_TLS_CERT": None, "DIFFLENS_REDIS_TLS_KEY": None}, "cannot reach"),  # no client certificate
    ({"DIFFLENS_REDIS_PASSWORD": "wrong-pw"}, "refused the credentials"),
    ({"DIFFLENS_REDIS_URL": "redis://127.0.0.1:1/0"}, "TLS_*: given for redis://difflens:***@127.0.0.1:1/0"),
    ({"DIFFLENS_REDIS_TLS_KEY": None}, "a client certificate needs its key"),
])
def test_what_the_server_refuses_is_said_without_the_password(secure_redis, change, says):
    env, _ = secure_redis
    changed = {k: v for k, v in {**env, **change}.items() if v is not None}
    with pytest.raises(NotReady) as refused:
        connect(ServiceSettings.from_env(changed))
    assert says in str(refused.value) and PASSWORD not in str(refused.value) and "wrong-pw" not in str(refused.value)
