"""DF-CAM's layer paths derived from a UNet's config.json (what the torch-free front validates against) equal the
paths of the UNet diffusers builds from that config, for every block type the derivation supports."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from difflens.config import SHIPPED_MODEL
from difflens.engine.cam import camable_layers
from difflens.engine.model_config import cam_layer_paths

SMALL = {"block_out_channels": (8, 16, 16), "cross_attention_dim": 8, "attention_head_dim": 2, "norm_num_groups": 4}
CONFIGS = {
    "sd-like": {**SMALL, "layers_per_block": 2,
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")},
    "sdxl-like": {**SMALL, "layers_per_block": 2, "transformer_layers_per_block": (1, 2, 3),
                  "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
                  "projection_class_embeddings_input_dim": 32, "use_linear_projection": True},
    "per-block layers": {**SMALL, "layers_per_block": (1, 3, 2),
                         "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                         "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")},
    "simple cross-attention": {**SMALL, "layers_per_block": 1, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
                               "down_block_types": ("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D",
                                                    "SimpleCrossAttnDownBlock2D"),
                               "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D",
                                                  "SimpleCrossAttnUpBlock2D")},
    "self-attention, plain mid": {**SMALL, "layers_per_block": 1, "mid_block_type": "UNetMidBlock2D",
                                  "down_block_types": ("AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                                  "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D")},
    "no mid block": {**SMALL, "layers_per_block": 1, "mid_block_type": None,
                     "down_block_types": ("DownBlock2D",) * 3, "up_block_types": ("UpBlock2D",) * 3},
    "one level": {**SMALL, "block_out_channels": (8,), "layers_per_block": 1,
                  "down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",)},
}


def built_paths(config: dict) -> tuple[str, ...]:
    with torch.device("meta"):
        return camable_layers(UNet2DConditionModel.from_config(config))


@pytest.mark.parametrize("name", CONFIGS)
def test_paths_from_the_config_equal_the_built_unets(name):
    # through JSON, as the front reads config.json: tuples become lists
    config = json.loads(json.dumps(UNet2DConditionModel.from_config(CONFIGS[name]).config))
    assert cam_layer_paths(config) == built_paths(config)


def test_the_shipped_and_tiny_models(tiny_dir, tiny_sdxl_dir):
    for folder in (SHIPPED_MODEL, tiny_dir, tiny_sdxl_dir):
        config = json.loads((folder / "unet" / "config.json").read_text())
        assert cam_layer_paths(config) == built_paths(config)


@pytest.mark.parametrize(("change", "message"), [
    ({"down_block_types": ["KDownBlock2D", "DownBlock2D", "DownBlock2D"]}, "down_block_types[0]: 'KDownBlock2D'"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D"]}, "got 3 and 2 blocks"),
    ({"mid_block_type": "UNetMidBlockFlat"}, "mid_block_type: 'UNetMidBlockFlat' is not supported"),
    ({"layers_per_block": [1, 2]}, "layers_per_block: got [1, 2]; expected an integer >= 1 or a list of 3"),
    ({"layers_per_block": 0}, "layers_per_block: got 0"),
])
def test_a_config_it_cannot_follow_is_refused_naming_the_key(change, message):
    config = {**json.loads(json.dumps(CONFIGS["sd-like"])), **change}
    with pytest.raises(ValueError) as e:
        cam_layer_paths(config)
    assert message in str(e.value)


@pytest.mark.parametrize(("pipeline", "guidance_embeds", "steps", "guidance"), [
    ("StableDiffusionPipeline", None, 50, 7.5),
    ("StableDiffusionXLPipeline", None, 50, 5.0),
    ("StableDiffusion3Pipeline", None, 28, 7.0),
    ("FluxPipeline", True, 28, 3.5),
    ("FluxPipeline", False, 4, 3.5),  # schnell: no guidance input, so its scale is never used
    ("NoSuchPipeline", None, 50, 7.5),  # the loader refuses it; the defaults do not guess
])
def test_a_folder_without_difflens_json_samples_as_its_family_s_pipeline(tmp_path, pipeline, guidance_embeds, steps,
                                                                         guidance):
    from difflens.engine.model_config import ModelDefaults

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    if guidance_embeds is not None:
        (tmp_path / "transformer").mkdir()
        (tmp_path / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": guidance_embeds}))
    d = ModelDefaults.read(tmp_path)
    assert (d.steps, d.guidance_scale) == (steps, guidance)
    (tmp_path / "difflens.json").write_text(json.dumps({"steps": 9, "guidance_scale": 2.0}))
    d = ModelDefaults.read(tmp_path)
    assert (d.steps, d.guidance_scale) == (9, 2.0)  # the folder's own file wins
