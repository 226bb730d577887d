"""Tiny random-weights models of each supported family (SD, SDXL), built entirely in code and written locally (no
hub).

Used by the tests and, until a trained model ships, by `make demo`. The SD components mirror diffusers' own
`get_dummy_components` for StableDiffusionPipeline, with a CLIP tokenizer whose vocabulary is written here; the SDXL
ones keep SDXL's layout (a first block without attention, two transformer layers per block after it, two text
encoders, the second with a projection, "text_time" added conditioning) at a handful of channels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

TinyFamily = Literal["sd", "sdxl", "flux", "flux-schnell", "sd3"]
TINY_FAMILIES: tuple[TinyFamily, ...] = ("sd", "sdxl", "flux", "flux-schnell", "sd3")

BASE_WORDS = (
    "a an the and of on in at to with photo picture painting drawing image small large big tiny huge "
    "red green blue yellow orange purple black white pink brown gray "
    "circle square triangle star cat dog house tree car flower mountain river sky sun moon "
    "striped dotted plain left right top bottom center middle background foreground"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable-unicode table (GPT-2 BPE convention).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(ab, len(ranks) + 1), i) for i, ab in enumerate(zip(pieces, pieces[1:], strict=False))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def write_word_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int = 77,
                         pad_token: str = "<|endoftext|>") -> None:
    """Write a CLIPTokenizer (vocab.json, merges.txt) in which every word of `words` is one token. `pad_token`:
    SDXL's second tokenizer pads with "!" where CLIP's own pads with its end-of-text token.

    Byte-level base vocabulary, so any text still tokenizes. Merges are added until BPE turns each word into
    one piece: a merge added for one word can split another (merges apply by rank, not per word), so the words
    are re-tokenised after every round until none needs a new merge.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    todo = [w for w in dict.fromkeys(w.lower() for w in words) if len(w) > 1]
    for _ in range(100):
        changed = False
        for word in todo:
            pieces = _bpe(word, ranks)
            if len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                ranks[pair] = len(ranks)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
                changed = True
        if not changed:
            break
    else:
        raise RuntimeError("tokenizer merges did not converge")
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token, "do_lower_case": True,
    }, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }, indent=2))


def build_tiny_components(seed: int = 0, sample_size: int = 16, tokenizer_dir: str | Path | None = None) -> dict:
    """Random-weights components (fixed seed). Latents are (4, sample_size, sample_size); images 2x that."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=sample_size * 2)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                                 layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                                 vocab_size=1000, max_position_embeddings=77)
    text_encoder = CLIPTextModel(text_config)
    if tokenizer_dir is None:
        raise ValueError("tokenizer_dir is required: the tokenizer is written to disk first")
    write_word_tokenizer(tokenizer_dir, BASE_WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    _fit_text_config(text_config, tokenizer)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    modules: tuple[Any, ...] = (unet, vae, text_encoder)
    for m in modules:
        m.eval()
    return {"unet": unet, "scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def _fit_text_config(text_config: Any, tokenizer: Any) -> None:
    """The encoder's vocabulary and special ids from the tokenizer written for it (CLIP pools at its EOS id)."""
    text_config.vocab_size = len(tokenizer)
    text_config.bos_token_id = tokenizer.bos_token_id
    text_config.eos_token_id = tokenizer.eos_token_id
    text_config.pad_token_id = tokenizer.pad_token_id


def build_tiny_sdxl_components(seed: int = 0, sample_size: int = 16, folder: str | Path | None = None) -> dict:
    """Random-weights SDXL components (fixed seed); tokenizers are written under `folder` first. Latents are
    (4, sample_size, sample_size), images 2x that. Text encoders of width 16 each (embeddings (77, 32)), a pooled
    projection of 16, time ids embedded at 4 per id: the UNet's added embedding takes 6 x 4 + 16 = 40."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if folder is None:
        raise ValueError("folder is required: the tokenizers are written to disk first")
    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=40,
        cross_attention_dim=32, norm_num_groups=4,
    )
    # SDXL base's scheduler config
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=sample_size * 2, scaling_factor=0.13025,
                        force_upcast=True)
    write_word_tokenizer(folder / "tokenizer", BASE_WORDS)
    write_word_tokenizer(folder / "tokenizer_2", BASE_WORDS, pad_token="!")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    encoders = []
    for cls, tok in ((CLIPTextModel, tokenizer), (CLIPTextModelWithProjection, tokenizer_2)):
        config = CLIPTextConfig(hidden_size=16, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=2,
                                num_hidden_layers=2, max_position_embeddings=77, projection_dim=16, hidden_act="gelu")
        _fit_text_config(config, tok)
        torch.manual_seed(seed)
        encoders.append(cls(config).eval())
    modules: tuple[Any, ...] = (unet, vae)
    for m in modules:
        m.eval()
    return {"unet": unet, "scheduler": scheduler, "vae": vae, "text_encoder": encoders[0],
            "text_encoder_2": encoders[1], "tokenizer": tokenizer, "tokenizer_2": tokenizer_2}


def make_tiny_model(folder: str | Path, seed: int = 0, sample_size: int = 16, family: TinyFamily = "sd") -> Path:
    """Write the tiny model of `family` as a standard diffusers folder with safetensors weights. Returns the
    folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family not in TINY_FAMILIES:
        raise ValueError(f"family: got {family!r}; allowed: {', '.join(TINY_FAMILIES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe: Any
    if family in ("flux", "flux-schnell"):
        from difflens.engine.tiny_flux import write_tiny_flux

        return write_tiny_flux(folder, seed, sample_size, guidance_embeds=family == "flux")
    if family == "sd3":
        from difflens.engine.tiny_sd3 import write_tiny_sd3

        return write_tiny_sd3(folder, seed, sample_size)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**build_tiny_sdxl_components(seed, sample_size, folder),
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        comps = build_tiny_components(seed, sample_size, tokenizer_dir=folder / "tokenizer")
        pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_flow_vae(sample_size: int, scaling_factor: float, shift_factor: float) -> Any:
    """The tiny models' VAE for the flow-matching families (SD3, FLUX): 4 latent channels, a factor 2, and the
    family's own scaling and shift (the real VAEs' values), without the quant convolutions those VAEs drop.
    Built from torch's current seed, as its callers draw it."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=4, sample_size=sample_size * 2,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
                         use_post_quant_conv=False)
