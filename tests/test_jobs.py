from __future__ import annotations

import json

import numpy as np
import pytest

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
from difflens.job_codec import decode_event, encode_event, json_type_problem, options_from_dict
from difflens.jobs import (
    Completed,
    Failed,
    JobSpec,
    OutputOptions,
    Progress,
    Queued,
    Started,
    Step,
    TokenMap,
)

SAMPLING_SPEC = JobSpec("m", GenerationParams("p"), ExplainOptions(rise=RiseOptions(
    num_masks=32, sampler="stratified", antithetic=True, stop_at_r=0.9, min_masks=8, ssim_padding="zero",
    estimator="regression")))
SPECS = [
    JobSpec("default", GenerationParams("a red circle")),
    JobSpec("m", GenerationParams("a blue square", negative_prompt="x", seed=7, steps=5, guidance_scale=2.5,
                                  width=64, height=32, scheduler="euler", sampling=Sampling("early", 30.0)),
            ExplainOptions(StepSelector("list", (1, 3)), RiseOptions(num_masks=8, mask="grid", grid_size=4,
                                                                     structure_2x=True, target="x_prev"),
                           CamOptions(("up_blocks.1",), "guided_sum"), AttentionOptions()),
            OutputOptions("float16", True), deadline=1e9, idempotency_key="k", caller="app"),
    JobSpec("m", GenerationParams("p", sampling=Sampling("explicit", timesteps=(900, 500, 10))),
            ExplainOptions(StepSelector("every", every=3))),
    SAMPLING_SPEC,
    JobSpec("m", GenerationParams("p"), output=OutputOptions(progress_events=True)),
]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trips_through_json(spec):
    assert JobSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("spec", SPECS)
def test_every_spec_the_service_writes_passes_the_type_check_of_records(spec):
    """replay refuses a record whose request fails json_type_problem: none that a front or a worker wrote may."""
    assert json_type_problem(JobSpec, json.loads(spec.to_json()), "request") is None


def test_options_from_a_mapping_build_nested_options_and_keep_a_bases_other_fields():
    """The one mapping -> options path (JSON, a request's given fields, command-line flags): lists become tuples,
    objects their dataclasses; a base keeps what the mapping does not name; the dataclasses' own checks run."""
    explain = options_from_dict(ExplainOptions, {"steps": {"kind": "list", "indices": [1, 3]},
                                                 "cam": {"layers": ["up_blocks.1"], "target": "guided_sum"},
                                                 "rise": None, "attention": {}})
    assert explain == ExplainOptions(StepSelector("list", (1, 3)), None, CamOptions(("up_blocks.1",), "guided_sum"),
                                     AttentionOptions())
    base = RiseOptions(num_masks=32, seed=5, mask="grid", grid_size=4)
    assert options_from_dict(RiseOptions, {"num_masks": 64}, base) == RiseOptions(num_masks=64, seed=5, mask="grid",
                                                                                  grid_size=4)
    with pytest.raises(InvalidArgument) as e:
        options_from_dict(RiseOptions, {"p": 2.0}, base)
    assert e.value.field == "rise.p"
    with pytest.raises(TypeError):
        options_from_dict(RiseOptions, {"masks_count": 3})


def test_the_type_check_takes_whole_numbers_for_floats_and_names_the_first_wrong_field():
    d = json.loads(SPECS[1].to_json())
    d["params"]["guidance_scale"], d["params"]["sampling"]["shift"] = 7, 30  # JSON writers drop ".0"
    assert json_type_problem(JobSpec, d, "request") is None
    d["params"]["width"], d["explain"]["rise"]["p"] = 64.0, "0.5"
    assert json_type_problem(JobSpec, d, "request") == "request.params.width: expected an integer or null, got 64.0"


def test_a_worker_of_the_previous_release_reads_every_spec_a_new_front_queues():
    """Its OutputOptions has no progress_events and takes the whole "output" object as keyword arguments: the flag
    travels outside it, where that worker ignores it (it then just sends no Progress events)."""
    import json

    for spec in SPECS:
        d = json.loads(spec.to_json())
        assert set(d["output"]) == {"map_dtype", "include_x0_previews"}
    assert json.loads(SPECS[-1].to_json())["progress_events"] is True
    assert "progress_events" not in json.loads(SPECS[0].to_json())


def test_a_default_rise_spec_writes_the_fields_an_earlier_release_wrote():
    """The sampling fields are left out at their defaults: the JSON (the idempotency fingerprint, the audit record's
    request) is an earlier release's, whose worker passes the "rise" object to RiseOptions(**...)."""
    rise = json.loads(JobSpec("m", GenerationParams("p"), ExplainOptions(rise=RiseOptions())).to_json())
    assert set(rise["explain"]["rise"]) == {"num_masks", "p", "mask", "grid_size", "substrate", "score",
                                            "structure_2x", "ssim_padding", "target", "batch_size", "seed", "masks"}
    assert rise["explain"]["rise"]["ssim_padding"] == "reflect"  # always named: its default changed
    used = json.loads(SAMPLING_SPEC.to_json())["explain"]["rise"]
    assert (used["sampler"], used["antithetic"], used["stop_at_r"], used["min_masks"]) == ("stratified", True, 0.9, 8)
    assert used["estimator"] == "regression"


def test_a_spec_recorded_before_the_padding_option_ran_with_zero_padding():
    d = json.loads(JobSpec("m", GenerationParams("p"), ExplainOptions(rise=RiseOptions(num_masks=8))).to_json())
    del d["explain"]["rise"]["ssim_padding"]
    rise = JobSpec.from_json(json.dumps(d)).explain.rise
    assert rise == RiseOptions(num_masks=8, ssim_padding="zero")


def test_spec_with_explicit_masks_is_refused():
    import torch

    spec = JobSpec("m", GenerationParams("p"), ExplainOptions(rise=RiseOptions(masks=torch.ones(2, 4, 4))))
    with pytest.raises(ValueError, match="masks"):
        spec.to_json()


def test_output_dtype_is_checked():
    with pytest.raises(InvalidArgument, match="output.map_dtype"):
        OutputOptions("int8")  # type: ignore[arg-type]


def test_events_round_trip_with_arrays_bit_exact():
    rng = np.random.default_rng(0)
    step = Step(2, 801, 10, {"rise": rng.random((4, 4)).astype(np.float16),
                             "cam/up_blocks.0": rng.random((4, 4)).astype(np.float32)},
                (TokenMap("red", rng.random((4, 4)).astype(np.float32), 0.25),), 0.5,
                rng.random((3, 8, 8)).astype(np.float32))
    back = decode_event(encode_event(step))
    assert isinstance(back, Step)
    assert (back.index, back.timestep, back.num_steps, back.latency_s) == (2, 801, 10, 0.5)
    for k, v in step.maps.items():
        assert back.maps[k].dtype == v.dtype and np.array_equal(back.maps[k], v)
    assert back.tokens[0].token == "red" and np.array_equal(back.tokens[0].map, step.tokens[0].map)
    assert back.x0_preview is not None and np.array_equal(back.x0_preview, step.x0_preview)
    for ev in (Queued(3), Started("w1", 2), Progress(3, 500, 10, 0.25), Completed(b"\x89PNG..", '{"a": 1}'),
               Failed("CANCELLED", "stop"), Step(1, 500, 3, rise=RiseStats(96, 256, 0.962, 0.95)),
               Step(1, 500, 3, rise=RiseStats(8, 8, None, None))):
        assert decode_event(encode_event(ev)) == ev


def test_event_arrays_must_have_a_wire_dtype():
    with pytest.raises(TypeError, match="float16"):
        encode_event(Step(0, 1, 1, {"rise": np.zeros((2, 2), np.float64)}))
