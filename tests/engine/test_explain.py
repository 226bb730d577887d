from __future__ import annotations

import json

import numpy as np
import pytest

from difflens.engine.explain import run_explanation
from difflens.engine.options import (
    AttentionOptions,
    CamOptions,
    ExplainOptions,
    GenerationParams,
    RiseOptions,
    Sampling,
    StepSelector,
)
from difflens.errors import InvalidArgument

ALL = dict(rise=RiseOptions(num_masks=6, batch_size=4), cam=CamOptions(), attention=AttentionOptions())


@pytest.mark.slow  # four full explanations: about half of make test-fast's time, so left to make test
@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmsolver++", "euler"])
def test_explaining_leaves_the_image_bit_identical(tiny_model, scheduler):
    params = GenerationParams("a red circle on the left", seed=2, steps=4, guidance_scale=3.0, scheduler=scheduler,
                              sampling=Sampling("late", shift=30))
    plain = run_explanation(tiny_model, params, ExplainOptions())
    explained = run_explanation(tiny_model, params, ExplainOptions(**ALL))
    assert np.array_equal(plain.image, explained.image)
    assert plain.generation.latents.equal(explained.generation.latents)
    assert plain.steps == [] and len(explained.steps) == 4


def test_maps_shapes_and_names(tiny_model):
    exp = run_explanation(tiny_model, GenerationParams("a large red circle", steps=2, guidance_scale=2.0),
                          ExplainOptions(**ALL))
    assert exp.tokens == ["a", "large", "red", "circle"]
    s = exp.steps[0].maps
    assert s["rise"].shape == s["rise_raw"].shape == s["cam"].shape == (16, 16)
    assert s["attn"].shape == (4, 16, 16) and s["attn_relevance"].shape == (4,)
    assert any(k.startswith("cam/") for k in s)
    assert exp.series("rise").shape == (2, 16, 16)
    assert set(exp.steps[0].seconds) == {"rise", "cam", "attn"}


@pytest.mark.parametrize("selector,expected", [
    (StepSelector("all"), [0, 1, 2, 3, 4]),
    (StepSelector("list", indices=(4, 1)), [1, 4]),
    (StepSelector("every", every=2), [0, 2, 4]),
])
def test_step_selection_and_streaming(tiny_model, selector, expected):
    streamed, progress = [], []
    exp = run_explanation(tiny_model, GenerationParams("x", steps=5, guidance_scale=2.0),
                          ExplainOptions(steps=selector, rise=RiseOptions(num_masks=2, batch_size=2)),
                          on_step=lambda s: streamed.append(s.index),
                          on_progress=lambda i, n, t: progress.append((i, n)))
    assert [s.index for s in exp.steps] == expected == streamed
    assert progress == [(i, 5) for i in range(5)]
    assert [s.timestep for s in exp.steps] == [exp.timesteps[i] for i in expected]


def test_step_index_out_of_range(tiny_model):
    with pytest.raises(InvalidArgument) as e:
        run_explanation(tiny_model, GenerationParams("x", steps=3), ExplainOptions(
            steps=StepSelector("list", indices=(7,)), rise=RiseOptions(num_masks=2)))
    assert e.value.field == "explain.steps.indices" and "0..2" in e.value.message


def test_every_parameter_is_recorded_as_json(tiny_model):
    exp = run_explanation(tiny_model, GenerationParams("x", steps=2), ExplainOptions(rise=RiseOptions(num_masks=2)))
    rec = json.loads(json.dumps(exp.params))
    g = rec["generation"]
    assert (g["steps"], g["guidance_scale"], g["scheduler"], g["width"], g["height"]) == (2, 7.5, "ddim", 32, 32)
    assert rec["explain"]["rise"]["num_masks"] == 2 and rec["explain"]["cam"] is None
    assert rec["timesteps"] == exp.timesteps and rec["unet_backend"] == "eager"


def test_guard_is_entered_around_each_explainer_and_steps_carry_x0(tiny_model):
    """The seam a service uses to serialise the hooked explainers on a shared UNet (worker/batching.py)."""
    from contextlib import contextmanager

    log = []

    @contextmanager
    def guard(method):
        log.append(f"enter {method}")
        yield
        log.append(f"exit {method}")

    exp = run_explanation(tiny_model, GenerationParams("a red circle", steps=2, guidance_scale=2.0),
                          ExplainOptions(steps=StepSelector("list", indices=(1,)),
                                         **{**ALL, "cam": CamOptions(layers=("up_blocks.1.resnets.0",))}),
                          guard=guard)
    assert log == ["enter rise", "exit rise", "enter cam", "exit cam", "enter attn", "exit attn"]
    x0 = exp.steps[0].x0
    assert x0 is not None and x0.shape == (1, 4, 16, 16) and not x0.requires_grad
