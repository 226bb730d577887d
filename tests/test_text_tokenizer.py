"""The front's tokenizer (tokenizers alone) against the workers' transformers CLIPTokenizer, on both folder layouts:
tokenizer.json (the shipped model; the tiny model as diffusers saves it) and vocab.json + merges.txt alone (as SD
folders have it; written by make-tiny-model's tokenizer writer)."""

from __future__ import annotations

import json

import pytest
from transformers import CLIPTokenizer

from difflens.config import SHIPPED_MODEL
from difflens.engine.tiny import BASE_WORDS, write_word_tokenizer
from difflens.engine.tokens import prompt_tokens
from difflens.errors import ModelLoadError
from difflens.text_tokenizer import FileTokenizer

PROMPTS = [
    "", "a large red striped circle in the center", "A LARGE   Red\tcircle\n\non the left",
    "a small blue dotted square at the top and a large green triangle at the bottom",
    "ünïcödé Café naïve — “quotes” and emoji 🐱🚀", "numbers 12345 and 3.14, punctuation!?;:", "don't it's we'll",
    "<|endoftext|> inside <|startoftext|> text", "red " * 60, "   leading and trailing   ", "日本語のテキスト",
    "a\u00a0non-breaking\u2003space", "e\u0301 composed vs é",
]


@pytest.fixture(scope="module")
def vocab_only(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab-only") / "tokenizer"
    write_word_tokenizer(folder, BASE_WORDS)
    return folder


@pytest.fixture(scope="module", params=["shipped", "tiny", "vocab-only"])
def folder(request, tiny_dir, vocab_only):
    return {"shipped": SHIPPED_MODEL / "tokenizer", "tiny": tiny_dir / "tokenizer", "vocab-only": vocab_only}[
        request.param]


def test_the_layouts_are_the_two_the_front_must_read(tiny_dir, vocab_only):
    assert (SHIPPED_MODEL / "tokenizer" / "tokenizer.json").exists()
    assert (tiny_dir / "tokenizer" / "tokenizer.json").exists()
    assert not (vocab_only / "tokenizer.json").exists() and (vocab_only / "merges.txt").exists()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_and_words_equal_transformers(folder, prompt):
    ours, theirs = FileTokenizer(folder), CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert ours(prompt, truncation=False).input_ids == theirs(prompt, truncation=False).input_ids
    n = theirs.model_max_length
    assert (ours(prompt, padding="max_length", max_length=n, truncation=True).input_ids
            == theirs(prompt, padding="max_length", max_length=n, truncation=True).input_ids)
    assert prompt_tokens(ours, prompt) == prompt_tokens(theirs, prompt)


def test_special_ids_length_and_size_equal_transformers(folder):
    ours, theirs = FileTokenizer(folder), CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.model_max_length, len(ours)) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.model_max_length, len(theirs))


def test_a_token_over_the_limit_is_counted_not_cut(folder):
    ours = FileTokenizer(folder)
    long = "red " * (ours.model_max_length + 5)
    assert len(ours(long).input_ids) == ours.model_max_length + 5 + 2


@pytest.mark.parametrize(("breakage", "message"), [
    (lambda d: (d / "merges.txt").unlink(), "no tokenizer.json, and no vocab.json with merges.txt"),
    (lambda d: (d / "vocab.json").write_text("[1, 2]"), "must hold a JSON object"),
    (lambda d: (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": "77"})),
     "model_max_length: got '77'"),
])
def test_a_broken_folder_names_the_file_and_the_fault(vocab_only, tmp_path, breakage, message):
    import shutil

    folder = tmp_path / "tokenizer"
    shutil.copytree(vocab_only, folder)
    breakage(folder)
    with pytest.raises(ModelLoadError) as e:
        FileTokenizer(folder)
    assert message in str(e.value) and str(folder) in str(e.value)
