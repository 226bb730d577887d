"""No request value reaches the filesystem or a Redis key unescaped (issue 23).

What a request carries that could name a path or a key, and where it goes:
- `model`: a lookup in the front's catalog (and a worker's registry) of the configured names; only a configured
  name reaches a key (P:work:M, P:waiting:M, P:deadlines:M) or a folder (the one configured for it).
- a job id (GetJob, CancelJob, WatchJob): looked up only in the form the front makes (32 hex digits,
  queue/common.is_job_id); it then names P:job:ID and P:job:ID:events.
- `idempotency_key` and the caller (x-difflens-caller): hashed together into P:idem:SHA256.
- prompts, CAM layer paths and the rest: values inside the job's spec, never a key or a path; layer paths name
  UNet modules and are checked against the model's list before anything is queued.
Each test below throws path traversal ("../", absolute paths - the real model folder's among them -, NUL) and key
injection (spaces, newlines, '*', ':' segments, very long) at those fields of a running front (hostile.py), and
checks the answer, what the front sent Redis (MONITOR: a refused value reaches no command at all) and the keys
there afterwards (every one of the queue's own forms, none holding the value).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import grpc
import pytest

from difflens.api.pb import pb, pb_grpc
from tests.api.helpers import MODEL
from tests.api.hostile import Monitor, RunningFront, running_front

MARK = f"inj{uuid.uuid4().hex[:12]}zz"  # never a job id (not hex), so found only where a request put it


def hostile(mark: str) -> list[str]:
    """Path traversal and key injection around `mark`."""
    return [mark, f"../{mark}", f"../../../../{mark}", f"/{mark}", f"/tmp/{mark}", f"{mark}/..", f"./{mark}",
            f"~/{mark}", f"{mark}\x00", f"\x00{mark}", f"{MODEL}\x00{mark}", f"{mark} x", f"{mark}\nFLUSHALL",
            f"{mark}\r\n*1\r\n$8\r\nFLUSHALL\r\n", f"*{mark}*", f"{mark}*", f"{mark}:events", f"x:{mark}:job:1",
            f"{{{mark}}}", f"%2e%2e/{mark}", "\\..\\" + mark, f"{mark}\u202e", mark * 1000]


@pytest.fixture(scope="module")
def front(tiny_dir, redis_url, tmp_path_factory):
    queue = f"inject-{os.getpid()}"
    with running_front(tiny_dir, redis_url, queue, tmp_path_factory.mktemp("inject") / "front.log") as f:
        yield f


@pytest.fixture(scope="module")
def stub(front):
    return pb_grpc.ExplainerStub(front.channel)


def _refused(call: Any, req: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as err:
        result = call(req, timeout=10)
        list(result) if not hasattr(result, "ByteSize") else None
    assert err.value.code() == code, err.value.details()
    return str(err.value.details())


def _keys_holding(front: RunningFront, text: str) -> list[bytes]:
    return [k for k in front.redis.scan_iter(count=1000) if text.encode() in k]


@pytest.mark.parametrize("method", ["Submit", "Explain"])
def test_a_model_name_that_is_no_configured_name_reaches_neither_redis_nor_a_folder(front, stub, tiny_dir, method):
    names = hostile(MARK) + [str(tiny_dir), f"{tiny_dir}/", f"{tiny_dir}/../{tiny_dir.name}", f"{MODEL}/",
                             f"./{MODEL}", f"../{MODEL}", f" {MODEL}", f"{MODEL} ", MODEL.upper(), f"{MODEL}\x00",
                             f"{MODEL}:x", f"file://{tiny_dir}"]
    before = front.ledger()
    with Monitor(front.redis_url) as seen:
        front.redis.exists(f"probe-{MARK}")  # what MONITOR would show of a request value that reached Redis
        for name in names:
            details = _refused(getattr(stub, method), pb.ExplainRequest(model=name, prompt="a red circle", steps=2),
                               grpc.StatusCode.INVALID_ARGUMENT)
            assert details.startswith("model: unknown model") and f"available: {MODEL}" in details, details
    assert front.ledger() == before
    assert [c for c in seen.commands if MARK in c] == [f"EXISTS probe-{MARK}"]
    assert not [c for c in seen.commands if str(tiny_dir) in c]
    assert _keys_holding(front, MARK) == [] and front.stray_keys() == []


def _job(stub: Any) -> str:
    return str(stub.Submit(pb.ExplainRequest(model=MODEL, prompt="a red circle", steps=2), timeout=10).id)


@pytest.mark.parametrize("method", ["GetJob", "CancelJob", "WatchJob"])
def test_a_job_id_not_of_the_front_s_form_is_not_found_and_reaches_no_key(front, stub, method):
    job_id = _job(stub)
    request = pb.WatchJobRequest if method == "WatchJob" else getattr(pb, f"{method}Request")
    ids = hostile(MARK) + [f"{job_id}{suffix}" for suffix in (":events", "*", "\x00", " ", "\n", ":", "/..")] + \
        [f"{prefix}{job_id}" for prefix in ("*", " ", "../", "job:", ":")] + [job_id.upper(), job_id[:-1], "*", ""]
    with Monitor(front.redis_url) as seen:
        front.redis.exists(f"probe-{MARK}")
        for bad in ids:
            _refused(getattr(stub, method), request(job_id=bad), grpc.StatusCode.NOT_FOUND)
    assert [c for c in seen.commands if MARK in c] == [f"EXISTS probe-{MARK}"]
    # the real job's id went to Redis in no other form than its own
    assert not [c for c in seen.commands if job_id.upper() in c or f"*{job_id}" in c or f"{job_id}*" in c]
    assert stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).state == pb.JOB_STATE_QUEUED  # untouched
    stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=10)
    assert _keys_holding(front, MARK) == [] and front.stray_keys() == []


def test_idempotency_keys_and_callers_reach_redis_only_hashed(front, stub):
    """Accepted (a key is at most 256 characters): each distinct (caller, key) is its own job, the same one again
    finds it, and no key in Redis holds either."""
    keys = [k for k in hostile(MARK) if len(k) <= 256]
    callers = [MARK, f"{MARK} x", f"*{MARK}*", f"{MARK}:idem:x", f"../{MARK}"]  # metadata: printable ASCII only
    jobs: dict[tuple[str, str], str] = {}
    for caller in callers:
        for key in keys:
            req = pb.ExplainRequest(model=MODEL, prompt="a red circle", steps=2, idempotency_key=key)
            job = stub.Submit(req, timeout=10, metadata=(("x-difflens-caller", caller),))
            again = stub.Submit(req, timeout=10, metadata=(("x-difflens-caller", caller),))
            assert again.id == job.id
            jobs[caller, key] = job.id
    assert len(set(jobs.values())) == len(jobs)  # no two (caller, key) pairs share a job
    for job_id in jobs.values():
        stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=10)
    assert _keys_holding(front, MARK) == [] and front.stray_keys() == []
    over = pb.ExplainRequest(model=MODEL, prompt="a red circle", steps=2, idempotency_key=MARK * 20)
    before = front.ledger()
    assert _refused(stub.Submit, over, grpc.StatusCode.INVALID_ARGUMENT).startswith("idempotency_key: ")
    assert front.ledger() == before


def test_prompts_reach_redis_as_values_only(front, stub):
    for prompt in hostile(MARK)[:-1]:  # the last is past the prompt's length limit
        for field in ("prompt", "negative_prompt"):
            job = stub.Submit(pb.ExplainRequest(model=MODEL, steps=2, **{field: prompt}), timeout=10)
            stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10)
    assert _keys_holding(front, MARK) == [] and front.stray_keys() == []


def test_cam_layer_paths_name_only_the_model_s_modules(front, stub):
    """A layer path is a UNet module path (torch's get_submodule): '..', dunder attributes and NUL are refused with
    the rest of what is not in the model's list, before anything is queued."""
    before = front.ledger()
    for layer in hostile(MARK) + ["", ".", "..", "__class__", "up_blocks.0.__class__", "up_blocks.0.__dict__",
                                  "up_blocks..0", "up_blocks.-1", "up_blocks.0.resnets.0\x00", "../up_blocks.0"]:
        req = pb.ExplainRequest(model=MODEL, prompt="a red circle", steps=2)
        req.explain.cam.layers.append(layer)
        details = _refused(stub.Submit, req, grpc.StatusCode.INVALID_ARGUMENT)
        assert details.startswith("explain.cam.layers: unknown layer path"), details
    assert front.ledger() == before


def test_a_worker_s_registry_loads_only_configured_names(tiny_dir):
    """The other place a model name is looked up: a worker's registry (a job's spec names its model). Names that are
    paths, the real model folder's included, are refused before any file is read."""
    from difflens.errors import InvalidArgument
    from difflens.models import ModelRegistry
    from tests.api.helpers import settings

    registry = ModelRegistry(settings(tiny_dir))
    for name in hostile(MARK) + [str(tiny_dir), f"../{MODEL}", f"{MODEL}/", f"{MODEL}\x00", ""]:
        with pytest.raises(InvalidArgument, match="unknown model"):
            registry.get(name)
    assert not registry.loaded(MODEL)
