"""Prompt tokens as words: BPE pieces of one word merged, BOS/EOS and padding excluded."""

from __future__ import annotations

from dataclasses import dataclass


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
        text += piece.replace("</w>", "")
        pos.append(i)
        if piece.endswith("</w>"):
            words.append(Token(text, tuple(pos)))
            text, pos = "", []
    if pos:
        words.append(Token(text, tuple(pos)))
    return words
