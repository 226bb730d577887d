from __future__ import annotations

import itertools

import numpy as np
import pytest

from difflens.scenes.captions import (
    VOCABULARY,
    caption,
    held_out_captions,
    held_out_objects,
    is_held_out,
    parse_caption,
    single_object_specs,
    training_objects,
    two_object_scenes,
)
from difflens.scenes.render import ATTRIBUTES, ObjectSpec, Scene, sample_scene


def test_grammar_examples():
    o = ObjectSpec("circle", "red", "striped", "large", "left")
    assert caption(o) == "a large red striped circle on the left"
    p = ObjectSpec("square", "blue", "plain", "small", "center")
    assert caption(p) == "a small blue square in the center"
    assert caption(p, include_plain_word=True) == "a small blue plain square in the center"
    assert caption(Scene((o, ObjectSpec("triangle", "yellow", "dotted", "small", "right")))) == (
        "a large red striped circle on the left and a small yellow dotted triangle on the right")


def test_all_360_combinations_round_trip_with_and_without_plain():
    specs = single_object_specs()
    assert len(specs) == len(set(specs)) == 3 * 4 * 3 * 2 * 5
    for o in specs:
        for plain in (False, True):
            assert parse_caption(caption(o, plain)) == Scene((o,))


def test_two_object_captions_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng, two_object_prob=1.0)
        assert parse_caption(caption(scene, include_plain_word=True)) == scene
        assert parse_caption(caption(scene)) == scene


@pytest.mark.parametrize("text", [
    "", "a red circle", "a large red striped circle at the left", "a huge red circle on the left",
    "the large red circle on the left", "a large red striped plain circle on the left",
    "a large red circle on the left and", "a large red circle on the left and a small red circle on the left",
])
def test_off_grammar_text_is_refused(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_vocabulary_holds_every_caption_word():
    words = {w for o in single_object_specs() for w in caption(o, True).split()} | {"and"}
    assert words == set(VOCABULARY)


def test_each_word_is_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from difflens.engine.tiny import write_word_tokenizer

    write_word_tokenizer(tmp_path, VOCABULARY, model_max_length=24)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a large yellow dotted triangle at the bottom and a small green plain circle at the top"
    ids = tok(text).input_ids
    assert len(ids) == len(text.split()) + 2 <= 24


def test_split_is_fixed_and_large_enough():
    held = held_out_objects()
    assert len(held) == 58  # pinned: the split is a pure function of the caption text
    assert len(training_objects()) + len(held) == 360
    captions = held_out_captions()
    assert len(captions) >= 200 and len(set(captions)) == len(captions)
    assert len(held_out_captions(two_objects=False)) >= 58
    for text in captions:
        assert is_held_out(parse_caption(text))


def test_training_still_sees_every_pair_of_attribute_values():
    train = training_objects()
    for a, b in itertools.combinations(ATTRIBUTES, 2):
        seen = {(getattr(o, a), getattr(o, b)) for o in train}
        assert len(seen) == len(ATTRIBUTES[a]) * len(ATTRIBUTES[b]), (a, b)


def test_a_scene_with_a_held_out_object_is_held_out():
    held = next(o for o in sorted(held_out_objects(), key=caption) if o.position != "center")
    other = next(o for o in training_objects() if {o.position, held.position} in ({"left", "right"},
                                                                                {"top", "bottom"}))
    assert is_held_out(Scene((held, other))) and is_held_out(Scene((other, held)))


def test_two_object_enumeration_matches_the_sampler():
    every = set(two_object_scenes())
    rng = np.random.default_rng(1)
    for _ in range(300):
        assert sample_scene(rng, two_object_prob=1.0) in every
