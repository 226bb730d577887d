"""The error interceptor: a queue outage is UNAVAILABLE; an unexpected error is INTERNAL with a fixed message and
its details only in the log; each is counted in difflens_errors_total."""

from __future__ import annotations

import logging

import grpc
import pytest
import redis

from difflens import metrics
from difflens.api.interceptors import INTERNAL_MESSAGE, MAX_MESSAGE_BYTES, status_of
from difflens.client import DifflensClient
from difflens.errors import InvalidArgument, NotReady, ResourceExhausted
from difflens.queue.base import JobNotFound
from difflens.queue.memory import InProcessQueue
from tests.api.helpers import job, settings
from tests.support.redis_server import PrivateRedis


def errors(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("difflens_errors_total", {"type": kind}) or 0.0


@pytest.mark.parametrize(("err", "code", "text", "meta"), [
    (InvalidArgument("rise.num_masks", "got 0; allowed range [1, 8192]"), grpc.StatusCode.INVALID_ARGUMENT,
     "explain.rise.masks: got 0; allowed range [1, 8192]", ()),
    (ResourceExhausted("queue full; retry in 2 s", retry_after_s=2.0), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "queue full; retry in 2 s", (("retry-after-s", "2"),)),
    (NotReady("draining"), grpc.StatusCode.UNAVAILABLE, "draining", ()),
    (JobNotFound("j1"), grpc.StatusCode.NOT_FOUND, "job 'j1' not found", ()),
    (KeyError("secret internals"), grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, ()),
])
def test_each_exception_has_one_status(err, code, text, meta):
    got_code, message, _, got_meta = status_of(err)
    assert (got_code, message, got_meta) == (code, text, meta)


def test_a_message_that_repeats_a_long_input_is_cut_to_fit_a_header():
    _, message, _, _ = status_of(InvalidArgument("sampling.timesteps", "é" * 20_000))
    assert message.startswith("sampling.explicit.timesteps: éé") and message.endswith(" more bytes)")
    assert len(message.encode()) <= MAX_MESSAGE_BYTES


@pytest.mark.parametrize("call", ["get", "cancel", "watch"])
def test_a_very_long_job_id_is_not_found_not_a_transport_error(client, call):
    """The NOT_FOUND message repeats the id: 20,000 characters of it passed gRPC's header limit, and the call
    failed RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"."""
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(client, call)("j" * 20_000)
        list(result) if call == "watch" else None
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().startswith("job 'jjj")


def test_an_invalid_list_with_thousands_of_bad_values_is_invalid_argument(client):
    from difflens.engine.options import Sampling

    spec = job(steps=2, sampling=Sampling("explicit", timesteps=tuple(range(7000, 4000, -1))))
    with pytest.raises(grpc.RpcError) as err:
        client.submit(spec)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # refused on its length before any value is read (the front checks it on its event loop)
    assert err.value.details() == "sampling.explicit.timesteps: 3000 values; allowed at most 200 (each once)"


class BrokenGetQueue(InProcessQueue):
    """A real in-process queue whose `get` hits a bug (what an unexpected exception looks like to the front)."""

    def get(self, job_id):
        raise RuntimeError(f"secret internals of {job_id}")


def test_an_unexpected_error_is_internal_with_details_only_in_the_log(tiny_dir, caplog):
    from difflens.api.server import BackgroundServer

    s = settings(tiny_dir)
    before = errors("internal")
    with caplog.at_level(logging.ERROR, logger="difflens.api.interceptors"), \
            BackgroundServer(s, queue=BrokenGetQueue(s)) as srv, DifflensClient(srv.target) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.get("ab" * 16)  # the form of a job id: the front looks up nothing else
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == INTERNAL_MESSAGE and "secret" not in err.value.details()
    assert f"secret internals of {'ab' * 16}" in caplog.text
    assert errors("internal") == before + 1


def test_a_redis_outage_is_unavailable_and_the_front_recovers_with_it(tiny_dir):
    """A private redis-server of our own, so it can be stopped and started again mid-test."""
    from difflens.api.server import BackgroundServer

    with PrivateRedis() as server:
        s = settings(tiny_dir, redis_url=server.url, queue_name="outage")
        with BackgroundServer(s) as srv, DifflensClient(srv.target, retries=0) as client:
            assert client.submit(job(steps=1)).state == "queued"
            assert health(srv.target, "SERVING")
            server.stop()
            before = errors("queue")
            with pytest.raises(grpc.RpcError) as err:
                client.submit(job(steps=1))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "queue cannot be reached" in err.value.details()
            assert errors("queue") == before + 1
            assert health(srv.target, "NOT_SERVING")  # a readiness probe takes this front out meanwhile
            server.start()
            assert client.submit(job(steps=1)).state == "queued"  # the same front, no restart
            assert health(srv.target, "SERVING")


def health(target: str, want: str, within_s: float = 10.0) -> bool:
    """Whether the server's overall health status becomes `want` within `within_s` (polled with Check)."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + within_s
        while True:
            got = health_pb2.HealthCheckResponse.ServingStatus.Name(
                stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)
            if got == want or time.monotonic() > end:
                return got == want
            time.sleep(0.1)


@pytest.mark.parametrize(("err", "full"), [
    (redis.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."), True),
    # Redis 6.2: a script's refused write comes back as a plain error
    (redis.ResponseError("Error running script (call to f_0123): @user_script:39: -OOM command not allowed when "
                         "used memory > 'maxmemory'."), True),
    (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
    (ValueError("OOM command not allowed"), False),
])
def test_redis_out_of_memory_is_recognised_on_every_supported_version(err, full):
    from difflens.queue.common import storage_full

    assert storage_full(err) is full


@pytest.mark.parametrize("method", ["Submit", "Explain", "GetJob"])
def test_a_request_that_does_not_parse_is_invalid_argument(client, method):
    """It was UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>": the deserializer failed before
    any handler of ours ran."""
    call = (client.channel.unary_stream if method == "Explain" else client.channel.unary_unary)(
        f"/difflens.v1.Explainer/{method}", request_serializer=None, response_deserializer=None)
    truncated = b"\x12\x05ab"  # field 2, 5 bytes announced, 2 sent
    with pytest.raises(grpc.RpcError) as err:
        result = call(truncated, timeout=10)
        list(result) if method == "Explain" else None
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"request: not a valid message for /difflens.v1.Explainer/{method}")
