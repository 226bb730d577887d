"""API keys and tenants on a real gRPC front (127.0.0.1, in-process queue, no worker: queued jobs are enough):
no key or a wrong one is UNAUTHENTICATED with one fixed message, health needs none, a tenant sees only its own
jobs (another tenant's id is NOT_FOUND exactly as an unknown id), idempotency keys are the tenant's, limits give
RESOURCE_EXHAUSTED with `retry-after-s`, a finished job can be deleted, and the key file is re-read without a
restart. Keys never show in logs, errors or metrics."""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from difflens import metrics
from difflens.api.auth import AUTHORIZATION
from difflens.api.pb import pb, pb_grpc
from difflens.api.server import BackgroundServer
from difflens.auth.keys import add_key, revoke_key
from difflens.auth.settings import AuthSettings
from difflens.client import DifflensClient, retry_after_s
from difflens.errors import Unauthenticated
from tests.api.helpers import job, settings
from tests.support.waiting import wait_until

RELOAD_S = 0.2


@pytest.fixture(scope="module")
def keyring(tmp_path_factory):
    """A key file: acme (two keys), globex, and 'slow', whose own limits are tiny."""
    path = tmp_path_factory.mktemp("auth") / "keys.json"
    keys = {name: add_key(path, tenant)[1] for name, tenant in
            (("acme", "acme"), ("acme2", "acme"), ("globex", "globex"), ("slow", "slow"))}
    doc = json.loads(path.read_text())
    doc["tenants"] = {"slow": {"rate_per_s": 1, "burst": 3, "max_in_flight": 2}}
    path.write_text(json.dumps(doc))
    return path, keys


@pytest.fixture(scope="module")
def front(tiny_dir, keyring):
    auth = AuthSettings(keys_file=str(keyring[0]), rate_per_s=1000, burst=1000, max_in_flight=1000,
                        tenant_labels=("acme",), reload_s=RELOAD_S)
    with BackgroundServer(settings(tiny_dir, auth=auth)) as srv:
        yield srv


@pytest.fixture
def stub(front):
    with grpc.insecure_channel(front.target) as channel:
        yield pb_grpc.ExplainerStub(channel)


@pytest.fixture(autouse=True)
def no_key_in_the_logs(caplog, keyring):
    caplog.set_level("DEBUG")
    yield
    for key in keyring[1].values():
        assert key not in caplog.text


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {key}"),)


def client(front, keyring, who: str, **kw) -> DifflensClient:
    return DifflensClient(front.target, api_key=keyring[1][who], retries=0, **kw)


def calls(job_id: str) -> dict:
    """Every Explainer method, as (method name, request), streaming ones read to the end."""
    request = pb.ExplainRequest(model="tiny", prompt="a red circle", steps=1)
    return {"Explain": request, "Submit": request, "GetJob": pb.GetJobRequest(job_id=job_id),
            "WatchJob": pb.WatchJobRequest(job_id=job_id), "CancelJob": pb.CancelJobRequest(job_id=job_id),
            "DeleteJob": pb.DeleteJobRequest(job_id=job_id), "ListModels": pb.ListModelsRequest()}


def outcome(stub, method: str, request, metadata=()) -> tuple[grpc.StatusCode, str]:
    try:
        result = getattr(stub, method)(request, metadata=metadata, timeout=10)
        if method in ("Explain", "WatchJob"):
            list(result)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def test_no_key_and_a_wrong_key_get_one_fixed_message_on_every_method(stub, keyring):
    key = keyring[1]["acme"]
    fixed = str(Unauthenticated())
    sent = [(), bearer(key[:-1]), bearer(key + "x"), ((AUTHORIZATION, f"Basic {key}"),), ((AUTHORIZATION, key),),
            (("x-api-key", key),), bearer("")]
    for method, request in calls(uuid.uuid4().hex).items():
        for metadata in sent:
            assert outcome(stub, method, request, metadata) == (grpc.StatusCode.UNAUTHENTICATED, fixed), (method,
                                                                                                        metadata)
    assert metrics.REGISTRY.get_sample_value("difflens_errors_total", {"type": "unauthenticated"}) >= 7 * len(sent)


def test_an_unparsable_message_without_a_key_is_unauthenticated_not_invalid(front):
    with grpc.insecure_channel(front.target) as channel:
        call = channel.unary_unary("/difflens.v1.Explainer/Submit", request_serializer=None,
                                   response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(b"\xff\xff\xff", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_key_and_reflection_does(front, keyring):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(front.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "difflens.v1.Explainer"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as err:
            list(reflect.ServerReflectionInfo(iter([ask]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (answer,) = reflect.ServerReflectionInfo(iter([ask]), timeout=10, metadata=bearer(keyring[1]["acme"]))
        assert "difflens.v1.Explainer" in [s.name for s in answer.list_services_response.service]


def test_another_tenants_job_is_exactly_an_unknown_job(front, keyring, stub):
    with client(front, keyring, "acme") as acme:
        mine = acme.submit(job(steps=1))
    unknown = uuid.uuid4().hex
    for method, request in calls(mine.id).items():
        if method in ("Explain", "Submit", "ListModels"):
            continue
        theirs = outcome(stub, method, request, bearer(keyring[1]["globex"]))
        request.job_id = unknown
        nobodys = outcome(stub, method, request, bearer(keyring[1]["globex"]))
        assert theirs[0] == nobodys[0] == grpc.StatusCode.NOT_FOUND, method
        assert theirs[1].replace(mine.id, "ID") == nobodys[1].replace(unknown, "ID"), method
    with client(front, keyring, "acme2") as same_tenant:  # another key of the tenant sees it, untouched
        assert same_tenant.get(mine.id).state == "queued" and same_tenant.cancel(mine.id).state == "cancelled"


def test_idempotency_keys_are_the_tenants_and_the_caller_header_is_ignored(front, keyring):
    spec = job(steps=1, key=f"k-{uuid.uuid4().hex}")
    with client(front, keyring, "acme", caller="alice") as a1, client(front, keyring, "acme2", caller="bob") as a2, \
            client(front, keyring, "globex", caller="alice") as g:
        first = a1.submit(spec)
        assert a2.submit(spec).id == first.id  # the same tenant, another key and caller: the same job
        other = g.submit(spec)
        assert other.id != first.id
        for c, j in ((a1, first), (g, other)):
            c.cancel(j.id)


def test_a_tenant_over_its_jobs_in_flight_or_its_rate_is_told_when_to_come_back(front, keyring):
    with client(front, keyring, "slow") as slow:  # 1 call/s in bursts of 3, 2 jobs in flight
        first, second = slow.submit(job(steps=1)), slow.submit(job(steps=1))
        with pytest.raises(grpc.RpcError) as busy:
            slow.submit(job(steps=1))
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_after_s(busy.value) == 2.0 and "max_in_flight=2" in busy.value.details()
        with pytest.raises(grpc.RpcError) as fast:  # the fourth call within a second: over the rate
            slow.list_models()
        assert fast.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "request rate" in fast.value.details()
        assert 0 < retry_after_s(fast.value) <= 1.0
        time.sleep(retry_after_s(fast.value) + 0.05)
        slow.cancel(first.id)
        time.sleep(1.05)
        slow.cancel(second.id)
    sample = metrics.REGISTRY.get_sample_value
    assert sample("difflens_tenant_calls_total", {"tenant": "other", "outcome": "in_flight_limited"}) >= 1
    assert sample("difflens_tenant_calls_total", {"tenant": "other", "outcome": "rate_limited"}) >= 1
    assert sample("difflens_tenant_calls_total", {"tenant": "acme", "outcome": "admitted"}) >= 1  # listed: own label
    exposition = generate_latest(metrics.REGISTRY).decode()
    assert 'tenant="slow"' not in exposition and 'tenant="globex"' not in exposition
    assert not any(key in exposition for key in keyring[1].values())


def test_delete_job_removes_a_finished_job_and_refuses_a_queued_one(front, keyring):
    with client(front, keyring, "acme") as acme:
        queued = acme.submit(job(steps=1))
        with pytest.raises(grpc.RpcError) as refused:
            acme.delete(queued.id)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "is queued" in refused.value.details()
        acme.cancel(queued.id)
        assert acme.delete(queued.id).state == "cancelled"
        with pytest.raises(grpc.RpcError) as gone:
            acme.get(queued.id)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def _refusal(client: DifflensClient) -> grpc.RpcError | None:
    """The refusal (UNAUTHENTICATED, nothing else) of a call with `client`'s key; None when the call goes through."""
    try:
        client.list_models()
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        return e
    return None


def test_a_revoked_key_is_refused_and_a_new_one_taken_without_a_restart(front, keyring, tmp_path):
    path, keys = keyring
    new_id, new_key = add_key(path, "globex")
    with DifflensClient(front.target, api_key=new_key, retries=0) as fresh:
        wait_until(lambda: _refusal(fresh) is None, 60, RELOAD_S / 2, "the new key taken")  # at the next reload
        revoke_key(path, new_id)
        refused = wait_until(lambda: _refusal(fresh), 60, RELOAD_S / 2, "the revoked key refused")
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        assert new_key not in refused.details()


def test_the_audit_record_names_the_tenant(tiny_dir, tiny_model, keyring):
    from difflens.jobs import Completed
    from difflens.models import ModelRegistry
    from tests.api.helpers import MODEL

    s = settings(tiny_dir, auth=AuthSettings(keys_file=str(keyring[0])))
    with BackgroundServer(s, run_worker=True, registry=ModelRegistry(s, preloaded={MODEL: tiny_model})) as srv, \
            DifflensClient(srv.target, api_key=keyring[1]["globex"]) as globex:
        stream = globex.explain(job(steps=1, methods=()), timeout=60)
        events = list(stream)
    assert isinstance(events[-1], Completed)
    record = json.loads(events[-1].audit_json)
    assert record["tenant"] == "globex" and record["request"]["tenant"] == "globex"
    assert not any(key in events[-1].audit_json for key in keyring[1].values())
