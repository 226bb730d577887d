"""Front-side validation against limits and the catalog (the table of bad requests is in tests/api)."""

from __future__ import annotations

import pytest

from difflens.catalog import ModelCatalog, describe
from difflens.config import Limits
from difflens.engine.options import ExplainOptions, GenerationParams, RiseOptions, Sampling, StepSelector
from difflens.errors import InvalidArgument
from difflens.jobs import JobSpec
from difflens.validation import check_request_limits, validate


@pytest.fixture(scope="module")
def catalog(tiny_dir):
    return ModelCatalog({"tiny": describe("tiny", tiny_dir)}, "tiny")


def test_a_valid_spec_gets_the_default_model_name(catalog):
    spec = validate(JobSpec(model="", params=GenerationParams("a red circle")), catalog, Limits())
    assert spec.model == "tiny" and spec.params.steps is None  # defaults stay for the worker to resolve


def test_the_mask_budget_counts_explained_steps_only(catalog):
    limits = Limits(max_mask_steps=100)
    def spec(steps):
        return JobSpec(model="tiny", params=GenerationParams("x", steps=10),
                       explain=ExplainOptions(steps=steps, rise=RiseOptions(num_masks=40)))
    validate(spec(StepSelector("list", indices=(0, 5))), catalog, limits)  # 80 <= 100
    with pytest.raises(InvalidArgument) as err:
        validate(spec(StepSelector("every", every=3)), catalog, limits)  # 4 steps x 40 = 160
    assert err.value.field == "rise.num_masks" and "160" in err.value.message and "at most 100" in err.value.message


def test_explicit_timesteps_count_as_steps(catalog):
    ts = tuple(range(900, 0, -100))  # 9 steps
    ok = JobSpec(model="tiny", params=GenerationParams("x", sampling=Sampling("explicit", timesteps=ts)))
    validate(ok, catalog, Limits(max_steps=9))
    with pytest.raises(InvalidArgument) as err:
        validate(ok, catalog, Limits(max_steps=8))
    assert err.value.field == "sampling.timesteps" and "[1, 8]" in err.value.message


def test_the_prompt_limit_is_the_smaller_of_model_and_settings(catalog):
    spec = JobSpec(model="tiny", params=GenerationParams("a red circle on the left"))
    validate(spec, catalog, Limits(max_prompt_tokens=6))
    with pytest.raises(InvalidArgument) as err:
        validate(spec, catalog, Limits(max_prompt_tokens=5))
    assert err.value.field == "prompt" and "6 tokens; allowed at most 5" in err.value.message


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_prompt_too_long_to_be_in_the_token_limit_is_refused_before_it_is_tokenized(catalog, field, monkeypatch):
    """The front validates on its event loop: tokenizing an 8 MB prompt held every other call for 7 s."""
    from difflens.validation import PROMPT_CHARS_PER_TOKEN

    entry = catalog.get("tiny")
    real = type(entry).prompt_token_count
    monkeypatch.setattr(type(entry), "prompt_token_count",
                        lambda self, text: pytest.fail("tokenized") if len(text.split()) > 50 else real(self, text))
    text = "a " * (5 * PROMPT_CHARS_PER_TOKEN)
    params = GenerationParams(text) if field == "prompt" else GenerationParams("x", negative_prompt=text)
    with pytest.raises(InvalidArgument) as err:
        validate(JobSpec(model="tiny", params=params), catalog, Limits(max_prompt_tokens=5))
    assert err.value.field == field
    assert err.value.message == (f"{len(text) - 1} characters, whitespace runs counted as one; allowed at most "
                                 f"{5 * PROMPT_CHARS_PER_TOKEN} (5 tokens) for model 'tiny'")
    # Padding is not a prompt's length: the tokenizer collapses it
    padded = "a red" + " " * (20 * PROMPT_CHARS_PER_TOKEN) + "circle"
    validate(JobSpec(model="tiny", params=GenerationParams(padded)), catalog, Limits(max_prompt_tokens=5))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_step_event_estimate_is_the_real_events_tensor_bytes(catalog, tiny_model, dtype):
    """The size check is only as good as its estimate: the engine's real Step event for the same request."""
    from difflens.engine.explain import run_explanation
    from difflens.engine.options import AttentionOptions, CamOptions
    from difflens.jobs import OutputOptions
    from difflens.validation import step_event_bytes
    from difflens.worker.events import step_event

    spec = JobSpec(model="tiny", params=GenerationParams("a small red circle", steps=2, guidance_scale=2.0),
                   explain=ExplainOptions(steps=StepSelector("list", (1,)), rise=RiseOptions(num_masks=4),
                                          cam=CamOptions(), attention=AttentionOptions()),
                   output=OutputOptions(map_dtype=dtype, include_x0_previews=True))
    exp = run_explanation(tiny_model, spec.params, spec.explain)
    words = list(exp.tokens)
    event = step_event(exp.steps[0], words, spec.output, tiny_model, 0.0, 2)
    real = (sum(m.nbytes for m in event.maps.values()) + sum(t.map.nbytes for t in event.tokens)
            + (event.x0_preview.nbytes if event.x0_preview is not None else 0))
    h, w = exp.image.shape[:2]
    assert step_event_bytes(spec, w, h, catalog.get("tiny"))[0] == real


def test_a_step_event_over_the_message_limit_is_refused_at_submit(catalog):
    """Accepted, such a job ran and then could never be delivered: every Explain or WatchJob of it hit the
    message limit at that step (RESOURCE_EXHAUSTED), while the job kept its worker."""
    from difflens.engine.options import CamOptions
    from difflens.jobs import OutputOptions

    spec = JobSpec(model="tiny", params=GenerationParams("a red circle", steps=2),
                   explain=ExplainOptions(cam=CamOptions()), output=OutputOptions(include_x0_previews=True))
    validate(spec, catalog, Limits(), max_message_bytes=64 * 2**20)
    with pytest.raises(InvalidArgument) as err:
        validate(spec, catalog, Limits(), max_message_bytes=256 * 1024 + 1000)
    assert err.value.field == "explain"
    assert "one explained step's event would be" in err.value.message and "DF-CAM maps" in err.value.message
    assert "map_dtype float16" in err.value.message
    # without an explainer there is no step event at all
    validate(JobSpec(model="tiny", params=spec.params, output=spec.output), catalog, Limits(),
             max_message_bytes=256 * 1024 + 1000)


@pytest.mark.parametrize(("field", "most"), [("explain.steps.indices", 7), ("sampling.timesteps", 7),
                                             ("cam.layers", 3)])
def test_a_request_list_past_its_limit_is_refused_on_its_length(field, most):
    """The front checks a raw request's list lengths (never their values) against the deployment's limits."""
    limits = Limits(max_steps=7, max_cam_layers=3)
    check_request_limits(limits, {}, {field: most})
    with pytest.raises(InvalidArgument) as e:
        check_request_limits(limits, {}, {field: most + 1})
    assert (e.value.field, e.value.message) == (field, f"{most + 1} values; allowed at most {most} (each once)")


def test_a_request_count_past_its_limit_is_refused_before_its_lists():
    with pytest.raises(InvalidArgument) as e:
        check_request_limits(Limits(max_masks=16), {"rise.num_masks": 17}, {"cam.layers": 10**6})
    assert e.value.field == "rise.num_masks"
