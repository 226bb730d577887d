from __future__ import annotations

import torch

from difflens.engine.options import GenerationParams
from difflens.engine.runner import UNetRunner
from difflens.engine.sampler import generate
from difflens.evaluation.sanity import on_runner, randomised_copy


def test_randomised_copy_redraws_every_weight_and_leaves_the_model_alone(pixel_model):
    unet = pixel_model.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    a, b, c = randomised_copy(unet, 1), randomised_copy(unet, 1), randomised_copy(unet, 2)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    for (name, p), (_, q), (_, r) in zip(unet.named_parameters(), a.named_parameters(), c.named_parameters(),
                                         strict=True):
        if p.dim() > 1:  # conv and linear weights: freshly drawn, reproducibly
            assert not torch.equal(p, q), name
            assert not torch.equal(q, r), name
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not any(p.requires_grad for p in a.parameters())


def test_on_runner_keeps_the_input_and_swaps_the_network(pixel_model):
    states = []
    generate(pixel_model, GenerationParams("a large red circle in the center", steps=3), on_step=states.append)
    s = states[1]
    r = on_runner(s, UNetRunner(randomised_copy(pixel_model.unet, 1)))
    assert torch.equal(r.latent_in, s.latent_in) and r.t is s.t and r.cond is s.cond
    assert not torch.allclose(r.eps, s.eps)
    same = on_runner(s, s.runner)
    assert torch.allclose(same.eps, s.eps, atol=1e-6) and torch.allclose(same.latent_next, s.latent_next, atol=1e-5)
