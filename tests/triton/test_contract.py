"""The start-up check of a Triton model's config against what difflens sends, on config documents shaped as
Triton's get_model_config(as_json=True) returns them (dims as strings): every difference names the field."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from difflens.errors import InvalidArgument
from difflens.triton import contract
from difflens.triton.client import check_config

UNET = SimpleNamespace(in_channels=4, out_channels=4, cross_attention_dim=32)


def served(dtype: str = "float32", max_batch: int = 8) -> dict:
    """The config `difflens triton-serve` declares for the tiny model (as checked against a real server in
    test_server.py)."""
    inputs, outputs = contract.unet_tensors(dtype, 4, 4, 32)

    def tensors(specs):
        return [{"name": t.name, "data_type": t.data_type, "dims": [str(d) for d in t.dims]} for t in specs]

    return {"name": "sd", "max_batch_size": max_batch, "input": tensors(inputs), "output": tensors(outputs)}


def refused(config: dict, dtype: str = "float32") -> str:
    with pytest.raises(InvalidArgument) as e:
        check_config("sd", config, dtype, UNET)
    assert e.value.field == "triton_models" and e.value.message.startswith("sd: ")
    return e.value.message


def test_the_served_contract_passes_and_gives_the_batch_limit():
    got = check_config("sd", served(max_batch=8), "float32", UNET)
    assert got.max_batch == 8 and got.dims[contract.SAMPLE] == (4, -1, -1)
    assert check_config("sd", served("float16"), "float16", UNET).max_batch == 8


def test_an_element_type_unlike_the_dtype_names_input_and_both_types():
    assert refused(served("float16")) == ("sd: input 'sample' is TYPE_FP16 on the server, difflens sends TYPE_FP32 "
                                          "(dtype float32)")
    config = served()
    config["input"][1]["data_type"] = "TYPE_INT64"
    assert "input 'timestep' is TYPE_INT64 on the server, difflens sends TYPE_FP32 (timesteps as float32)" \
        in refused(config)


def test_channels_and_rank_must_agree_with_the_unet_config():
    config = served()
    config["input"][0]["dims"] = ["9", "-1", "-1"]  # an inpainting UNet's 9 input channels
    assert "input 'sample' has dims [9, -1, -1] on the server, difflens sends [4, -1, -1]" in refused(config)
    config = served()
    config["input"][2]["dims"] = ["77", "768"]
    assert "input 'encoder_hidden_states' has dims [77, 768]" in refused(config)
    config = served()
    config["output"][0]["dims"] = ["4", "-1"]
    assert "output 'noise_pred' has dims [4, -1] on the server, difflens expects [4, -1, -1]" in refused(config)


def test_fixed_sizes_are_accepted_where_difflens_leaves_them_free():
    config = served()
    config["input"][0]["dims"] = ["4", "64", "64"]  # an engine built for one resolution
    config["input"][2]["dims"] = ["77", "32"]
    assert check_config("sd", config, "float32", UNET).dims[contract.ENCODER_HIDDEN_STATES] == (77, 32)


def test_missing_and_extra_tensors():
    config = served()
    config["output"][0]["name"] = "out_sample"
    assert refused(config) == ("sd: the server's model has no output 'noise_pred' (it declares 'out_sample'); "
                               "difflens expects 'noise_pred'")
    config = served()
    config["input"].append({"name": "guidance", "data_type": "TYPE_FP32", "dims": ["1"]})
    assert "also requires input 'guidance', which difflens does not send" in refused(config)
    config["input"][-1]["optional"] = True
    check_config("sd", config, "float32", UNET)  # an optional input left out is fine


def test_without_batching_the_batch_dimension_must_be_free():
    config = served(max_batch=0)
    for t in config["input"] + config["output"]:
        t["dims"] = ["-1", *t["dims"]]
    assert check_config("sd", copy.deepcopy(config), "float32", UNET).max_batch == 0  # 0: one call, any size
    config["input"][0]["dims"][0] = "2"
    assert "batch dimension first" in refused(config)
