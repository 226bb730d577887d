from __future__ import annotations

import json
import shutil

import pytest
import torch

from difflens.engine.loading import load_model
from difflens.errors import ModelLoadError


@pytest.fixture
def copy_of(tiny_dir, tmp_path):
    def make():
        dst = tmp_path / "model"
        shutil.copytree(tiny_dir, dst)
        return dst
    return make


def test_loads_every_component_offline(tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = load_model(tiny_dir)
    assert m.vae is not None and m.vae_scale_factor == 2
    assert m.size_multiple == 16 and m.default_size == (32, 32)
    assert type(m.scheduler).__name__ == "DDIMScheduler"
    assert not any(p.requires_grad for p in m.unet.parameters())
    assert m.dtype == torch.float32


def test_device_and_dtype_follow_the_unet(tiny_dir):
    m = load_model(tiny_dir, dtype=torch.float64)
    assert (m.device, m.dtype) == (m.unet.device, m.unet.dtype) == (torch.device("cpu"), torch.float64)
    m.unet.to(torch.float32)
    assert m.dtype == torch.float32


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "does not exist" in str(e.value)


def test_folder_without_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(tmp_path)


def test_malformed_index(copy_of):
    d = copy_of()
    (d / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="malformed JSON"):
        load_model(d)


def test_missing_component_folder(copy_of):
    d = copy_of()
    shutil.rmtree(d / "text_encoder")
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert "text_encoder" in str(e.value) and "missing" in str(e.value)


def test_undeclared_required_component(copy_of):
    d = copy_of()
    idx = json.loads((d / "model_index.json").read_text())
    idx["unet"] = [None, None]
    (d / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(ModelLoadError, match="'unet' is not declared"):
        load_model(d)


def test_pickle_only_weights_are_refused(copy_of):
    d = copy_of()
    st = d / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(st), d / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert "pickle" in str(e.value) and "diffusion_pytorch_model.bin" in str(e.value)
    assert str(d / "unet") in str(e.value)


def test_malformed_component_config(copy_of):
    d = copy_of()
    (d / "unet" / "config.json").write_text('{"block_out_channels": "oops"')
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    assert "unet" in str(e.value)


def test_pixel_space_model_without_vae(copy_of):
    """A model_index with vae [null, null] loads with vae None and a VAE factor of 1."""
    d = copy_of()
    idx = json.loads((d / "model_index.json").read_text())
    idx["vae"] = [None, None]
    (d / "model_index.json").write_text(json.dumps(idx))
    shutil.rmtree(d / "vae")
    m = load_model(d)
    assert m.vae is None and m.vae_scale_factor == 1 and m.size_multiple == 8


def test_defaults_file_is_read(copy_of):
    d = copy_of()
    (d / "difflens.json").write_text(json.dumps({"steps": 12, "guidance_scale": 1.5, "scheduler": "euler"}))
    m = load_model(d)
    assert (m.defaults.steps, m.defaults.guidance_scale, m.defaults.scheduler) == (12, 1.5, "euler")
    (d / "difflens.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="defaults"):
        load_model(d)


def test_word_tokenizer_gives_one_token_per_word(tmp_path):
    from transformers import CLIPTokenizer

    from difflens.engine.tiny import BASE_WORDS, write_word_tokenizer

    words = list(BASE_WORDS) + ["stripes", "strip", "tristan"]
    write_word_tokenizer(tmp_path, words)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for w in words:
        assert tok.tokenize(w) == [w + "</w>"], w
    assert len(tok.tokenize("zebra")) > 1  # unknown words still tokenize, in pieces
