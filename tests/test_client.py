"""The Python client against a real server: retries while the server is not up yet, and the Explanation
rebuilt from a stream."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from difflens.client import DifflensClient, explanation_from_events
from tests.api.helpers import free_port, job, settings


def test_unary_calls_retry_until_the_server_is_up(tiny_dir):
    from difflens.api.server import BackgroundServer

    port = free_port()
    holder = {}

    def start_late():
        time.sleep(0.6)
        holder["srv"] = BackgroundServer(settings(tiny_dir, port=port)).start()

    t = threading.Thread(target=start_late)
    t.start()
    try:
        with DifflensClient(f"127.0.0.1:{port}", retries=6, backoff_s=0.1) as client:
            assert client.list_models().models[0].name == "tiny"
    finally:
        t.join()
        holder["srv"].stop()
    with DifflensClient(f"127.0.0.1:{port}", retries=0) as client, pytest.raises(grpc.RpcError) as err:
        client.list_models(timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_explanation_from_events_needs_a_completed_job():
    from difflens.jobs import Failed, Queued

    with pytest.raises(ValueError, match="did not complete"):
        explanation_from_events([Queued(0), Failed("CANCELLED", "x")])


def test_requests_without_a_key_get_one_so_retries_are_safe(tiny_dir):
    client = DifflensClient("127.0.0.1:1")
    try:
        a, b = client.request(job()), client.request(job())
        assert a.idempotency_key.startswith("client-") and a.idempotency_key != b.idempotency_key
        assert client.request(job(key="mine")).idempotency_key == "mine"
    finally:
        client.close()


def test_a_ready_request_takes_timeout_s_as_its_timeout_seconds():
    """submit(<ExplainRequest>, timeout_s=...) sent the request as it was: the job ran with no deadline."""
    from difflens.api.pb import pb
    from difflens.errors import InvalidArgument

    with DifflensClient("127.0.0.1:1") as client:  # no call is made
        mine = pb.ExplainRequest(prompt="a red circle", steps=150)
        req = client.request(mine, timeout_s=0.05)
        assert req.HasField("timeout_seconds") and req.timeout_seconds == 0.05 and req.idempotency_key
        assert not mine.HasField("timeout_seconds") and not mine.idempotency_key  # the caller's message as it was
        assert not client.request(mine).HasField("timeout_seconds")
        mine.timeout_seconds = 0.05
        assert client.request(mine, timeout_s=0.05).timeout_seconds == 0.05
        with pytest.raises(InvalidArgument, match="timeout_s.*timeout_seconds 0.05"):
            client.request(mine, timeout_s=9.0)
