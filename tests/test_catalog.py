"""The model catalog describes served models from their config files, without loading weights."""

from __future__ import annotations

import json
import shutil

import pytest

from difflens.catalog import ModelCatalog, describe
from difflens.config import ServiceSettings
from difflens.errors import InvalidArgument, ModelLoadError


def test_describe_matches_the_loaded_model(tiny_dir, tiny_model):
    from difflens.engine.cam import camable_layers

    entry = describe("tiny", tiny_dir)
    assert entry.size_multiple == tiny_model.size_multiple == 16
    assert entry.vae_scale_factor == tiny_model.vae_scale_factor
    assert entry.default_size == tiny_model.default_size == (32, 32)
    assert entry.cam_layers == camable_layers(tiny_model.unet)
    assert entry.num_train_timesteps == tiny_model.num_train_timesteps == 1000
    assert entry.defaults == tiny_model.defaults
    assert entry.max_prompt_tokens == 75 and entry.prompt_token_count("a red circle") == 3


def test_a_pixel_space_model_has_multiple_8_and_reads_difflens_json(tiny_dir, tmp_path):
    folder = tmp_path / "pixel"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))  # configs only
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "difflens.json").write_text(json.dumps({"steps": 25, "scheduler": "ddpm", "width": 24}))
    entry = describe("px", folder)
    assert (entry.vae_scale_factor, entry.size_multiple) == (1, 8)
    assert entry.default_size == (24, 16) and entry.defaults.steps == 25


def test_a_broken_folder_fails_naming_the_file(tiny_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as err:
        describe("b", folder)
    assert err.value.path.endswith("unet/config.json") and "malformed JSON" in err.value.problem
    with pytest.raises(ModelLoadError, match="missing"):
        describe("none", tmp_path / "nothing")


def test_catalog_default_and_unknown_names(tiny_dir):
    catalog = ModelCatalog.from_settings(ServiceSettings(models=(("b", str(tiny_dir)), ("a", str(tiny_dir)))))
    assert catalog.default == "b" and catalog.names() == ["b", "a"]  # no 'default' configured: the first
    assert catalog.get("").name == "b" and catalog.get("a").name == "a"
    with pytest.raises(InvalidArgument) as err:
        catalog.get("zzz")
    assert err.value.field == "model" and "available: b, a" in err.value.message
    named = ModelCatalog.from_settings(ServiceSettings(models=(("x", str(tiny_dir)), ("default", str(tiny_dir)))))
    assert named.default == "default"
