from __future__ import annotations

import numpy as np
import pytest

from difflens.engine.options import GenerationParams, Sampling
from difflens.engine.sampler import generate
from difflens.evaluation.sampling import held_out_set, sample_batch
from difflens.scenes.captions import is_held_out, parse_caption


@pytest.mark.parametrize("sampling", [Sampling(), Sampling("early", shift=60.0), Sampling("late", shift=60.0)])
def test_batched_images_equal_the_engine_generation(pixel_model, sampling):
    captions, seeds = ["a large red circle in the center", "a small blue dotted square on the left"], [3, 8]
    batch = sample_batch(pixel_model, captions, seeds, sampling)
    for i, (c, s) in enumerate(zip(captions, seeds, strict=True)):
        ref = generate(pixel_model, GenerationParams(c, seed=s, sampling=sampling)).image
        one = sample_batch(pixel_model, [c], [s], sampling)[0]
        assert np.abs(one - ref).max() < 1e-5
        assert np.abs(batch[i] - ref).max() < 5e-3  # batched convolutions round differently
    assert not np.allclose(batch[0], batch[1])


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_generation_overrides_reach_the_sampler(pixel_model, scheduler):
    """Steps, guidance and scheduler given by the caller (the training evaluation's grid) replace the model's
    defaults, and the image is still the engine's for the same request."""
    captions, seeds = ["a small green striped triangle at the top", "a large yellow square on the right"], [5, 6]
    given = {"steps": 4, "guidance_scale": 3.0, "scheduler": scheduler}
    batch = sample_batch(pixel_model, captions, seeds, **given)
    for i, (c, s) in enumerate(zip(captions, seeds, strict=True)):
        ref = generate(pixel_model, GenerationParams(c, seed=s, **given))
        assert len(ref.timesteps) == 4
        assert np.abs(sample_batch(pixel_model, [c], [s], **given)[0] - ref.image).max() < 1e-5
        assert np.abs(batch[i] - ref.image).max() < 5e-3  # batched convolutions round differently
    assert np.abs(batch[0] - sample_batch(pixel_model, captions[:1], seeds[:1])[0]).max() > 1e-3


def test_held_out_set_cycles_held_out_single_object_captions_with_new_seeds():
    captions, seeds = held_out_set(200)
    assert len(captions) == 200 and seeds == list(range(200))
    assert all(is_held_out(parse_caption(c)) and len(parse_caption(c).objects) == 1 for c in captions)
    assert len(set(captions)) == 76 and len(set(zip(captions, seeds, strict=True))) == 200
