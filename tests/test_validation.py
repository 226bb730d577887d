"""Front-side validation against limits and the catalog (the table of bad requests is in tests/api)."""

from __future__ import annotations

import pytest

from difflens.catalog import ModelCatalog, describe
from difflens.config import Limits
from difflens.engine.options import ExplainOptions, GenerationParams, RiseOptions, Sampling, StepSelector
from difflens.errors import InvalidArgument
from difflens.jobs import JobSpec
from difflens.validation import validate


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
