"""End to end through a real gRPC server (embedded worker, in-process queue): streaming, jobs, cancel, deadline,
idempotency."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from difflens.jobs import Completed, Failed, OutputOptions, Queued, Started, Step
from tests.api.helpers import job
from tests.support.waiting import wait_until


def solo(model, spec):
    """What `difflens explain` computes in-process for the same request."""
    from difflens.engine.explain import run_explanation

    return run_explanation(model, spec.params, spec.explain)


def test_explain_streams_every_explainer_as_the_engine_computes_it(client, tiny_model):
    from difflens.render.compose import png_bytes

    spec = job(methods=("rise", "cam", "attn"), output=OutputOptions(include_x0_previews=True))
    stream = client.explain(spec, timeout=120)
    events = list(stream)
    assert [type(e) for e in events] == [Queued, Started, Step, Step, Step, Completed]
    assert stream.sequence == len(events) - 1 and len(stream.job_id) > 0
    ref = solo(tiny_model, spec)
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.index for s in steps] == [0, 1, 2] and all(s.num_steps == 3 for s in steps)
    assert [s.timestep for s in steps] == ref.timesteps
    for got, want in zip(steps, ref.steps, strict=True):
        assert set(got.maps) == {k for k in want.maps if not k.startswith("attn")}
        for name, m in got.maps.items():
            assert m.dtype == np.float32 and m.shape == (16, 16)
            np.testing.assert_allclose(m, want.maps[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
        assert [t.token for t in got.tokens] == ref.tokens == ["a", "red", "circle"]
        np.testing.assert_allclose(np.stack([t.map for t in got.tokens]), want.maps["attn"].numpy(), atol=1e-6)
        np.testing.assert_allclose([t.relevance for t in got.tokens], want.maps["attn_relevance"].numpy(), atol=1e-6)
        assert got.x0_preview is not None and got.x0_preview.shape == (3, 32, 32)
        assert 0.0 <= got.x0_preview.min() and got.x0_preview.max() <= 1.0
        assert got.latency_s > 0
    from PIL import Image

    assert events[-1].image_png == png_bytes(Image.fromarray(ref.image))


def test_float16_maps_travel_as_float16(client):
    events = list(client.explain(job(steps=2, output=OutputOptions(map_dtype="float16")), timeout=120))
    step = next(e for e in events if isinstance(e, Step))
    assert {m.dtype for m in step.maps.values()} == {np.dtype("float16")}
    assert isinstance(events[-1], Completed)


def test_submit_get_watch_and_resume(client):
    record = client.submit(job(steps=3))
    assert record.state in ("queued", "running") and record.model == "tiny"
    events = list(client.watch(record.id, timeout=120))
    assert isinstance(events[0], Queued) and isinstance(events[-1], Completed)
    done = client.get(record.id)
    assert done.state == "completed" and done.deliveries == 1 and done.worker
    tail = client.watch(record.id, from_sequence=3, raw=True)
    raw = list(tail)
    assert [e.sequence for e in raw] == list(range(3, len(events)))
    assert raw[-1].WhichOneof("event") == "completed"
    assert list(client.watch(record.id, from_sequence=len(events))) == []  # past the end: nothing, and it ends


@pytest.mark.parametrize("call", ["get", "cancel", "watch"])
def test_unknown_job_is_not_found(client, call):
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(client, call)("no-such-job")
        list(result)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-job" in err.value.details()



@pytest.mark.parametrize("progress", [False, True])
def test_progress_events_cover_the_steps_that_are_not_explained_only_when_asked(client, progress):
    from dataclasses import replace

    from difflens.engine.options import StepSelector
    from difflens.jobs import Progress

    spec = job(steps=4)
    spec = replace(spec, explain=replace(spec.explain, steps=StepSelector("list", (0, 2))),
                   output=OutputOptions(progress_events=progress))
    stream = client.explain(spec, timeout=120)
    events = list(stream)
    kinds = [(type(e).__name__, getattr(e, "index", None)) for e in events[2:-1]]
    if progress:
        assert kinds == [("Step", 0), ("Progress", 1), ("Step", 2), ("Progress", 3)]
        p = events[3]
        assert isinstance(p, Progress) and p.num_steps == 4 and p.latency_s > 0
        assert p.timestep == json.loads(stream.result.audit_json)["resolved"]["timesteps"][1]
    else:
        assert kinds == [("Step", 0), ("Step", 2)]
    assert isinstance(events[-1], Completed)
    replayed = list(client.watch(stream.job_id, timeout=30))  # WatchJob replays them too
    assert [type(e) for e in replayed] == [type(e) for e in events]

def test_cancel_stops_within_one_step(client, embedded):
    record = client.submit(job(steps=40, masks=16))
    stream = client.watch(record.id, timeout=120)
    for event in stream:
        if isinstance(event, Step):
            break
    cancelled = client.cancel(record.id)
    # the steps that exist once the cancel is acknowledged; the worker may finish the one it is in, no more
    at_cancel = sum(isinstance(e, Step) for _, e in embedded.server.queue.events(record.id))
    rest = list(stream)
    assert cancelled.state in ("running", "cancelled")
    assert isinstance(rest[-1], Failed) and rest[-1].code == "CANCELLED"
    total = sum(isinstance(e, Step) for e in stream.events)
    assert total <= at_cancel + 1 < 40
    assert client.get(record.id).state == "cancelled"


def test_cancel_before_the_first_event_still_cancels_the_job(client):
    """Ctrl-C in `difflens explain --server` right after the call: no event has named the job yet, yet it must not
    run on unseen. The request's idempotency key finds it."""
    spec = job(steps=40, masks=64, key="early-cancel")
    stream = client.explain(spec, timeout=120)
    stream.cancel()  # before iterating: no event received
    assert stream.job_id and not stream.events
    rec = wait_until(lambda: (r := client.get(stream.job_id)).state in ("cancelled", "completed", "failed") and r,
                     120, 0.1, "the job ended")
    assert rec.state == "cancelled"
    assert client.submit(spec).id == stream.job_id  # one job for the key: the cancel made no second one


def test_the_calls_deadline_becomes_the_jobs(client):
    stream = client.explain(job(steps=200, masks=64), timeout=1.5)
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    state = wait_until(lambda: (s := client.get(stream.job_id)).done and s, 120, 0.2, "the job ended")
    assert state.state == "failed" and "DEADLINE_EXCEEDED" in state.error
    steps = sum(isinstance(e, Step) for e in client.watch(stream.job_id))
    assert steps < 200  # stopped between steps, not run to the end


def test_submit_timeout_seconds_bounds_the_job(client):
    record = client.submit(job(steps=200, masks=64), timeout_s=1.0)
    events = list(client.watch(record.id, timeout=60))
    assert isinstance(events[-1], Failed) and events[-1].code == "DEADLINE_EXCEEDED"


def test_idempotency_key_is_one_job_per_caller(client, embedded):
    from difflens.client import DifflensClient

    spec = job(steps=2, key="idem-1")
    first = client.submit(spec)
    assert client.submit(spec).id == first.id
    replayed = list(client.explain(spec, timeout=120))  # same key: the same job's events, no second run
    assert sum(isinstance(e, Started) for e in replayed) == 1 and isinstance(replayed[-1], Completed)
    with DifflensClient(embedded.target, caller="someone-else") as other:
        assert other.submit(spec).id != first.id


def test_list_models_describes_the_tiny_model_without_loading(client, tiny_model):
    from difflens.engine.cam import camable_layers

    response = client.list_models()
    (info,) = response.models
    assert info.name == "tiny" and info.is_default
    assert (info.size_multiple, info.default_width, info.default_height) == (16, 32, 32)
    assert tuple(info.cam_layers) == camable_layers(tiny_model.unet)
    assert info.num_train_timesteps == 1000 and info.max_prompt_tokens == 75
    assert response.limits.max_steps == 200
    assert info.max_side == response.limits.max_side == 1024  # the tiny model sets no max_side of its own


def test_list_models_reports_the_live_workers_and_the_queue_depth(client):
    """The embedded server's worker announces itself; the front samples it once a second."""
    info = wait_until(lambda: (i := client.list_models().models[0]).live_workers and i, 60, 0.1, "a live worker")
    assert (info.live_workers, info.queue_depth) == (1, 0)


def test_a_request_without_a_model_gets_the_default(client):
    record = client.submit(job(steps=1, model=""))
    assert record.model == "tiny"
    assert isinstance(list(client.watch(record.id, timeout=60))[-1], Completed)
