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


@pytest.mark.parametrize(("content", "message"), [
    ({"steps": "25"}, "steps: got '25'; must be an integer"),
    ({"steps": 25.7}, "steps: got 25.7; must be an integer"),
    ({"steps": 0}, "steps: got 0; allowed range [1, 1000]"),
    ({"guidance_scale": "high"}, "guidance_scale: got 'high'; must be a number"),
    ({"guidance_scale": 80}, "guidance_scale: got 80; allowed range [0.0, 50.0]"),
    ({"guidance_scale": True}, "guidance_scale: got True"),
    ({"scheduler": "foo"}, "scheduler: got 'foo'; allowed: ddim, "),
    ({"width": 33}, "width: got 33; must be a positive multiple of "),
    ({"height": -8}, "height: got -8; must be a positive multiple of "),
    ([], "expected a JSON object, got list"),
    ({"guidance": 2.0}, "unknown key(s) 'guidance'; allowed: steps, guidance_scale, scheduler, width, height, "
                        "max_side"),
    ({"max_side": "big"}, "max_side: got 'big'; must be an integer"),
    ({"width": 64, "max_side": 32}, "max_side: got 32; must be at least 64"),
    ({"max_side": 16}, "max_side: got 16; must be at least 32"),  # below the UNet's own 32 px, width left unset
])
def test_a_bad_defaults_file_stops_the_model_at_load_naming_the_file_and_field(tiny_dir, tmp_path, content, message):
    """Not every later request that leaves the field unset (a TypeError, or an error naming the caller's field)."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))  # configs only
    (folder / "difflens.json").write_text(json.dumps(content))
    with pytest.raises(ModelLoadError) as err:
        describe("m", folder)
    assert str(err.value).startswith(f"{folder.resolve() / 'difflens.json'}: malformed defaults file: ")
    assert message in str(err.value)


def test_a_model_s_own_max_side_caps_requests_below_the_deployment_s(tiny_dir, tmp_path):
    """A model trained at 32 px was served up to the deployment's 1024, where one step takes hours on a CPU and a
    cancel waits for the step to end."""
    from difflens.config import Limits
    from difflens.engine.options import GenerationParams
    from difflens.jobs import JobSpec
    from difflens.validation import validate

    folder = tmp_path / "capped"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "difflens.json").write_text(json.dumps({"max_side": 64}))
    catalog = ModelCatalog({"m": describe("m", folder)}, "m")
    validate(JobSpec(model="m", params=GenerationParams("x", width=64, height=32)), catalog, Limits())
    with pytest.raises(InvalidArgument) as err:
        validate(JobSpec(model="m", params=GenerationParams("x", width=32, height=72)), catalog, Limits())
    assert (err.value.field, err.value.message) == (
        "height", "got 72; allowed range [16, 64] (this model's max_side, in its difflens.json)")
    with pytest.raises(InvalidArgument) as err:  # the deployment's limit, where it is the smaller one
        validate(JobSpec(model="m", params=GenerationParams("x", width=64)), catalog, Limits(max_side=48))
    assert (err.value.field, err.value.message) == ("width", "got 64; allowed range [16, 48]")
    from difflens.api.convert import model_to_pb

    assert model_to_pb(catalog.get("m"), is_default=True, limits=Limits()).max_side == 64
    assert model_to_pb(catalog.get("m"), is_default=True, limits=Limits(max_side=48)).max_side == 48


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
