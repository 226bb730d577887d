"""A model's CLIP (or FLUX's T5) tokenizer read from its files with the `tokenizers` package alone, for the gRPC
front: it counts a prompt's tokens and splits it into words exactly as the workers' transformers tokenizer does,
without transformers or torch in the process. A T5 folder (tokenizer.json, no BOS in its config) keeps the file's
own specials and post-processor ("... </s>").

A folder with tokenizer.json is read as it stands; one with only vocab.json and merges.txt (the usual SD layout) is
built the way transformers builds a CLIP tokenizer from them: NFC, whitespace runs folded, lower case; split into
words, numbers and punctuation; byte-level BPE with "</w>" closing each word; BOS ... EOS around the text. A test
compares ids and pieces with transformers' CLIPTokenizer on both layouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from difflens.errors import ModelLoadError

# CLIP's word pattern: its special tokens, English contractions, letter runs, single digits, other symbol runs.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
DEFAULT_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>"}


@dataclass(frozen=True)
class Encoding:
    input_ids: list[int]


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...} in older folders."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_object(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelLoadError(str(path), f"malformed JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(str(path), "must hold a JSON object")
    return data


def _from_vocab(folder: Path, unk: str) -> Tokenizer:
    vocab = _read_object(folder / "vocab.json")
    merges_file = folder / "merges.txt"
    if not vocab or not merges_file.exists():
        raise ModelLoadError(str(folder), "no tokenizer.json, and no vocab.json with merges.txt beside it")
    lines = merges_file.read_text(encoding="utf-8").splitlines()
    pairs = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    bad = [p for p in pairs if len(p) != 2]
    if bad:
        raise ModelLoadError(str(merges_file), f"malformed merge line {' '.join(bad[0])!r}: expected two pieces")
    merges = [(a, b) for a, b in pairs]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


class FileTokenizer:
    """The part of transformers' tokenizer interface that engine.tokens.prompt_tokens and the model catalog use:
    `tok(text, padding="max_length", max_length=n, truncation=True).input_ids`, `convert_ids_to_tokens`,
    `model_max_length` and the BOS / EOS / PAD ids."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(str(folder), "the tokenizer folder is missing")
        config = {**_read_object(folder / "special_tokens_map.json"), **_read_object(folder / "tokenizer_config.json")}
        # A sentencepiece tokenizer (T5's: tokenizer.json, no BOS) keeps its file's own specials and post-processor
        # ("... </s>"); a CLIP one is given CLIP's where its files leave them out.
        sentencepiece = "bos_token" not in config and (folder / "tokenizer.json").exists()
        specials = {k: _token_text(config.get(k)) or ("" if sentencepiece else v) for k, v in DEFAULT_SPECIALS.items()}
        specials = {k: v for k, v in specials.items() if v}
        try:
            if (folder / "tokenizer.json").exists():
                tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            else:
                tok = _from_vocab(folder, specials["unk_token"])
        except Exception as e:  # tokenizers raises its own Exception subclasses for a malformed file
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(str(folder), f"cannot read the tokenizer: {e}") from e
        tok.add_special_tokens(sorted(set(specials.values())))
        # added where the vocabulary lacks them, as transformers does: every special has an id from here on
        ids = {k: int(tok.token_to_id(v) or 0) for k, v in specials.items()}
        if not sentencepiece:
            tok.post_processor = processors.RobertaProcessing((specials["eos_token"], ids["eos_token"]),
                                                              (specials["bos_token"], ids["bos_token"]),
                                                              trim_offsets=False, add_prefix_space=False)
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.bos_token_id: int | None = ids.get("bos_token")
        self.eos_token_id: int = ids.get("eos_token", 0)
        self.pad_token_id: int = ids.get("pad_token", self.eos_token_id)
        self.num_special_tokens = len(tok.encode("").ids)  # what every encoding adds: CLIP's BOS and EOS, T5's EOS
        length = config.get("model_max_length", 77)
        if not isinstance(length, int) or isinstance(length, bool) or not 2 < length <= 1_000_000:
            raise ModelLoadError(str(folder / "tokenizer_config.json"),
                                 f"model_max_length: got {length!r}; expected an integer in [3, 1000000]")
        self.model_max_length = length

    def __call__(self, text: str, padding: bool | str = False, max_length: int | None = None,
                 truncation: bool = False) -> Encoding:
        """BOS (where the tokenizer has one), the text's tokens, EOS; cut to `max_length` (EOS kept last) with
        truncation, padded to it with padding="max_length", as transformers does for one sequence."""
        ids = self._tok.encode(text).ids
        n = self.model_max_length if max_length is None else max_length
        if truncation and len(ids) > n:
            ids = ids[:n - 1] + [self.eos_token_id]
        if padding == "max_length" and len(ids) < n:
            ids = ids + [self.pad_token_id] * (n - len(ids))
        return Encoding(ids)

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))
