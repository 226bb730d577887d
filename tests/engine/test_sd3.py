"""Stable Diffusion 3 (SD3Transformer2DModel, flow matching): the loader reads a StableDiffusion3Pipeline folder
with or without T5; the sampler's image equals the pipeline's; DF-RISE, DF-CAM on the joint blocks (image tokens
folded back to the latent grid) and the joint attention's text part run on it with their shapes, deterministic."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from difflens.catalog import describe
from difflens.engine import families
from difflens.engine.attention import capture_text_attention
from difflens.engine.cam import camable_layers
from difflens.engine.loading import load_model
from difflens.engine.model_config import cam_layer_paths, read_json_object
from difflens.engine.options import GenerationParams
from difflens.engine.sampler import generate, make_scheduler
from difflens.engine.tiny_sd3 import write_tiny_sd3
from difflens.engine.tokens import prompt_tokens
from difflens.errors import ModelLoadError
from tests.engine.family_steps import PROMPT, explained_twice_alike, first_state


@pytest.fixture
def sd3_dir(tiny_sd3_dir):
    return tiny_sd3_dir


@pytest.fixture(scope="module")
def sd3_no_t5_dir(tmp_path_factory):
    return write_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3-no-t5", t5=False)


@pytest.fixture
def sd3(tiny_sd3):
    return tiny_sd3


@pytest.fixture(scope="module")
def sd3_no_t5(sd3_no_t5_dir):
    return load_model(sd3_no_t5_dir)


def pipeline_image(model, params, negative):
    from diffusers import StableDiffusion3Pipeline

    c = model.components
    pipe = StableDiffusion3Pipeline(
        transformer=model.unet, scheduler=make_scheduler(model, "euler"), vae=model.vae,
        text_encoder=model.text_encoder, tokenizer=model.tokenizer, text_encoder_2=c["text_encoder_2"],
        tokenizer_2=c["tokenizer_2"], text_encoder_3=c.get("text_encoder_3"), tokenizer_3=c.get("tokenizer_3"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(params.prompt, negative_prompt=negative, num_inference_steps=params.steps,
               guidance_scale=params.guidance_scale, generator=torch.Generator().manual_seed(params.seed),
               output_type="np", height=32, width=32)
    return out.images[0]


@pytest.mark.parametrize("t5", [True, False])
@pytest.mark.parametrize(("negative", "guidance"), [("", 5.0), ("blue", 5.0), ("", 1.0)])
def test_sd3_loop_equals_the_sd3_pipeline(sd3, sd3_no_t5, t5, negative, guidance):
    model = sd3 if t5 else sd3_no_t5
    params = GenerationParams(PROMPT, negative_prompt=negative, seed=3, steps=4, guidance_scale=guidance,
                              scheduler="euler")
    ours = generate(model, params).image
    ref = pipeline_image(model, params, negative or None)
    assert ours.shape == ref.shape == (32, 32, 3)
    assert np.abs(ours - ref).max() <= 1e-5


def test_the_loader_reads_an_sd3_folder_with_and_without_t5(sd3, sd3_no_t5, sd3_no_t5_dir):
    assert sd3.family.name == sd3_no_t5.family.name == "sd3"
    assert type(sd3.unet).__name__ == "SD3Transformer2DModel"
    assert set(sd3.components) == {"text_encoder_2", "text_encoder_3", "tokenizer_2", "tokenizer_3"}
    assert type(sd3.components["tokenizer_3"]).__name__.startswith("T5Tokenizer")  # transformers 5: one class
    assert set(sd3_no_t5.components) == {"text_encoder_2", "tokenizer_2"}
    assert read_json_object(sd3_no_t5_dir / "model_index.json")["text_encoder_3"] == [None, None]
    assert sd3.default_size == (32, 32) and sd3.defaults.scheduler == "euler"
    for model in (sd3, sd3_no_t5):
        prompt = families.of(model).encode(model, "a cat", "a dog", (32, 32))
        assert prompt.embeds.shape == (2, 77 + 256, 32)  # CLIPs' 16 + 8 padded to T5's 32; T5's 256 after
        assert torch.equal(prompt.embeds[:, :77, 24:], torch.zeros(2, 77, 8))
        assert prompt.added is not None and prompt.added["pooled_projections"].shape == (2, 32)
        assert prompt.token_ids == model.tokenizer("a cat", padding="max_length", max_length=77).input_ids
    without = families.of(sd3_no_t5).encode(sd3_no_t5, "a cat", "", (32, 32)).embeds
    assert torch.equal(without[:, 77:], torch.zeros(2, 256, 32))  # no T5: zeros, as the pipeline
    with_t5 = families.of(sd3).encode(sd3, "a cat", "", (32, 32)).embeds
    assert with_t5[:, 77:].abs().sum() > 0


def test_an_sd3_transformer_that_does_not_match_its_encoders_is_refused_naming_the_key(sd3):
    te2 = SimpleNamespace(config=SimpleNamespace(projection_dim=8, hidden_size=8))
    other = dataclasses.replace(sd3, components={**sd3.components, "text_encoder_2": te2})
    with pytest.raises(ModelLoadError) as e:
        families.of(other).check(other)
    assert "transformer/config.json: pooled_projection_dim: got 32; expected 24" in str(e.value)
    t5 = SimpleNamespace(config=SimpleNamespace(d_model=64))
    other = dataclasses.replace(sd3, components={**sd3.components, "text_encoder_3": t5})
    with pytest.raises(ModelLoadError, match="joint_attention_dim: got 32; expected 64"):
        families.of(other).check(other)


def test_the_catalog_describes_sd3_as_the_loader_does(sd3_dir, sd3, sd3_no_t5_dir):
    for folder in (sd3_dir, sd3_no_t5_dir):
        entry = describe("sd3", folder)
        assert entry.family.name == "sd3" and entry.cam_layers == camable_layers(sd3.unet)
        assert entry.default_size == sd3.default_size and entry.size_multiple == sd3.size_multiple
        assert entry.max_prompt_tokens == 75 and entry.prompt_token_count(PROMPT) == 6  # CLIP's: the maps' words
        assert prompt_tokens(entry.tokenizer, PROMPT) == prompt_tokens(sd3.tokenizer, PROMPT)
    assert cam_layer_paths(read_json_object(sd3_dir / "transformer" / "config.json")) == \
        ("transformer_blocks.0", "transformer_blocks.1")


def test_sd3_explanations_have_their_shapes_and_are_deterministic(sd3):
    layers = camable_layers(sd3.unet)
    assert layers == ("transformer_blocks.0", "transformer_blocks.1")
    a = explained_twice_alike(sd3, 5.0, layers)
    assert all(s.maps["cam"].abs().sum() > 0 and s.maps["attn"].abs().sum() > 0 for s in a.steps)


def test_sd3_cam_folds_each_blocks_image_tokens_back_to_the_patch_grid(sd3):
    from difflens.engine.cam import as_grid, capture_layers

    state = first_state(sd3)
    embeds, added = state.cond.conditional()
    with torch.no_grad(), capture_layers(sd3.unet, camable_layers(sd3.unet)) as cap:
        state.runner.eager(state.latent_in, state.t, embeds, added)
    for path, tokens in cap.activations.items():
        assert tokens.shape == (1, 64, 16), path  # 8 x 8 patches of the 16 x 16 latent, width 16
        grid = as_grid(tokens[0], (16, 16))
        assert grid.shape == (16, 8, 8)
        # row-major: token r * 8 + c is patch (r, c), as PatchEmbed flattens it
        assert torch.equal(grid[:, 2, 5], tokens[0, 2 * 8 + 5])


def test_sd3_attention_keeps_the_image_to_text_part_of_the_joint_softmax_and_puts_the_processors_back(sd3):
    state = first_state(sd3)
    before = {k: id(p) for k, p in sd3.unet.attn_processors.items()}
    embeds, added = state.cond.conditional()
    with torch.no_grad(), capture_text_attention(sd3.unet, int(embeds.shape[1])) as records:
        out = state.runner.eager(state.latent_in, state.t, embeds, added)
    assert torch.equal(out, state.runner.eager(state.latent_in, state.t, embeds, added))  # outputs untouched
    assert sorted(records) == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
    for calls in records.values():
        (p,) = calls
        assert p.shape == (1, 1, 64, 77 + 256)
        # the softmax runs over image and text keys: the text's share of each query's mass is below one
        share = p.sum(dim=-1)
        assert (share > 0).all() and (share < 1).all()
    assert {k: id(p) for k, p in sd3.unet.attn_processors.items()} == before


def test_sd35_blocks_record_their_joint_attention_only_with_qk_norm():
    """SD3.5's layout: RMS-normed q and k (qk_norm) and a second, image-only attention (attn2) in the dual blocks;
    only the joint attentions are recorded, and a recorder's probabilities agree with the processor's own
    attention: with the values replaced by the identity, the block's attention output is the probabilities."""
    from diffusers import SD3Transformer2DModel

    from difflens.engine.sd3 import capture_joint_text_attention, text_probs

    torch.manual_seed(0)
    t = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                              caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8,
                              qk_norm="rms_norm", dual_attention_layers=(0,)).eval()
    assert any(k.endswith(".attn2.processor") for k in t.attn_processors)
    before = {k: id(p) for k, p in t.attn_processors.items()}
    with torch.no_grad(), capture_joint_text_attention(t) as records:
        t(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([500.0]),
          encoder_hidden_states=torch.randn(1, 5, 32), pooled_projections=torch.randn(1, 32), return_dict=False)
    assert sorted(records) == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
    assert all(calls[0].shape == (1, 1, 16, 5) for calls in records.values())
    assert {k: id(p) for k, p in t.attn_processors.items()} == before

    attn = t.transformer_blocks[0].attn
    image, text = torch.randn(1, 16, 16), torch.randn(1, 5, 16)
    heads, d = attn.heads, 16 // attn.heads
    q = attn.norm_q(attn.to_q(image).view(1, -1, heads, d).transpose(1, 2))
    k = torch.cat([attn.norm_k(attn.to_k(image).view(1, -1, heads, d).transpose(1, 2)),
                   attn.norm_added_k(attn.add_k_proj(text).view(1, -1, heads, d).transpose(1, 2))], dim=2)
    eye = torch.eye(21).expand(1, heads, 21, 21)  # values = identity: SDPA's output is its probabilities
    probs = torch.nn.functional.scaled_dot_product_attention(q, k, eye).mean(dim=1)  # (1, 16, 21)
    with torch.no_grad():
        torch.testing.assert_close(text_probs(attn, image, text)[:, 0], probs[..., 16:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_sd3_model_loads_in_the_dtype_asked_for(sd3_dir, dtype):
    m = load_model(sd3_dir, dtype=dtype)
    modules = (m.unet, m.vae, m.text_encoder, m.components["text_encoder_2"])
    assert {p.dtype for module in modules for p in module.parameters()} == {dtype}  # one copy, in that dtype
    t5 = m.components["text_encoder_3"]  # transformers keeps T5's feed-forward output (`wo`) in float32 on purpose
    assert {p.dtype for n, p in t5.named_parameters() if not n.endswith(".wo.weight")} == {dtype}
    assert np.isfinite(generate(m, GenerationParams(PROMPT, steps=2, guidance_scale=5.0)).image).all()
