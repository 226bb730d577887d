"""Every explainer on FLUX's latents: DF-RISE (masked vs unmasked velocity, batched == one mask per call),
DF-CAM on the transformer's blocks (their image tokens folded back to the patch grid, then to the latent's), the
attention maps from the image-query x text-key part of the joint attention, per T5 word; every transformer call
carries the pooled text and the guidance; processors and hooks are put back."""

from __future__ import annotations

import json

import torch

from difflens.catalog import describe
from difflens.engine.cam import as_grid, camable_layers, capture_layers
from difflens.engine.explain import run_explanation
from difflens.engine.hooks import capture_joint_attention
from difflens.engine.model_config import cam_layer_paths
from difflens.engine.options import AttentionOptions, CamOptions, ExplainOptions, GenerationParams, RiseOptions
from difflens.engine.tokens import prompt_tokens
from tests.engine.family_steps import PROMPT, explained_twice_alike, first_state

LAYERS = ("transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1")


def test_the_cam_layers_are_the_transformer_blocks_on_the_front_as_on_the_worker(tiny_flux, tiny_flux_dir):
    assert camable_layers(tiny_flux.unet) == LAYERS
    config = json.loads((tiny_flux_dir / "transformer" / "config.json").read_text())
    assert cam_layer_paths(config) == LAYERS
    entry = describe("flux", tiny_flux_dir)
    assert entry.family.name == "flux" and entry.cam_layers == LAYERS


def test_df_cam_captures_the_image_tokens_of_every_block(tiny_flux):
    state = first_state(tiny_flux, 3.5)
    embeds, added = state.cond.conditional()
    with torch.no_grad(), capture_layers(tiny_flux.unet, LAYERS) as cap:
        state.runner.eager(state.latent_in, state.t, embeds, added)
    # 16 x 16 latent: 8 x 8 patch tokens of width 32, not the 512 text tokens the blocks also return
    assert all(cap.activations[p].shape == (1, 64, 32) for p in LAYERS)
    tokens = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3)
    grid = as_grid(tokens, (16, 16))
    assert grid.shape == (3, 8, 8) and grid[1, 2, 5] == tokens[2 * 8 + 5, 1]  # row-major, as flux.pack lays them


def test_flux_explanations_have_their_shapes_and_are_deterministic(tiny_flux):
    a = explained_twice_alike(tiny_flux, 3.5, LAYERS)
    for s in a.steps:
        assert all(s.maps[f"cam/{p}"].max() > 0 for p in LAYERS)
        assert s.maps["attn"].sum() > 0


def test_every_transformer_call_of_every_explainer_carries_the_pooled_text_and_the_guidance(tiny_flux):
    seen = []

    def record(_module, _args, kwargs):
        seen.append((kwargs["hidden_states"].shape[0], kwargs["pooled_projections"].shape,
                     kwargs["guidance"].tolist()))

    handle = tiny_flux.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        run_explanation(tiny_flux, GenerationParams(PROMPT, seed=2, steps=2, guidance_scale=4.0),
                        ExplainOptions(rise=RiseOptions(num_masks=6, batch_size=4), cam=CamOptions(),
                                       attention=AttentionOptions()))
    finally:
        handle.remove()
    # per step, one branch: denoising (1), DF-RISE (4 + 2 masks), DF-CAM (1, with gradients), attention maps (1)
    assert [n for n, _, _ in seen] == [1, 4, 2, 1, 1] * 2
    assert all(pooled == (n, 32) and guidance == [4.0] * n for n, pooled, guidance in seen)


def test_the_attention_maps_read_the_image_to_text_part_of_every_block_and_put_the_processors_back(tiny_flux):
    state = first_state(tiny_flux, 3.5)
    before = dict(tiny_flux.unet.attn_processors)
    embeds, added = state.cond.conditional()
    with torch.no_grad():
        plain = state.runner.eager(state.latent_in, state.t, embeds, added)
        with capture_joint_attention(tiny_flux.unet, embeds.shape[1]) as records:
            recorded = state.runner.eager(state.latent_in, state.t, embeds, added)
    assert torch.equal(plain, recorded)  # the recorders leave the blocks' outputs as they were
    assert set(records) == {f"{p}.attn.processor" for p in LAYERS}
    for calls in records.values():
        assert len(calls) == 1 and calls[0].shape == (1, 1, 64, 512)  # 8 x 8 image queries x 512 T5 keys
        text_mass = calls[0].sum(dim=-1)
        assert (text_mass > 0).all() and (text_mass < 1).all()  # the rest of each row went to image keys
    assert {k: id(p) for k, p in tiny_flux.unet.attn_processors.items()} == {k: id(p) for k, p in before.items()}


def test_the_words_are_t5_s_on_the_front_as_on_the_worker(tiny_flux, tiny_flux_dir):
    entry = describe("flux", tiny_flux_dir)
    assert prompt_tokens(entry.tokenizer, PROMPT) == prompt_tokens(tiny_flux.tokenizer, PROMPT)
    assert entry.max_prompt_tokens == 511  # T5's 512 less its end-of-sequence token (no BOS)
    assert entry.prompt_token_count(PROMPT) == 6
