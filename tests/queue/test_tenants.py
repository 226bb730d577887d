"""What the queue keeps for tenants, the same on both implementations (in-process and real Redis, blocking and
asyncio fronts): the tenant on the record, idempotency keys per tenant, the limit of jobs in flight, the shared
token bucket, and deleting a job that ended."""

from __future__ import annotations

import dataclasses
import time

import pytest

from difflens.errors import FailedPrecondition
from difflens.jobs import Completed, Failed
from difflens.queue.base import JobNotFound
from difflens.queue.common import IN_FLIGHT_RETRY_S, TenantBusy
from tests.queue.conftest import MODELS, spec


def of(tenant: str, key: str = "", prompt: str = "a red circle", caller: str = ""):
    return dataclasses.replace(spec(prompt), tenant=tenant, idempotency_key=key, caller=caller)


def test_the_record_keeps_its_tenant(backend):
    q = backend.queue()
    made = q.enqueue(of("acme"))
    assert made.tenant == "acme" and backend.replica(q).get(made.id).tenant == "acme"
    assert q.get(q.enqueue(spec()).id).tenant == ""  # submitted without authentication


def test_idempotency_keys_are_the_tenants_own(backend):
    q = backend.queue()
    first = q.enqueue(of("acme", "k1"))
    assert q.enqueue(of("acme", "k1")).id == first.id
    other = q.enqueue(of("globex", "k1"))
    assert other.id != first.id and q.get(other.id).tenant == "globex"
    plain = q.enqueue(dataclasses.replace(spec(), idempotency_key="k1", caller="acme"))  # a caller named like it
    assert plain.id not in (first.id, other.id)


def test_a_tenant_at_its_jobs_in_flight_is_refused_until_one_ends(backend):
    q = backend.queue()
    a, b = q.enqueue(of("acme", "a"), max_in_flight=2), q.enqueue(of("acme", "b"), max_in_flight=2)
    with pytest.raises(TenantBusy) as refused:
        backend.replica(q).enqueue(of("acme", "c"), max_in_flight=2)  # every front counts the same jobs
    assert refused.value.retry_after_s == IN_FLIGHT_RETRY_S and "max_in_flight=2" in str(refused.value)
    assert q.enqueue(of("acme", "a"), max_in_flight=2).id == a.id  # a retry is no new job: never refused
    q.enqueue(of("globex"), max_in_flight=2)  # another tenant's count is its own
    claim = q.claim("w1", MODELS, block_s=1)  # running still counts
    assert claim is not None and claim.job_id == a.id
    with pytest.raises(TenantBusy):
        q.enqueue(of("acme", "c"), max_in_flight=2)
    q.finish(claim, Completed(b"png", "{}"))
    c = q.enqueue(of("acme", "c"), max_in_flight=2)
    q.cancel(b.id)
    assert q.enqueue(of("acme", "d"), max_in_flight=2).id not in (a.id, b.id, c.id)
    with pytest.raises(TenantBusy):
        q.enqueue(of("acme", "e"), max_in_flight=2)
    assert q.enqueue(of("acme", "e"), max_in_flight=0).tenant == "acme"  # no limit: not counted either


def test_the_token_bucket_is_shared_and_refills_at_its_rate(backend):
    q = backend.queue()
    other = backend.replica(q)
    rate, burst = 20.0, 3
    assert [front.take_token("acme", rate, burst) for front in (q, other, q)] == [0.0, 0.0, 0.0]
    wait = other.take_token("acme", rate, burst)
    assert 0 < wait <= 1 / rate + 0.01  # the next token comes at the rate
    assert q.take_token("globex", rate, burst) == 0.0  # every tenant has its own bucket
    assert q.take_token("acme", 0, 1) == 0.0  # rate 0: no limit
    time.sleep(wait + 0.02)
    assert q.take_token("acme", rate, burst) == 0.0
    assert q.take_token("acme", rate, burst) > 0  # the bucket refilled by one token, not to its burst


def test_delete_removes_a_job_that_ended_and_refuses_one_that_has_not(backend):
    q = backend.queue()
    queued = q.enqueue(of("acme", "k"))
    with pytest.raises(FailedPrecondition, match="is queued"):
        q.delete(queued.id)
    claim = q.claim("w1", MODELS, block_s=1, start=True)
    assert claim is not None
    with pytest.raises(FailedPrecondition, match="is running"):
        q.delete(queued.id)
    q.finish(claim, Failed("INTERNAL", "boom"))
    gone = backend.replica(q).delete(queued.id)
    assert (gone.id, gone.state, gone.tenant) == (queued.id, "failed", "acme")
    for read in (q.get, q.events, q.delete, q.cancel):
        with pytest.raises(JobNotFound):
            read(queued.id)
    again = q.enqueue(of("acme", "k"))  # its idempotency key went with it: the same key is a new job
    assert again.id != queued.id and again.created
    q.cancel(again.id)  # cancelled while queued: its work entry is still in the stream
    q.delete(again.id)
    assert q.claim("w1", MODELS, block_s=0.3) is None  # the worker drops the entry of a deleted job
