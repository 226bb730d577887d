"""FLUX (FluxTransformer2DModel): the loader reads a FluxPipeline folder; the family packs 2 x 2 latent patches
inside its call so the engine works on the latent grid; the sampler's image equals FluxPipeline's for a
guidance-distilled (dev-like) and a schnell-like tiny model; one branch, the guidance scale an input and not CFG."""

from __future__ import annotations

import dataclasses
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from difflens.engine import families, flux
from difflens.engine.loading import load_model
from difflens.engine.options import GenerationParams
from difflens.engine.sampler import generate, make_scheduler
from difflens.engine.tokens import prompt_tokens
from difflens.errors import InvalidArgument, ModelLoadError

PROMPT = "a red circle on the left"


def pipeline(model):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=make_scheduler(model, "euler"), vae=model.vae,
                        text_encoder=model.components["text_encoder"], tokenizer=model.components["tokenizer"],
                        text_encoder_2=model.text_encoder, tokenizer_2=model.tokenizer, transformer=model.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_image(model, params, size=(32, 32)):
    out = pipeline(model)(params.prompt, num_inference_steps=params.steps, guidance_scale=params.guidance_scale,
                          generator=torch.Generator().manual_seed(params.seed), output_type="np", height=size[0],
                          width=size[1], max_sequence_length=model.tokenizer.model_max_length)
    return out.images[0]


def test_packing_is_the_pipeline_s_and_unpacks_exactly():
    from diffusers import FluxPipeline

    x = torch.randn(3, 4, 6, 10)
    packed = flux.pack(x)
    assert packed.shape == (3, 15, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 3, 4, 6, 10))
    assert torch.equal(flux.unpack(packed, 6, 10), x)
    assert torch.equal(flux.image_ids(6, 10, torch.device("cpu"), torch.float32),
                       FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))


def test_mu_is_the_pipeline_s_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    for n in (16, 256, 1024, 4096):
        assert flux.mu(n, config) == calculate_shift(n, 256, 4096, 0.5, 1.15)
    assert flux.mu(1024, {}) == calculate_shift(1024)  # the pipeline's defaults where the config has none


def test_the_loader_reads_a_flux_folder(tiny_flux):
    m = tiny_flux
    assert m.family.name == "flux" and type(m.unet).__name__ == "FluxTransformer2DModel"
    # T5 is the family's first encoder: its sequence is what the transformer's text tokens are
    assert type(m.text_encoder).__name__ == "T5EncoderModel" and type(m.tokenizer).__name__ == "T5Tokenizer"
    assert set(m.components) == {"text_encoder", "tokenizer"}
    assert type(m.components["text_encoder"]).__name__ == "CLIPTextModel"
    assert m.default_size == (32, 32) and m.defaults.steps == 28 and m.defaults.guidance_scale == 3.5
    prompt = families.of(m).encode(m, "a cat", "", (32, 32))
    assert prompt.embeds.shape == (1, 512, 32)  # one branch: T5's 512 positions of width 32
    assert prompt.added is not None and set(prompt.added) == {"pooled_projections"}
    assert prompt.added["pooled_projections"].shape == (1, 32)
    ids = m.tokenizer("a cat", padding="max_length", max_length=512).input_ids
    assert prompt.token_ids == ids and ids[:3] == [m.tokenizer.convert_tokens_to_ids("\u2581a"),
                                                   m.tokenizer.convert_tokens_to_ids("\u2581cat"), 1]
    assert [t.text for t in prompt_tokens(m.tokenizer, "a red circle, lefty")] == ["a", "red", "circle,", "lefty"]
    assert families.of(m).latent_channels(m) == 4 and m.unet.config.in_channels == 16


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_the_loop_equals_the_flux_pipeline_with_a_guidance_embedding(tiny_flux, guidance):
    params = GenerationParams(PROMPT, seed=3, steps=4, guidance_scale=guidance, scheduler="euler")
    gen = generate(tiny_flux, params)
    ref = pipeline_image(tiny_flux, params)
    assert gen.image.shape == ref.shape == (32, 32, 3)
    assert np.abs(gen.image - ref).max() <= 1e-5
    assert gen.latents.shape == (1, 4, 16, 16)


def test_the_guidance_scale_is_an_input_of_the_dev_model_and_not_cfg(tiny_flux):
    base = GenerationParams(PROMPT, seed=3, steps=3, guidance_scale=3.5, scheduler="euler")
    prompt = families.of(tiny_flux).encode(tiny_flux, PROMPT, "", (32, 32))
    cond = families.of(tiny_flux).conditioning(tiny_flux, prompt, 3.5)
    assert not cond.cfg and cond.batch(4).shape == (4, 512, 32)  # one branch whatever the scale
    added = cond.added_batch(4)
    assert added is not None and added["guidance"].tolist() == [3.5] * 4
    a = generate(tiny_flux, base).image
    b = generate(tiny_flux, dataclasses.replace(base, guidance_scale=5.0)).image
    assert np.abs(a - b).max() > 1e-4  # the embedded guidance moves the image


def test_the_loop_equals_the_flux_pipeline_for_a_schnell_like_model(tiny_flux_schnell):
    m = tiny_flux_schnell
    assert not m.unet.config.guidance_embeds and not m.scheduler.config.use_dynamic_shifting
    params = GenerationParams(PROMPT, seed=7, steps=4, guidance_scale=0.0, scheduler="euler")
    gen = generate(m, params)
    assert np.abs(gen.image - pipeline_image(m, params)).max() <= 1e-5
    assert gen.timesteps == [1000, 750, 500, 250]  # linspace(1, 1/4, 4) unshifted
    prompt = families.of(m).encode(m, PROMPT, "", (32, 32))
    assert families.of(m).conditioning(m, prompt, 3.5).added_batch(1).keys() == {"pooled_projections"}
    # no guidance input: the scale changes nothing
    other = generate(m, dataclasses.replace(params, guidance_scale=4.0))
    assert np.array_equal(gen.image, other.image)


def test_the_schedule_shifts_with_the_image_s_token_count(tiny_flux):
    """FluxPipeline's mu grows with the packed token count: a larger image is denoised on a later-shifted
    schedule, and the sampler's timesteps are the pipeline's."""
    def timesteps(size):
        params = GenerationParams(PROMPT, seed=1, steps=4, guidance_scale=3.5, scheduler="euler",
                                  height=size[0], width=size[1])
        return generate(tiny_flux, params).timesteps

    small, large = timesteps((32, 32)), timesteps((64, 96))
    assert small[0] == large[0] == 1000 and all(a < b for a, b in zip(small[1:], large[1:], strict=True))
    scheduler = make_scheduler(tiny_flux, "euler")
    tokens = 16 * 24  # 64 x 96 px: a 32 x 48 latent, 16 x 24 patches
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=flux.mu(tokens, tiny_flux.scheduler.config))
    assert large == [round(float(t)) for t in scheduler.timesteps]


def test_a_non_square_image_equals_the_pipeline_s(tiny_flux):
    params = GenerationParams(PROMPT, seed=2, steps=2, guidance_scale=3.5, scheduler="euler", height=32, width=64)
    gen = generate(tiny_flux, params)
    assert gen.image.shape == (32, 64, 3)
    assert np.abs(gen.image - pipeline_image(tiny_flux, params, (32, 64))).max() <= 1e-5


def test_a_negative_prompt_is_refused_naming_the_field(tiny_flux):
    with pytest.raises(InvalidArgument) as e:
        generate(tiny_flux, GenerationParams(PROMPT, negative_prompt="blue", steps=2))
    assert e.value.field == "negative_prompt" and "guidance-distilled" in str(e.value)


def test_a_transformer_that_does_not_match_its_encoders_is_refused_naming_the_key(tiny_flux):
    t5 = SimpleNamespace(config=SimpleNamespace(d_model=48))
    other = dataclasses.replace(tiny_flux, text_encoder=t5)
    with pytest.raises(ModelLoadError) as e:
        families.of(other).check(other)
    assert "transformer/config.json: joint_attention_dim: got 32; expected 48" in str(e.value)


def test_a_flux_folder_loads_in_bfloat16(tiny_flux_dir):
    m = load_model(tiny_flux_dir, dtype=torch.bfloat16)
    assert m.dtype == m.text_encoder.dtype == m.components["text_encoder"].dtype == m.vae.dtype == torch.bfloat16
    gen = generate(m, GenerationParams(PROMPT, seed=1, steps=2, guidance_scale=3.5, scheduler="euler"))
    assert gen.latents.dtype == torch.bfloat16 and np.isfinite(gen.image).all()


def test_a_flux_folder_without_its_t5_tokenizer_is_refused(tiny_flux_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_flux_dir, folder)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(ModelLoadError, match="tokenizer_2"):
        load_model(folder)
