"""The shipped model (models/shapes): it loads through the standard loader and draws what a handful of fixed
prompts ask for, read back by the attribute checker. Sampling defaults come from the folder's difflens.json."""

from __future__ import annotations

import json

import pytest

from difflens.config import SHIPPED_MODEL
from difflens.engine.loading import load_model
from difflens.engine.options import GenerationParams
from difflens.engine.sampler import generate
from difflens.scenes.checker import check_image

# One per colour and per position; the seeds are fixed, not picked: any seed should do for a model that works.
PROMPTS = [
    ("a large red circle on the left", "red", "left"),
    ("a small green square on the right", "green", "right"),
    ("a large blue striped triangle at the top", "blue", "top"),
    ("a large yellow dotted circle at the bottom", "yellow", "bottom"),
    ("a small red square in the center", "red", "center"),
]


@pytest.fixture(scope="module")
def shipped():
    return load_model(SHIPPED_MODEL)


def test_shipped_folder_is_standard_safetensors_with_sampling_defaults(shipped):
    index = json.loads((SHIPPED_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["vae"] == [None, None]
    assert not [p for p in SHIPPED_MODEL.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt")]
    assert shipped.vae is None and shipped.defaults.width == shipped.defaults.height == 32
    assert shipped.defaults.max_side == 128  # 4x its training size (training.evaluate.MAX_SIDE_FACTOR)


@pytest.mark.parametrize(("prompt", "color", "position"), PROMPTS)
def test_shipped_model_draws_the_colour_and_place_asked_for(shipped, prompt, color, position):
    image = generate(shipped, GenerationParams(prompt, seed=11)).image
    found = check_image(image)
    assert found.count == 1, f"{prompt!r}: {found.count} objects"
    got = found.objects[0].attributes
    assert (got.color, got.position) == (color, position), prompt


def test_diffusers_own_pipeline_loads_and_runs_the_shipped_folder():
    """Interop beyond our loader: diffusers' StableDiffusionPipeline reads the folder as is. It is pixel-space, so
    the pipeline gets vae=None and returns the 'latent', which is the image in [-1, 1] (shipped-model.md)."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL, vae=None, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    x = pipe("a large red circle on the left", num_inference_steps=25, guidance_scale=2.0, output_type="latent",
             generator=torch.Generator().manual_seed(11)).images
    image = ((x[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    found = check_image(image)
    assert found.count == 1
    assert (found.objects[0].attributes.color, found.objects[0].attributes.position) == ("red", "left")
