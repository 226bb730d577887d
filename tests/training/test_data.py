from __future__ import annotations

import pytest
import torch

from difflens.scenes.captions import is_held_out, parse_caption
from difflens.training.build import ARCHS, build_tokenizer
from difflens.training.data import BatchStream, DataConfig, Tokenize, make_batch


def test_batches_are_a_function_of_seed_and_index(tmp_path):
    tok = Tokenize(build_tokenizer(tmp_path, ARCHS["tiny"]))
    cfg = DataConfig()
    a, b = make_batch(3, 7, 8, cfg, tok), make_batch(3, 7, 8, cfg, tok)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, make_batch(3, 8, 8, cfg, tok).images)
    assert not torch.equal(a.images, make_batch(4, 7, 8, cfg, tok).images)
    assert a.images.shape == (8, 3, 32, 32) and a.images.min() >= -1 and a.images.max() <= 1
    assert a.input_ids.shape == (8, 24) and a.input_ids.dtype == torch.long


def test_training_never_sees_a_held_out_caption_and_drops_some(tmp_path):
    tok = Tokenize(build_tokenizer(tmp_path, ARCHS["tiny"]))
    captions = [c for i in range(20) for c in make_batch(0, i, 32, DataConfig(), tok).captions]
    empty = sum(c == "" for c in captions)
    assert 0.05 < empty / len(captions) < 0.15
    scenes = [parse_caption(c) for c in captions if c]
    assert not any(is_held_out(s) for s in scenes)
    assert 0.1 < sum(len(s.objects) == 2 for s in scenes) / len(scenes) < 0.3
    assert any("plain" in c for c in captions)


@pytest.mark.parametrize("threaded", [False, True])
def test_stream_yields_the_batches_in_order(tmp_path, threaded):
    tokenizer = build_tokenizer(tmp_path, ARCHS["tiny"])
    cfg = DataConfig()
    with BatchStream(1, 5, 4, cfg, tokenizer, threaded=threaded) as batches:
        got = [next(batches) for _ in range(3)]
    assert [b.index for b in got] == [5, 6, 7]
    ref = make_batch(1, 6, 4, cfg, Tokenize(tokenizer))
    assert torch.equal(got[1].images, ref.images) and got[1].captions == ref.captions
