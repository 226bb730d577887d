"""Model families: the loader and the catalog recognise each from model_index.json and refuse the others by name;
SDXL through the engine equals StableDiffusionXLPipeline, and every explainer runs on it with its added
conditioning (pooled text embeddings, time ids) on every UNet call."""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from difflens.catalog import describe
from difflens.engine import families
from difflens.engine.cam import camable_layers
from difflens.engine.explain import run_explanation
from difflens.engine.hooks import capture_cross_attention
from difflens.engine.loading import load_model
from difflens.engine.options import AttentionOptions, CamOptions, ExplainOptions, GenerationParams, RiseOptions
from difflens.engine.sampler import generate, make_scheduler
from difflens.engine.tokens import prompt_tokens
from difflens.errors import ModelLoadError
from tests.engine.family_steps import PROMPT, explained_twice_alike, first_state


def pipeline_image(model, params, negative, force_zeros=True):
    """StableDiffusionXLPipeline on the model's own components; an empty negative prompt is its None."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.components["text_encoder_2"],
        tokenizer=model.tokenizer, tokenizer_2=model.components["tokenizer_2"], unet=model.unet,
        scheduler=make_scheduler(model, params.scheduler), force_zeros_for_empty_prompt=force_zeros,
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(params.prompt, negative_prompt=negative, num_inference_steps=params.steps,
               guidance_scale=params.guidance_scale, generator=torch.Generator().manual_seed(params.seed),
               output_type="np", height=32, width=32)
    return out.images[0]


@pytest.mark.parametrize(("scheduler", "negative", "guidance"), [
    ("euler", "", 5.0), ("euler", "blue", 5.0), ("ddim", "", 5.0), ("dpmsolver++", "blue", 1.0)])
def test_sdxl_loop_equals_the_sdxl_pipeline(tiny_sdxl, scheduler, negative, guidance):
    params = GenerationParams(PROMPT, negative_prompt=negative, seed=3, steps=5, guidance_scale=guidance,
                              scheduler=scheduler)
    ours = generate(tiny_sdxl, params).image
    ref = pipeline_image(tiny_sdxl, params, negative or None)
    assert ours.shape == ref.shape == (32, 32, 3)
    assert np.abs(ours - ref).max() <= 1e-5


def test_an_empty_negative_prompt_is_zeros_only_where_the_model_says_so(tiny_sdxl):
    params = GenerationParams(PROMPT, seed=4, steps=3, guidance_scale=5.0, scheduler="euler")
    zeros = generate(tiny_sdxl, params).image
    encoded = pipeline_image(tiny_sdxl, params, "")  # the pipeline encodes an explicit "" instead of zeros
    assert np.abs(zeros - encoded).max() > 1e-3
    off = dataclasses.replace(tiny_sdxl, options={"force_zeros_for_empty_prompt": False})
    ref = pipeline_image(tiny_sdxl, params, None, force_zeros=False)
    assert np.abs(generate(off, params).image - ref).max() <= 1e-5


def test_the_loader_reads_an_sdxl_folder(tiny_sdxl, tiny_model):
    assert (tiny_sdxl.family.name, tiny_model.family.name) == ("sdxl", "sd")
    assert set(tiny_sdxl.components) == {"text_encoder_2", "tokenizer_2"} and tiny_model.components == {}
    assert type(tiny_sdxl.components["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert tiny_sdxl.options["force_zeros_for_empty_prompt"] is True
    assert tiny_sdxl.default_size == (32, 32) and tiny_sdxl.size_multiple == 16
    prompt = families.of(tiny_sdxl).encode(tiny_sdxl, "a cat", "a dog", (32, 48))
    assert prompt.embeds.shape == (2, 77, 32)  # both encoders' penultimate states, 16 + 16 per position
    assert prompt.added is not None and prompt.added["text_embeds"].shape == (2, 16)
    assert prompt.added["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]] * 2  # (H, W), crop (0, 0), (H, W)
    assert prompt.token_ids == tiny_sdxl.tokenizer("a cat", padding="max_length", max_length=77).input_ids


def test_a_float16_sdxl_keeps_its_vae_in_float32_as_the_pipeline_decodes(tiny_sdxl_dir, tiny_dir):
    m = load_model(tiny_sdxl_dir, dtype=torch.float16)
    assert m.dtype == m.text_encoder.dtype == m.components["text_encoder_2"].dtype == torch.float16
    assert m.vae.dtype == torch.float32  # force_upcast: SDXL's VAE overflows in float16
    assert load_model(tiny_dir, dtype=torch.float16).vae.dtype == torch.float16  # SD's pipeline does not upcast


@pytest.mark.parametrize(("name", "message"), [
    ("KandinskyPipeline", "_class_name: 'KandinskyPipeline' is not a supported pipeline"),
    (None, "_class_name: missing"),
])
def test_an_unsupported_family_is_refused_naming_the_file_the_field_and_the_supported_ones(tiny_dir, tmp_path, name,
                                                                                           message):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))  # refused before weights
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = name
    if name is None:
        del index["_class_name"]
    (folder / "model_index.json").write_text(json.dumps(index))
    for load in (load_model, lambda f: describe("m", f)):
        with pytest.raises(ModelLoadError) as e:
            load(folder)
        assert str(e.value).startswith(f"{folder.resolve() / 'model_index.json'}: {message}")
        assert str(e.value).endswith("supported: StableDiffusionPipeline (sd), StableDiffusionXLPipeline (sdxl), "
                                     "StableDiffusion3Pipeline (sd3), FluxPipeline (flux)")


def test_an_sdxl_folder_without_its_second_tokenizer_is_refused(tiny_sdxl_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_sdxl_dir, folder)
    shutil.rmtree(folder / "tokenizer_2")
    for load in (load_model, lambda f: describe("m", f)):
        with pytest.raises(ModelLoadError, match="tokenizer_2"):
            load(folder)


def test_an_sdxl_unet_that_does_not_match_its_encoders_is_refused_naming_the_key(tiny_sdxl):
    te2 = SimpleNamespace(config=SimpleNamespace(projection_dim=8, hidden_size=16))
    other = dataclasses.replace(tiny_sdxl, components={**tiny_sdxl.components, "text_encoder_2": te2})
    with pytest.raises(ModelLoadError) as e:
        families.of(other).check(other)
    assert "unet/config.json: projection_class_embeddings_input_dim: got 40; expected 32" in str(e.value)


def test_the_catalog_describes_sdxl_as_the_loader_does(tiny_sdxl_dir, tiny_sdxl):
    entry = describe("xl", tiny_sdxl_dir)
    assert entry.family.name == "sdxl" and entry.cam_layers == camable_layers(tiny_sdxl.unet)
    assert entry.default_size == tiny_sdxl.default_size and entry.size_multiple == tiny_sdxl.size_multiple
    assert entry.max_prompt_tokens == 75 and entry.prompt_token_count(PROMPT) == 6
    # the attention maps' words: the first tokenizer's, on the front as on the worker
    assert prompt_tokens(entry.tokenizer, PROMPT) == prompt_tokens(tiny_sdxl.tokenizer, PROMPT)


def test_every_unet_call_of_every_explainer_carries_the_added_conditioning(tiny_sdxl):
    seen = []

    def record(_module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        seen.append((args[0].shape[0], {k: tuple(v.shape) for k, v in added.items()}))

    handle = tiny_sdxl.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run_explanation(tiny_sdxl, GenerationParams(PROMPT, seed=2, steps=2, guidance_scale=5.0),
                        ExplainOptions(rise=RiseOptions(num_masks=6, batch_size=4), cam=CamOptions(),
                                       attention=AttentionOptions()))
    finally:
        handle.remove()
    # per step: denoising (2), DF-RISE (8 + 4), DF-CAM (2, with gradients), attention maps (1, conditional branch)
    assert [n for n, _ in seen] == [2, 8, 4, 2, 1] * 2
    assert all(added == {"text_embeds": (n, 16), "time_ids": (n, 6)} for n, added in seen)


def test_sdxl_explanations_have_their_shapes_and_are_deterministic(tiny_sdxl):
    layers = camable_layers(tiny_sdxl.unet)
    assert "down_blocks.1.attentions.0" in layers and not any(p.startswith("down_blocks.0.attentions") for p in layers)
    explained_twice_alike(tiny_sdxl, 5.0, layers)


def test_sdxl_attention_records_every_transformer_layer_and_puts_the_processors_back(tiny_sdxl):
    state = first_state(tiny_sdxl)
    before = dict(tiny_sdxl.unet.attn_processors)
    embeds, added = state.cond.conditional()
    with torch.no_grad(), capture_cross_attention(tiny_sdxl.unet) as records:
        state.runner.eager(state.latent_in, state.t, embeds, added)
    # transformer_layers_per_block (1, 2): two transformer layers in down_blocks.1, the mid block and each of
    # up_blocks.0's two attentions, all at 8 x 8; 4 heads, 77 text positions
    assert len(records) == 8 and sum(".transformer_blocks.1.attn2" in k for k in records) == 4
    assert all(len(calls) == 1 and calls[0].shape == (1, 4, 64, 77) for calls in records.values())
    assert {k: id(p) for k, p in tiny_sdxl.unet.attn_processors.items()} == {k: id(p) for k, p in before.items()}
