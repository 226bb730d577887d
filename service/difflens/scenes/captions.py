"""The caption grammar of the shapes scenes, its parser, and the fixed train / held-out split.

One object: `a {size} {color} [{texture}] {shape} {position phrase}`, e.g. "a large red striped circle on the
left"; the texture word may be left out for plain objects. Two objects: `{object} and {object}`.

The split is a pure function of the caption text (SHA-256, so it never changes between runs, machines or numpy
versions): a fixed ~15% of the 360 single-object attribute combinations are held out, and a scene is held out when
any of its objects is, or (two objects) when its own caption hashes into the held-out tenth. Training draws only
scenes that are not held out, so every held-out caption is one the model has never seen.
"""

from __future__ import annotations

import hashlib
import itertools
from functools import cache

from difflens.scenes.render import (
    ATTRIBUTES,
    COLORS,
    OPPOSITE_PAIRS,
    SHAPES,
    SIZES,
    TEXTURES,
    ObjectSpec,
    Scene,
)

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "center": "in the center",
}
_PHRASE_TO_POSITION = {tuple(v.split()): k for k, v in POSITION_PHRASES.items()}
HELD_OUT_SINGLE_FRACTION = 0.15
HELD_OUT_PAIR_FRACTION = 0.10
_SALT = "difflens-shapes-split-v1"
# Every word a caption can contain: the tokenizer gives each one token.
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    ["a", "and"] + [w for phrase in POSITION_PHRASES.values() for w in phrase.split()]
    + list(SIZES) + list(COLORS) + list(TEXTURES) + list(SHAPES)
))


def object_phrase(obj: ObjectSpec, include_plain_word: bool = False) -> str:
    """ "a large red striped circle on the left"; the word "plain" only when asked for."""
    words = ["a", obj.size, obj.color]
    if obj.texture != "plain" or include_plain_word:
        words.append(obj.texture)
    words += [obj.shape, POSITION_PHRASES[obj.position]]
    return " ".join(words)


def caption(spec: Scene | ObjectSpec, include_plain_word: bool = False) -> str:
    """The caption of a scene (or of one object)."""
    objects = spec.objects if isinstance(spec, Scene) else (spec,)
    return " and ".join(object_phrase(o, include_plain_word) for o in objects)


def _parse_object(words: list[str], text: str) -> ObjectSpec:
    if len(words) not in (7, 8) or words[0] != "a":
        raise ValueError(f"not a caption of the shapes grammar: {text!r}")
    position = _PHRASE_TO_POSITION.get(tuple(words[-3:]))
    if position is None:
        raise ValueError(f"unknown position phrase {' '.join(words[-3:])!r} in {text!r}")
    size, color = words[1], words[2]
    texture, shape = (words[3], words[4]) if len(words) == 8 else ("plain", words[3])
    try:
        return ObjectSpec(shape=shape, color=color, texture=texture, size=size, position=position)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"{e} (in {text!r})") from e


def parse_caption(text: str) -> Scene:
    """Caption -> Scene (the inverse of `caption`, with or without the word "plain"). ValueError if off-grammar."""
    parts = [p.split() for p in text.strip().lower().split(" and ")]
    return Scene(tuple(_parse_object(words, text) for words in parts))


def single_object_specs() -> list[ObjectSpec]:
    """All 360 single-object attribute combinations, in a fixed order."""
    return [ObjectSpec(**dict(zip(ATTRIBUTES, values, strict=True)))  # type: ignore[arg-type]
            for values in itertools.product(*ATTRIBUTES.values())]


def _unit_hash(text: str) -> float:
    """Deterministic uniform number in [0, 1) from a string."""
    digest = hashlib.sha256(f"{_SALT}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@cache
def held_out_objects() -> frozenset[ObjectSpec]:
    """The single-object combinations that training never sees (~15% of 360)."""
    return frozenset(o for o in single_object_specs() if _unit_hash(caption(o)) < HELD_OUT_SINGLE_FRACTION)


def is_held_out(spec: Scene | ObjectSpec) -> bool:
    """True if the scene (its caption, with or without "plain") must never be used in training."""
    scene = spec if isinstance(spec, Scene) else Scene((spec,))
    if any(o in held_out_objects() for o in scene.objects):
        return True
    return len(scene.objects) == 2 and _unit_hash(caption(scene)) < HELD_OUT_PAIR_FRACTION


def two_object_scenes() -> list[Scene]:
    """Every two-object scene `sample_scene` can draw (opposite sides, not both large), in a fixed order."""
    singles = single_object_specs()
    by_pos_size: dict[tuple[str, str], list[ObjectSpec]] = {}
    for o in singles:
        by_pos_size.setdefault((o.position, o.size), []).append(o)
    scenes: list[Scene] = []
    for a, b in OPPOSITE_PAIRS:
        for first, second in ((a, b), (b, a)):
            for s1, s2 in (("small", "small"), ("small", "large"), ("large", "small")):
                for o1 in by_pos_size[(first, s1)]:
                    scenes.extend(Scene((o1, o2)) for o2 in by_pos_size[(second, s2)])
    return scenes


def held_out_captions(two_objects: bool = True) -> list[str]:
    """Every held-out caption: single objects in both forms (with and without "plain"), then two-object scenes."""
    out: list[str] = []
    for o in single_object_specs():
        if o in held_out_objects():
            out.append(caption(o))
            if o.texture == "plain":
                out.append(caption(o, include_plain_word=True))
    if two_objects:
        out.extend(caption(s) for s in two_object_scenes() if is_held_out(s))
    return out


def training_objects() -> list[ObjectSpec]:
    """The single-object combinations training may draw."""
    return [o for o in single_object_specs() if o not in held_out_objects()]

