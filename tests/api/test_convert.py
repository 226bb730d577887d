"""Contract <-> domain conversion: requests, tensors, events and jobs survive the round trip."""

from __future__ import annotations

import numpy as np
import pytest

from difflens.api import convert
from difflens.api.pb import pb
from difflens.engine.options import (
    AttentionOptions,
    CamOptions,
    ExplainOptions,
    GenerationParams,
    RiseOptions,
    RiseStats,
    Sampling,
    StepSelector,
)
from difflens.errors import InvalidArgument
from difflens.jobs import (
    Completed,
    Failed,
    JobRecord,
    JobSpec,
    OutputOptions,
    Progress,
    Queued,
    Started,
    Step,
    TokenMap,
)

SPECS = [
    JobSpec(model="", params=GenerationParams("a cat")),
    JobSpec(model="m", params=GenerationParams("a cat", negative_prompt="dog", seed=7, steps=12, guidance_scale=3.5,
                                               width=64, height=48, scheduler="dpmsolver++",
                                               sampling=Sampling("late", shift=20.0)),
            explain=ExplainOptions(steps=StepSelector("list", indices=(1, 3)),
                                   rise=RiseOptions(num_masks=33, p=0.25, mask="grid", grid_size=4, substrate="blur",
                                                    score="cosine", structure_2x=True, target="x_prev",
                                                    batch_size=5, seed=9, ssim_padding="reflect"),
                                   cam=CamOptions(layers=("a.b", "c.d"), target="guided_sqnorm"),
                                   attention=AttentionOptions()),
            output=OutputOptions(map_dtype="float16", include_x0_previews=True), idempotency_key="k1"),
    JobSpec(model="m", params=GenerationParams("x", scheduler="euler", sampling=Sampling("explicit",
                                                                                        timesteps=(900, 500, 2))),
            explain=ExplainOptions(steps=StepSelector("every", every=3), cam=CamOptions())),
    JobSpec(model="m", params=GenerationParams("x", sampling=Sampling("early")),
            explain=ExplainOptions(rise=RiseOptions())),
    JobSpec(model="m", params=GenerationParams("x"), output=OutputOptions(progress_events=True)),
    JobSpec(model="m", params=GenerationParams("x"),
            explain=ExplainOptions(rise=RiseOptions(num_masks=64, p=0.3, sampler="sobol", antithetic=True,
                                                    stop_at_r=0.95, min_masks=16, ssim_padding="zero"))),
    JobSpec(model="m", params=GenerationParams("x"),
            explain=ExplainOptions(rise=RiseOptions(sampler="stratified", stop_at_r=0.0))),
    JobSpec(model="m", params=GenerationParams("x"),
            explain=ExplainOptions(rise=RiseOptions(num_masks=32, sampler="stratified", estimator="regression"))),
]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_request_spec_round_trip(spec):
    req = convert.spec_to_request(spec)
    wire = pb.ExplainRequest.FromString(req.SerializeToString())
    assert convert.request_to_spec(wire) == spec


def test_unset_fields_stay_unset_for_the_model_defaults():
    spec = convert.request_to_spec(pb.ExplainRequest(prompt="p"))
    assert (spec.params.steps, spec.params.guidance_scale, spec.params.width, spec.params.scheduler) == \
        (None, None, None, None)
    assert spec.explain == ExplainOptions() and spec.output == OutputOptions() and spec.params.seed == 0


def test_unset_rise_fields_take_the_defaults_and_unset_padding_is_reflect():
    req = pb.ExplainRequest(prompt="p")
    req.explain.rise.SetInParent()
    rise = convert.request_to_spec(req).explain.rise
    assert rise == RiseOptions() and rise.ssim_padding == "reflect"
    assert (rise.sampler, rise.antithetic, rise.stop_at_r, rise.min_masks) == ("mc", False, None, 64)
    assert rise.estimator == "ratio"
    req.explain.rise.ssim_padding = pb.RiseOptions.SSIM_PADDING_ZERO
    assert convert.request_to_spec(req).explain.rise.ssim_padding == "zero"
    sent = convert.spec_to_request(JobSpec("m", GenerationParams("p"), ExplainOptions(rise=RiseOptions())))
    assert sent.explain.rise.ssim_padding == pb.RiseOptions.SSIM_PADDING_REFLECT  # explicit on the wire
    assert not sent.explain.rise.HasField("stop_at_r")


@pytest.mark.parametrize(("field", "value", "path", "text"), [
    ("sampler", 9, "explain.rise.sampler", "SAMPLER_MC, SAMPLER_STRATIFIED, SAMPLER_SOBOL"),
    ("stop_at_r", 1.5, "explain.rise.stop_at_r", "allowed range [0.0, 1.0]"),
    ("min_masks", 1, "explain.rise.min_masks", "allowed range [4, 1000000]"),
    ("estimator", 7, "explain.rise.estimator", "ESTIMATOR_RATIO, ESTIMATOR_REGRESSION"),
])
def test_bad_sampling_fields_are_named_as_the_contract_names_them(field, value, path, text):
    req = pb.ExplainRequest(prompt="p")
    setattr(req.explain.rise, field, value)
    with pytest.raises(InvalidArgument) as err:
        convert.request_to_spec(req)
    assert convert.pb_field(err.value.field) == path and text in err.value.message


def test_deadline_is_the_earlier_of_call_and_timeout_seconds():
    req = pb.ExplainRequest(prompt="p", timeout_seconds=10.0)
    assert convert.job_deadline(req, 3.0, now=100.0) == 103.0
    assert convert.job_deadline(req, 30.0, now=100.0) == 110.0
    assert convert.job_deadline(pb.ExplainRequest(prompt="p"), None, now=100.0) is None


@pytest.mark.parametrize(("dtype", "shape"), [("float32", (4, 5)), ("float16", (3, 8, 8)), ("uint8", (2,))])
def test_tensor_round_trip_is_exact(dtype, shape):
    a = (np.random.default_rng(0).random(shape) * 200).astype(dtype)
    t = pb.Tensor.FromString(convert.tensor_to_pb(a).SerializeToString())
    assert list(t.shape) == list(shape) and len(t.data) == a.nbytes
    np.testing.assert_array_equal(convert.tensor_from_pb(t), a)


def test_a_tensor_with_the_wrong_byte_count_is_refused():
    with pytest.raises(ValueError, match="needs 16 bytes, got 12"):
        convert.tensor_from_pb(pb.Tensor(dtype=pb.Tensor.D_TYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12))


EVENTS = [
    Queued(3), Started("w-1", 2),
    Step(index=4, timestep=801, num_steps=10, maps={"rise": np.ones((2, 2), np.float32)},
         tokens=(TokenMap("cat", np.zeros((2, 2), np.float16), 0.5),), latency_s=0.25,
         x0_preview=np.full((3, 4, 4), 0.5, np.float32)),
    Step(index=0, timestep=999, num_steps=1),
    Step(index=2, timestep=500, num_steps=3, rise=RiseStats(96, 256, 0.9625, 0.95)),
    Step(index=2, timestep=500, num_steps=3, rise=RiseStats(8, 8)),
    Progress(index=5, timestep=761, num_steps=10, latency_s=0.125),
    Completed(b"\x89PNG...", '{"schema": "x"}'),
    Failed("DEADLINE_EXCEEDED", "too late"), Failed("CANCELLED", "by you"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_event_round_trip(event):
    msg = pb.ExplainEvent.FromString(convert.event_to_pb("job-1", 7, event).SerializeToString())
    assert (msg.job_id, msg.sequence) == ("job-1", 7)
    back = convert.event_from_pb(msg)
    if isinstance(event, Step):
        assert (back.index, back.timestep, back.num_steps, back.latency_s) == \
            (event.index, event.timestep, event.num_steps, event.latency_s)
        assert back.maps.keys() == event.maps.keys()
        for k in event.maps:
            np.testing.assert_array_equal(back.maps[k], event.maps[k])
        assert [(t.token, t.relevance, t.map.dtype) for t in back.tokens] == \
            [(t.token, t.relevance, t.map.dtype) for t in event.tokens]
        assert (back.x0_preview is None) == (event.x0_preview is None)
        assert back.rise == event.rise
    else:
        assert back == event


def test_failed_carries_the_google_rpc_code():
    assert convert.event_to_pb("j", 0, Failed("DEADLINE_EXCEEDED", "x")).failed.code == 4
    assert convert.event_to_pb("j", 0, Failed("CANCELLED", "x")).failed.code == 1


def test_job_round_trip():
    r = JobRecord(id="j", state="running", model="m", created_at=1.5, updated_at=2.5, queue_position=0, error="",
                  worker="w", deliveries=2)
    assert convert.job_from_pb(pb.Job.FromString(convert.job_to_pb(r).SerializeToString())) == r


@pytest.mark.parametrize(("domain", "path"), [
    ("rise.num_masks", "explain.rise.masks"), ("rise.grid_size", "explain.rise.grid_size"),
    ("cam.layers", "explain.cam.layers"), ("sampling.timesteps", "sampling.explicit.timesteps"),
    ("steps", "steps"), ("explain.steps.every", "explain.steps.every"),
])
def test_domain_fields_are_named_as_the_contract_names_them(domain, path):
    assert convert.pb_field(domain) == path


def test_unknown_enum_numbers_list_the_allowed_names():
    with pytest.raises(InvalidArgument) as err:
        convert.request_to_spec(pb.ExplainRequest(prompt="p", scheduler=42))
    assert err.value.field == "scheduler"
    assert "SCHEDULER_DDIM" in err.value.message and "SCHEDULER_EULER" in err.value.message


@pytest.mark.parametrize(("part", "field"), [("sampling", "sampling"), ("steps", "explain.steps")])
def test_a_oneof_kind_this_server_does_not_know_is_refused_not_read_as_unset(part, field):
    """A newer client's kind (field 4 here) used to read as no kind: uniform timesteps, every step explained."""
    req = pb.ExplainRequest(prompt="p")
    (req.sampling if part == "sampling" else req.explain.steps).MergeFromString(b"\x22\x00")
    with pytest.raises(InvalidArgument) as err:
        convert.request_to_spec(req)
    assert err.value.field == field and "does not know" in err.value.message


@pytest.mark.parametrize(("part", "field"), [("indices", "explain.steps.indices.values"),
                                             ("layers", "explain.cam.layers")])
def test_a_list_longer_than_its_limit_is_refused_before_it_is_read(part, field):
    """3,000,000 copies of index 0 passed validation, and the audit record held them twice: its Completed event
    passed the message limit and could never be delivered. Duplicates are not removed (the idempotency
    fingerprint of a front of the previous release counts them), so the raw list is what is bounded."""
    from difflens.config import Limits

    most, value = (10, 0) if part == "indices" else (4, "mid_block")
    limits = Limits(max_steps=10, max_cam_layers=4)
    req = pb.ExplainRequest(prompt="p")
    values = req.explain.steps.indices.values if part == "indices" else req.explain.cam.layers
    values.extend([value] * most)
    spec = convert.request_to_spec(req, limits=limits)  # at the limit, duplicates and all
    assert convert.request_to_spec(convert.spec_to_request(spec), limits=limits) == spec
    values.append(value)
    with pytest.raises(InvalidArgument) as err:
        convert.request_to_spec(req, limits=limits)
    assert convert.pb_field(err.value.field) == field
    assert err.value.message == f"{most + 1} values; allowed at most {most} (each once)"
