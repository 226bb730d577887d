from __future__ import annotations

import logging

import pytest
import torch

from difflens.engine.runner import CFGConditioning, UNetRunner
from difflens.errors import InvalidArgument


def inputs(b=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 4, 16, 16, generator=g), CFGConditioning(torch.randn(2, 77, 32, generator=g), 4.0)


def test_unknown_backend_names_the_choices(tiny_model):
    with pytest.raises(InvalidArgument) as e:
        UNetRunner(tiny_model.unet, "tensorrt")
    assert e.value.field == "unet_backend" and "eager" in e.value.message and "compile" in e.value.message


def test_guided_batch_equals_one_by_one(tiny_model):
    x, cond = inputs()
    r = UNetRunner(tiny_model.unet)
    with torch.no_grad():
        batched = r.guided(x, torch.tensor(700), cond)
        single = torch.cat([r.guided(x[i:i + 1], torch.tensor(700), cond) for i in range(3)])
        u = tiny_model.unet(x, 700, encoder_hidden_states=cond.embeds[:1].expand(3, -1, -1)).sample
        c = tiny_model.unet(x, 700, encoder_hidden_states=cond.embeds[1:].expand(3, -1, -1)).sample
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched, u + 4.0 * (c - u), atol=1e-5)


def test_cfg_off_runs_only_the_conditional_branch(tiny_model):
    x, _ = inputs(2)
    cond = CFGConditioning(torch.randn(2, 77, 32), 1.0)
    assert not cond.cfg and cond.batch(2).shape == (2, 77, 32)
    with torch.no_grad():
        got = UNetRunner(tiny_model.unet).guided(x, 10, cond)
        want = tiny_model.unet(x, 10, encoder_hidden_states=cond.embeds[1:].expand(2, -1, -1)).sample
    assert torch.equal(got, want)


def test_compile_failure_falls_back_to_eager_with_a_warning(tiny_model, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING):
        r = UNetRunner(tiny_model.unet, "compile")
    assert r.backend == "eager" and r.requested_backend == "compile"
    assert "falling back to eager" in caplog.text and "no compiler here" in caplog.text
    x, cond = inputs(1)
    with torch.no_grad():
        assert torch.equal(r.guided(x, 5, cond), UNetRunner(tiny_model.unet).guided(x, 5, cond))


def test_compile_error_on_first_call_falls_back(tiny_model, monkeypatch, caplog):
    def compiled_but_broken(module, **k):
        def run(*a, **kw):
            raise RuntimeError("inductor failed")
        return run

    monkeypatch.setattr(torch, "compile", compiled_but_broken)
    r = UNetRunner(tiny_model.unet, "compile")
    x, cond = inputs(1)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = r.guided(x, 5, cond)
    assert r.backend == "eager" and "inductor failed" in caplog.text and out.shape == x.shape


@pytest.mark.slow
def test_compiled_unet_matches_eager(tiny_model):
    """A real torch.compile (inductor, CPU) of the tiny UNet: same numbers as eager to float tolerance."""
    x, cond = inputs(2)
    r = UNetRunner(tiny_model.unet, "compile")
    with torch.no_grad():
        got = r.guided(x, torch.tensor(300), cond)
        want = UNetRunner(tiny_model.unet).guided(x, torch.tensor(300), cond)
    if r.backend != "compile":
        pytest.skip("torch.compile cannot run on this machine (fell back to eager)")
    assert torch.allclose(got, want, atol=1e-4)


def test_the_triton_backend_sends_every_raw_call_to_its_remote_unet(tiny_model):
    """A RemoteUNet gets the batched calls with one timestep per sample; a backend and a remote go together."""
    calls = []

    def remote(latents, timesteps, embeds):
        calls.append((tuple(latents.shape), timesteps.tolist(), tuple(embeds.shape)))
        return tiny_model.unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]

    x, cond = inputs(2)
    r = UNetRunner(tiny_model.unet, "triton", remote=remote)
    with torch.no_grad():
        got = r.guided(x, torch.tensor(300), cond)
        want = UNetRunner(tiny_model.unet).guided(x, torch.tensor(300), cond)
    assert calls == [((4, 4, 16, 16), [300] * 4, (4, 77, 32))] and r.backend == "triton"
    torch.testing.assert_close(got, want)
    for backend, given in (("triton", None), ("eager", remote)):
        with pytest.raises(InvalidArgument) as e:
            UNetRunner(tiny_model.unet, backend, remote=given)
        assert e.value.field == "unet_backend"


def test_one_branch_conditioning_keeps_cfg_off_whatever_the_scale_and_two_branches_as_they_were():
    """A family without CFG (FLUX: guidance-distilled) gives one branch; the two-branch layout is unchanged."""
    one = CFGConditioning(torch.randn(1, 5, 3), 7.5, {"g": torch.tensor([7.5])})
    assert not one.cfg and one.batch(3).shape == (3, 5, 3) and one.added_batch(3)["g"].shape == (3,)
    embeds, added = one.conditional()
    assert torch.equal(embeds, one.embeds) and added is not None and added["g"].tolist() == [7.5]
    two = CFGConditioning(torch.randn(2, 5, 3), 7.5, {"g": torch.tensor([0.0, 1.0])})
    assert two.cfg and torch.equal(two.batch(2), two.embeds.repeat_interleave(2, dim=0))
    assert two.added_batch(2)["g"].tolist() == [0.0, 0.0, 1.0, 1.0]
    embeds, added = two.conditional()
    assert torch.equal(embeds, two.embeds[1:2]) and added is not None and added["g"].tolist() == [1.0]
