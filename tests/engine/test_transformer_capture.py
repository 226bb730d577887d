"""Capture on a transformer denoiser (FluxTransformer2DModel, built here at toy widths): DF-CAM's layers are its
blocks, in forward order, the same from the config alone; a block's image tokens are captured, not its text
tokens, and fold back to the row-major patch grid; the joint-attention recorders leave every block's output as it
was, keep the image-query x text-key probabilities and put the processors back."""

from __future__ import annotations

import json

import pytest
import torch

from difflens.engine import flux
from difflens.engine.cam import as_grid, camable_layers, capture_layers, token_grid
from difflens.engine.hooks import capture_joint_attention
from difflens.engine.model_config import cam_layer_paths
from difflens.errors import HookError

LAYERS = ("transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1")


@pytest.fixture(scope="module")
def transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True,
                                  axes_dims_rope=(4, 6, 6)).eval().requires_grad_(False)


def call(transformer, latents):
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(latents.shape[0], 12, 32, generator=g)
    added = {"pooled_projections": torch.randn(latents.shape[0], 32, generator=g),
             "guidance": torch.full((latents.shape[0],), 3.5)}
    return flux.flux_call(transformer, latents, 500.0, embeds, added)


def test_the_cam_layers_are_the_blocks_from_the_module_and_from_the_config(transformer):
    assert camable_layers(transformer) == LAYERS
    assert cam_layer_paths(json.loads(json.dumps(transformer.config))) == LAYERS
    with pytest.raises(ValueError, match="num_single_layers: got -1"):
        cam_layer_paths({"num_layers": 1, "num_single_layers": -1})


def test_a_block_s_image_tokens_are_captured_and_fold_back_to_the_patch_grid(transformer):
    x = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_layers(transformer, LAYERS) as cap:
        call(transformer, x)
    # 4 x 6 patches of width 32; the 12 text tokens every block also returns are not what is captured
    assert all(cap.activations[p].shape == (1, 24, 32) for p in LAYERS)
    assert token_grid(24, (8, 12)) == (4, 6)
    tokens = torch.arange(24 * 3, dtype=torch.float32).reshape(24, 3)
    grid = as_grid(tokens, (8, 12))
    assert grid.shape == (3, 4, 6) and grid[2, 1, 5] == tokens[1 * 6 + 5, 2]  # row-major, as flux.pack lays them


def test_the_joint_attention_recorders_change_no_output_and_put_the_processors_back(transformer):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    before = dict(transformer.attn_processors)
    with torch.no_grad():
        plain = call(transformer, x)
        with capture_joint_attention(transformer, 12) as records:
            recorded = call(transformer, x)
            with pytest.raises(HookError):
                with capture_joint_attention(transformer, 12):
                    pass
    assert torch.equal(plain, recorded)
    assert set(records) == {f"{p}.attn.processor" for p in LAYERS}
    for calls in records.values():
        assert len(calls) == 1 and calls[0].shape == (1, 1, 16, 12)  # 4 x 4 image queries x 12 text keys
        mass = calls[0].sum(dim=-1)
        assert (mass > 0).all() and (mass < 1).all()  # the rest of each row went to the image's own keys
    assert {k: id(p) for k, p in transformer.attn_processors.items()} == {k: id(p) for k, p in before.items()}
