from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difflens.engine import attention
from difflens.engine.hooks import capture_cross_attention
from difflens.engine.options import GenerationParams
from difflens.engine.sampler import generate
from difflens.engine.tokens import Token, prompt_tokens

PROMPT = "a zebra on the left"  # 'zebra' is not in the tiny vocabulary: four BPE pieces


@pytest.fixture(scope="module")
def first_step(tiny_model):
    states = []
    generate(tiny_model, GenerationParams(PROMPT, seed=1, steps=2, guidance_scale=3.0), on_step=states.append)
    return states[0]


def test_token_maps_closed_form():
    """Two layers (4x4 and 8x8 queries, 2 heads, 6 tokens) on an 8x8 latent, worked out element by element."""
    g = torch.Generator().manual_seed(0)
    probs = [torch.rand(2, 16, 6, generator=g).softmax(-1), torch.rand(2, 64, 6, generator=g).softmax(-1)]
    tokens = [Token("ab", (1, 2)), Token("c", (4,))]
    expected = torch.zeros(2, 8, 8)
    for p in probs:
        side = int(p.shape[1] ** 0.5)
        for j, tok in enumerate(tokens):
            word = sum((p[0, :, i] + p[1, :, i]) / 2 for i in tok.positions).reshape(side, side)
            expected[j] += F.interpolate(word[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    expected /= 2
    got = attention.token_maps(probs, tokens, (8, 8))
    assert torch.allclose(got, expected, atol=1e-6)


def test_maps_and_relevance_on_the_tiny_model(tiny_model, first_step):
    tokens = prompt_tokens(tiny_model.tokenizer, PROMPT)
    out = attention.explain_step(first_step, tokens)
    maps, rel = out["attn"], out["attn_relevance"]
    assert maps.shape == (len(tokens), 16, 16) == (5, 16, 16)
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    assert rel.shape == (5,) and (rel >= 0).all() and (rel <= 1).all()
    assert rel.max() == 1 and rel.min() == 0
    assert rel.argmax() == maps.sum(dim=(1, 2)).argmax()


def test_maps_come_from_the_conditional_branch(tiny_model, first_step):
    tokens = prompt_tokens(tiny_model.tokenizer, PROMPT)
    unet = tiny_model.unet
    with torch.no_grad(), capture_cross_attention(unet) as records:
        unet(first_step.latent_in, first_step.t, encoder_hidden_states=first_step.cond.embeds[1:2])
    probs = [p[0] for calls in records.values() for p in calls]
    want = attention.token_maps(probs, tokens, (16, 16))
    assert torch.allclose(attention.explain_step(first_step, tokens)["attn"], want, atol=1e-6)


def test_multi_piece_word_uses_all_its_pieces(tiny_model, first_step):
    tokens = prompt_tokens(tiny_model.tokenizer, PROMPT)
    zebra = next(t for t in tokens if t.text == "zebra")
    assert zebra.positions == (2, 3, 4, 5)
    merged = attention.explain_step(first_step, [zebra])["attn"][0]
    pieces = attention.explain_step(first_step, [Token(str(i), (i,)) for i in zebra.positions])["attn"]
    assert torch.allclose(merged, pieces.sum(0), atol=1e-6)
    assert all((merged > piece).all() for piece in pieces)  # softmax weights are positive: every piece adds


def test_relevance_edge_cases():
    assert torch.equal(attention.relevance(torch.ones(3, 4, 4)), torch.zeros(3))
    empty = attention.token_maps([torch.rand(2, 16, 6).softmax(-1)], [], (4, 4))
    assert empty.shape == (0, 4, 4) and attention.relevance(empty).shape == (0,)
    assert torch.equal(attention.token_maps([], [Token("a", (1,))], (4, 4)), torch.zeros(1, 4, 4))


def test_explaining_restores_the_processors(tiny_model, first_step):
    before = dict(tiny_model.unet.attn_processors)
    attention.explain_step(first_step, prompt_tokens(tiny_model.tokenizer, PROMPT))
    assert all(tiny_model.unet.attn_processors[k] is p for k, p in before.items())


@pytest.mark.parametrize("size,n,grid", [
    ((16, 16), 256, (16, 16)), ((16, 16), 16, (4, 4)), ((5, 7), 35, (5, 7)), ((5, 7), 12, (3, 4)), ((5, 7), 4, (2, 2)),
])
def test_layer_grid(size, n, grid):
    assert attention.layer_grid(n, size) == grid


def test_layer_grid_rejects_a_size_of_no_level():
    with pytest.raises(ValueError, match="50 attention queries"):
        attention.layer_grid(50, (16, 16))
