"""Prompt tokens as words: the pieces of one word merged, BOS/EOS and padding excluded. CLIP's BPE closes a word's
last piece with "</w>"; a sentencepiece tokenizer's (T5's, FLUX's words) opens a word's first piece with "▁"."""

from __future__ import annotations

from dataclasses import dataclass

WORD_START = "\u2581"  # sentencepiece's word-start mark ("▁")


@dataclass(frozen=True)
class Token:
    """One prompt word. `positions` are its indices in the padded token-id sequence (the text encoder's axis)."""

    text: str
    positions: tuple[int, ...]


def prompt_tokens(tokenizer, prompt: str) -> list[Token]:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    words: list[Token] = []
    text, pos = "", []  # type: ignore[var-annotated]
    for i, tid in enumerate(ids):
        if tid in special:
            if i > 0 and tid == tokenizer.eos_token_id:
                break
            continue
        piece = tokenizer.convert_ids_to_tokens(tid)
        if piece.startswith(WORD_START) and pos:  # sentencepiece: this piece starts the next word
            words.append(Token(text, tuple(pos)))
            text, pos = "", []
        text += piece.replace("</w>", "").removeprefix(WORD_START)
        pos.append(i)
        if piece.endswith("</w>"):
            words.append(Token(text, tuple(pos)))
            text, pos = "", []
    if pos:
        words.append(Token(text, tuple(pos)))
    return words
