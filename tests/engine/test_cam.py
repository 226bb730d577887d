from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflens.engine import cam
from difflens.engine.options import CamOptions
from difflens.engine.runner import CFGConditioning, UNetRunner
from difflens.engine.sampler import StepState
from difflens.errors import InvalidArgument

TARGETS = ["output_sum", "guided_sum", "guided_sqnorm"]
TINY_LAYERS = (
    "down_blocks.0.attentions.0", "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0", "down_blocks.1.resnets.0",
    "mid_block.attentions.0", "mid_block.resnets.0", "mid_block.resnets.1",
    "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.upsamplers.0",
    "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1",
)


class Block(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([layer])


class Toy(nn.Module):
    """The UNet call signature with a closed-form Grad-CAM. Per branch b (embeddings e_b, s_b = mean(e_b)):
    A = avgpool2(W1 x + c1)  [down_blocks.0.resnets.0],  B = W2 A  [up_blocks.0.resnets.0],
    out = nearest_up2(s_b * M B) * P + x.
    """

    def __init__(self, channels: int = 2, k: int = 3, size: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.down_blocks = nn.ModuleList([Block(nn.Sequential(nn.Conv2d(channels, k, 1), nn.AvgPool2d(2)))])
        self.up_blocks = nn.ModuleList([Block(nn.Conv2d(k, k, 1, bias=False))])
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)
        self.register_buffer("M", torch.randn(channels, k, generator=g))
        self.register_buffer("P", torch.randn(size, size, generator=g))
        self.requires_grad_(False)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        a = self.down_blocks[0].resnets[0](sample)
        b = self.up_blocks[0].resnets[0](a)
        s = encoder_hidden_states.mean(dim=(1, 2))
        mixed = torch.einsum("ck,bkuv->bcuv", self.M, b) * s[:, None, None, None]
        return (F.interpolate(mixed, scale_factor=2, mode="nearest") * self.P + sample,)


def step_state(unet, latent: torch.Tensor, embeds: torch.Tensor, scale: float, t: int = 500) -> StepState:
    """latent: (1, C, h, w); embeds: (2, L, D) = [uncond; cond]."""
    z = torch.zeros_like(latent)
    return StepState(0, 1, t, torch.tensor(t), latent, z, z, z, CFGConditioning(embeds, scale), UNetRunner(unet))


def toy_state(scale: float) -> StepState:
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 2, 8, 8, generator=g)
    embeds = torch.randn(2, 5, 6, generator=g) + torch.tensor([0.3, 1.7])[:, None, None]
    return step_state(Toy(), latent, embeds, scale)


def expected_toy_maps(toy: Toy, state: StepState, target: str) -> dict[str, torch.Tensor]:
    """Grad-CAM of both toy layers, worked out by hand from the toy's formula."""
    cond, w = state.cond, state.cond.scale
    x = torch.cat([state.latent_in] * 2) if cond.cfg else state.latent_in
    emb = cond.embeds if cond.cfg else cond.embeds[1:]
    s = emb.mean(dim=(1, 2))
    with torch.no_grad():
        a = toy.down_blocks[0].resnets[0](x)
        b = toy.up_blocks[0].resnets[0](a)
        out = toy(x, 0, encoder_hidden_states=emb)[0]
    # dy/d(out) per branch
    if target == "output_sum":
        d_out = torch.ones_like(out)
    else:
        coef = torch.tensor([1 - w, w]) if cond.cfg else torch.ones(1)
        eps_w = out[0] + w * (out[1] - out[0]) if cond.cfg else out[0]
        d_out = coef[:, None, None, None] * (torch.ones_like(eps_w) if target == "guided_sum" else 2 * eps_w)
    d_mixed = F.avg_pool2d(d_out * toy.P, 2) * 4  # adjoint of nearest x2 upsampling: sum over each 2x2 block
    g_b = s[:, None, None, None] * torch.einsum("ck,bcuv->bkuv", toy.M, d_mixed)
    g_a = torch.einsum("ok,bouv->bkuv", toy.up_blocks[0].resnets[0].weight[:, :, 0, 0], g_b)

    def combine(v):
        return v[0] + w * (v[1] - v[0]) if cond.cfg else v[0]

    maps = {}
    for path, act, grad in (("down_blocks.0.resnets.0", a, g_a), ("up_blocks.0.resnets.0", b, g_b)):
        alpha = combine(grad).mean(dim=(1, 2))
        raw = torch.relu((alpha[:, None, None] * combine(act)).sum(0))
        up = F.interpolate(raw[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
        maps[f"cam/{path}"] = (up - up.min()) / (up.max() - up.min())
    maps["cam"] = maps["cam/down_blocks.0.resnets.0"] + maps["cam/up_blocks.0.resnets.0"]
    return maps


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("scale", [3.0, 1.0])
def test_toy_maps_match_the_closed_form(target, scale):
    state = toy_state(scale)
    layers = ("down_blocks.0.resnets.0", "up_blocks.0.resnets.0")
    got = cam.explain_step(state, CamOptions(target=target), layers)
    want = expected_toy_maps(state.runner.unet, state, target)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == (8, 8)
        assert torch.allclose(got[name], want[name], atol=1e-5), name
    for path in layers:  # not a trivial pass: each layer's map really varies over the latent
        assert want[f"cam/{path}"].max() == 1 and want[f"cam/{path}"].min() == 0


def test_cfg_weighting_changes_the_map():
    layers = ("down_blocks.0.resnets.0",)
    on = cam.explain_step(toy_state(3.0), CamOptions(target="guided_sqnorm"), layers)["cam"]
    off = cam.explain_step(toy_state(1.0), CamOptions(target="guided_sqnorm"), layers)["cam"]
    assert not torch.allclose(on, off, atol=1e-3)


def test_constant_map_gives_zeros_not_nan():
    toy = Toy()
    toy.M.zero_()  # the layer no longer reaches the output: G = 0, map = ReLU(0) everywhere
    g = torch.Generator().manual_seed(2)
    state = step_state(toy, torch.randn(1, 2, 8, 8, generator=g), torch.randn(2, 5, 6, generator=g), 3.0)
    out = cam.explain_step(state, CamOptions(), ("down_blocks.0.resnets.0",))
    assert torch.equal(out["cam"], torch.zeros(8, 8))
    assert torch.equal(cam.min_max(torch.full((3, 3), 2.5)), torch.zeros(3, 3))


@pytest.fixture()
def tiny_state(tiny_model):
    from difflens.engine.sampler import encode_prompt

    embeds, _ = encode_prompt(tiny_model, "a red circle", "")
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return step_state(tiny_model.unet, latent, embeds, 4.0, t=701)


def test_one_forward_and_one_backward_for_all_layers(tiny_model, tiny_state):
    unet = tiny_model.unet
    calls = {"forward": 0, "backward": 0}

    def count_backward(_grad):
        calls["backward"] += 1

    def on_unet(_module, args, kwargs):
        calls["forward"] += 1
        args[0].register_hook(count_backward)  # the UNet's input: its gradient is computed once per backward

    handle = unet.register_forward_pre_hook(on_unet, with_kwargs=True)
    try:
        out = cam.explain_step(tiny_state, CamOptions(), TINY_LAYERS)
    finally:
        handle.remove()
    assert calls == {"forward": 1, "backward": 1}
    assert set(out) == {"cam"} | {f"cam/{p}" for p in TINY_LAYERS}
    for name, m in out.items():
        assert m.shape == (16, 16) and torch.isfinite(m).all(), name
        assert m.min() >= 0
    assert torch.allclose(out["cam"], sum(out[f"cam/{p}"] for p in TINY_LAYERS))


def test_explaining_changes_nothing_the_sampler_uses(tiny_model, tiny_state):
    unet = tiny_model.unet
    latent, embeds = tiny_state.latent_in.clone(), tiny_state.cond.embeds.clone()
    rng = torch.get_rng_state()
    params = {n: p.detach().clone() for n, p in unet.named_parameters()}
    cam.explain_step(tiny_state, CamOptions(target="guided_sqnorm"), TINY_LAYERS)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(tiny_state.latent_in, latent) and not tiny_state.latent_in.requires_grad
    assert torch.equal(tiny_state.cond.embeds, embeds)
    for n, p in unet.named_parameters():
        assert not p.requires_grad and p.grad is None and torch.equal(p, params[n]), n
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_default_layers_on_the_tiny_unet(tiny_model):
    layers = cam.resolve_layers(tiny_model.unet, ())
    assert sorted(layers) == sorted(TINY_LAYERS)
    assert layers[0].startswith("down_blocks") and layers[-1].startswith("up_blocks")
    picked = ("up_blocks.0.upsamplers.0", "mid_block.attentions.0", "up_blocks.0.upsamplers.0")
    assert cam.resolve_layers(tiny_model.unet, picked) == picked[:2]


@pytest.mark.parametrize("bad", ["up_blocks.9.resnets.0", "conv_in", "down_blocks.0.attentions.0.proj_in"])
def test_unknown_layer_names_the_field_and_lists_valid_paths(tiny_model, bad):
    with pytest.raises(InvalidArgument) as e:
        cam.resolve_layers(tiny_model.unet, ("mid_block.resnets.0", bad))
    assert e.value.field == "cam.layers"
    assert repr(bad) in e.value.message and "'mid_block.resnets.0'" not in e.value.message
    assert all(p in e.value.message for p in TINY_LAYERS)


@pytest.mark.parametrize("scheduler,guidance", [("dpmsolver++", 3.0), ("euler", 1.0)])
def test_cam_and_attention_leave_the_image_bit_identical(tiny_model, scheduler, guidance):
    from difflens.engine.explain import run_explanation
    from difflens.engine.options import AttentionOptions, ExplainOptions, GenerationParams

    params = GenerationParams("a zebra on the left", seed=4, steps=3, guidance_scale=guidance, scheduler=scheduler)
    plain = run_explanation(tiny_model, params, ExplainOptions())
    explained = run_explanation(tiny_model, params,
                                ExplainOptions(cam=CamOptions(target="guided_sum"), attention=AttentionOptions()))
    assert np.array_equal(plain.image, explained.image)
    assert torch.equal(plain.generation.latents, explained.generation.latents)
    assert len(explained.steps) == 3
    maps = explained.steps[0].maps
    assert maps["cam"].shape == (16, 16) and maps["attn"].shape == (5, 16, 16)
