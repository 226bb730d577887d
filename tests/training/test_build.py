from __future__ import annotations

import json

import pytest

from difflens.training.build import ARCHS, ArchConfig, build_components, count_parameters, resolve_arch


def test_proposed_architecture_fits_the_size_budget(tmp_path):
    c = build_components(ARCHS["deep4"], tmp_path / "tok")
    n = count_parameters(c["unet"], c["text_encoder"])
    assert n * 4 < 25 * 2**20  # float32 safetensors must stay under the 25 MB the repository allows
    unet = c["unet"]
    assert len(unet.config.block_out_channels) == 4  # down to 4 x 4 at 32 px
    assert unet.config.cross_attention_dim == c["text_encoder"].config.hidden_size == 64
    assert unet.config.in_channels == unet.config.out_channels == 3
    assert c["tokenizer"].model_max_length == c["text_encoder"].config.max_position_embeddings


def test_cross_attention_only_where_configured(tmp_path):
    arch = ArchConfig(block_out_channels=(8, 16, 16), cross_levels=(False, False, True), norm_num_groups=4)
    unet = build_components(arch, tmp_path / "tok")["unet"]
    assert unet.config.down_block_types == ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
    assert unet.config.up_block_types == ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")


def test_arch_from_a_json_file(tmp_path):
    f = tmp_path / "arch.json"
    f.write_text(json.dumps({"block_out_channels": [16, 32], "cross_levels": [False, True]}))
    assert resolve_arch(str(f)).block_out_channels == (16, 32)
    f.write_text(json.dumps({"channels": [16]}))
    with pytest.raises(ValueError, match="unknown arch fields: channels"):
        resolve_arch(str(f))
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_arch("nope")


def test_inconsistent_arch_is_refused():
    with pytest.raises(ValueError, match="one flag per entry"):
        ArchConfig(block_out_channels=(8, 16), cross_levels=(True,))
    with pytest.raises(ValueError, match="does not halve"):
        ArchConfig(sample_size=20, block_out_channels=(8, 16, 16, 16), cross_levels=(False,) * 4)
