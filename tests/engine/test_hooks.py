from __future__ import annotations

import pytest
import torch
from torch import nn

from difflens.engine.hooks import (
    CrossAttentionRecorder,
    capture_cross_attention,
    capture_outputs,
    first_tensor,
)
from difflens.errors import HookError

RESNET, ATTN = "down_blocks.0.resnets.0", "down_blocks.0.attentions.0"


def forward_hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    emb = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor(500), emb


def test_captured_gradient_is_the_gradient_of_the_module_output():
    """y = sum(W2 (W1 x)): dy/d(output of layer 0) = W2^T 1, the same for every row."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).requires_grad_(False)
    x = torch.randn(5, 3, requires_grad=True)
    with capture_outputs(net, ["0", "1"]) as cap:
        net(x).sum().backward()
    assert torch.allclose(cap.activations["0"], net[0](x).detach())
    expected = net[1].weight.sum(0).expand(5, 4)
    assert torch.allclose(cap.gradients["0"], expected)
    assert torch.equal(cap.gradients["1"], torch.ones(5, 2))


def test_unet_outputs_and_gradients_are_captured_and_hooks_removed(tiny_model):
    unet = tiny_model.unet
    before = forward_hook_count(unet)
    x, t, emb = unet_inputs(unet)
    x.requires_grad_(True)
    seen: dict[str, torch.Tensor] = {}

    def spy_hook(_module, _inputs, output) -> None:
        seen["out"] = output[0]

    spy = unet.get_submodule(ATTN).register_forward_hook(spy_hook)
    try:
        with capture_outputs(unet, [RESNET, ATTN]) as cap:
            unet(x, t, encoder_hidden_states=emb, return_dict=False)[0].sum().backward()
    finally:
        spy.remove()
    # Transformer2DModel returns a tuple: its first tensor is what is captured.
    assert cap.activations[ATTN].shape == cap.gradients[ATTN].shape == (2, 8, 16, 16)
    assert cap.activations[RESNET].shape == cap.gradients[RESNET].shape == (2, 8, 16, 16)
    assert torch.equal(cap.activations[ATTN], seen["out"].detach())
    assert cap.gradients[ATTN].abs().sum() > 0
    assert forward_hook_count(unet) == before == 0
    assert not seen["out"]._backward_hooks  # the tensor gradient hook is gone too


def test_hooks_removed_when_the_body_raises_and_the_error_propagates(tiny_model):
    unet = tiny_model.unet
    with pytest.raises(ZeroDivisionError):
        with capture_outputs(unet, [RESNET, ATTN]):
            unet(*unet_inputs(unet)[:2], encoder_hidden_states=unet_inputs(unet)[2])
            _ = 1 / 0
    assert forward_hook_count(unet) == 0
    with capture_outputs(unet, [RESNET]):  # released: capturing again works
        pass


def test_double_hooking_raises_and_the_outer_capture_still_cleans_up(tiny_model):
    unet = tiny_model.unet
    with capture_outputs(unet, [RESNET, ATTN]):
        with pytest.raises(HookError, match="already being captured: down_blocks.0.attentions.0"):
            with capture_outputs(unet, ["up_blocks.0.resnets.0", ATTN]):
                pass
        assert forward_hook_count(unet) == 2  # the outer capture's hooks, untouched by the failed inner one
    assert forward_hook_count(unet) == 0


def test_a_module_running_twice_in_one_capture_raises():
    net = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(HookError, match="ran twice"):
        with capture_outputs(net, ["0"]):
            net(net(torch.ones(1, 3)))
    assert forward_hook_count(net) == 0


def test_first_tensor_of_outputs():
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    a = torch.ones(2)
    assert first_tensor(a) is a
    assert first_tensor((None, a, torch.zeros(1))) is a
    assert first_tensor(Transformer2DModelOutput(sample=a)) is a
    with pytest.raises(HookError):
        first_tensor((1, 2))


def test_processors_swapped_for_cross_attention_only_and_restored_by_identity(tiny_model):
    unet = tiny_model.unet
    before = dict(unet.attn_processors)
    with capture_cross_attention(unet):
        during = unet.attn_processors
        for key, proc in during.items():
            if key.endswith("attn2.processor"):
                assert isinstance(proc, CrossAttentionRecorder)
            else:
                assert proc is before[key]
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


def test_processors_restored_after_an_exception_and_nesting_raises(tiny_model):
    unet = tiny_model.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_cross_attention(unet):
            with pytest.raises(HookError):
                with capture_cross_attention(unet):
                    pass
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is p for k, p in before.items())
    with capture_cross_attention(unet):  # released
        pass


def test_recorder_output_equals_the_original_and_probabilities_sum_to_one(tiny_model):
    unet = tiny_model.unet
    x, t, emb = unet_inputs(unet, batch=2, seed=3)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
        with capture_cross_attention(unet) as records:
            got = unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]
    assert torch.allclose(got, ref, atol=1e-5)
    cross = [k for k in unet.attn_processors if k.endswith("attn2.processor")]
    assert sorted(records) == sorted(cross) and len(cross) == 4
    pixels = {16 * 16, 8 * 8}
    for calls in records.values():
        assert len(calls) == 1
        probs = calls[0]
        assert probs.shape[0] == 2 and probs.shape[1] == 4 and probs.shape[3] == 77  # (B, heads, N, S)
        assert probs.shape[2] in pixels
        assert (probs >= 0).all()
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:3]), atol=1e-5)


def test_recorder_matches_the_sdpa_processor_on_one_layer(tiny_model):
    """Layer level: same output as the layer's own (scaled-dot-product) processor, 3-D and 4-D inputs."""
    attn = tiny_model.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2")
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 77, 32, generator=g)
    sink: dict[str, list[torch.Tensor]] = {}
    rec = CrossAttentionRecorder("layer", sink)
    for hidden in (torch.randn(1, 64, 8, generator=g), torch.randn(1, 8, 4, 16, generator=g)):
        with torch.no_grad():
            ref = attn.processor(attn, hidden, encoder_hidden_states=ctx)
            got = rec(attn, hidden, encoder_hidden_states=ctx)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=1e-5)
    assert [p.shape for p in sink["layer"]] == [(1, 4, 64, 77)] * 2
