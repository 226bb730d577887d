"""A tiny random-weights FLUX.1 model (FluxPipeline layout), built in code and written locally (no hub): the
transformer with one double-stream and two single-stream blocks at a width of 32, CLIP and T5 encoders of width
32, a VAE with FLUX's shift and scale, FLUX's flow-matching scheduler. "dev"-like (guidance_embeds, dynamic shift)
or "schnell"-like (no guidance input, a fixed shift of 1).

The T5 tokenizer is a `tokenizers` Unigram model saved as tokenizer.json (no sentencepiece file): each word of
tiny.BASE_WORDS is one "▁word" piece, any other text falls back to "▁" and single characters, and "</s>" closes
the sequence, as T5's tokenizer does.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

from difflens.engine.tiny import BASE_WORDS, _fit_text_config, tiny_flow_vae, write_word_tokenizer

T5_LENGTH = 512  # FluxPipeline's max_sequence_length for FLUX-dev, T5's model_max_length here
WIDTH = 32  # the encoders' hidden sizes: T5's d_model is the transformer's joint_attention_dim, CLIP's its pooled


def write_t5_tokenizer(folder: str | Path, words: tuple[str, ...] = tuple(BASE_WORDS),
                       model_max_length: int = T5_LENGTH) -> None:
    """Write a T5 tokenizer (tokenizer.json and its config) in which every word of `words` is one piece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)] + [("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    T5Tokenizer(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                    model_max_length=model_max_length).save_pretrained(folder)


def build_tiny_flux_components(folder: str | Path, seed: int = 0, sample_size: int = 16,
                               guidance_embeds: bool = True) -> dict[str, Any]:
    """Random-weights FLUX components (fixed seed); tokenizers are written under `folder` first. Latents are
    (4, sample_size, sample_size), images 2x that; the transformer takes 2 x 2 patches of them, 16 channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=WIDTH, pooled_projection_dim=WIDTH,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    if guidance_embeds:  # FLUX.1-dev's scheduler: resolution-dependent shift
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    torch.manual_seed(seed)
    vae = tiny_flow_vae(sample_size, scaling_factor=0.3611, shift_factor=0.1159)
    write_word_tokenizer(folder / "tokenizer", BASE_WORDS)
    write_t5_tokenizer(folder / "tokenizer_2")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = T5Tokenizer.from_pretrained(folder / "tokenizer_2")
    clip_config = CLIPTextConfig(hidden_size=WIDTH, intermediate_size=37, layer_norm_eps=1e-05,
                                 num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77)
    _fit_text_config(clip_config, tokenizer)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_config)
    t5_config = T5Config(vocab_size=len(tokenizer_2), d_model=WIDTH, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                         relative_attention_num_buckets=8, pad_token_id=tokenizer_2.pad_token_id,
                         eos_token_id=tokenizer_2.eos_token_id)
    torch.manual_seed(seed)
    text_encoder_2 = T5EncoderModel(t5_config)
    modules: tuple[Any, ...] = (transformer, vae, text_encoder, text_encoder_2)
    for m in modules:
        m.eval()
    return {"transformer": transformer, "scheduler": scheduler, "vae": vae, "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2}


def write_tiny_flux(folder: str | Path, seed: int = 0, sample_size: int = 16, guidance_embeds: bool = True) -> Path:
    """Write the tiny FLUX model as a FluxPipeline folder with safetensors weights and a difflens.json of the
    variant's sampling defaults (dev: 28 steps at guidance 3.5; schnell: 4 steps) at the tiny size. Returns the
    folder."""
    from diffusers import FluxPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe: Any = FluxPipeline(**build_tiny_flux_components(folder, seed, sample_size, guidance_embeds))
    pipe.save_pretrained(folder, safe_serialization=True)
    side = sample_size * 2
    defaults = {"scheduler": "euler", "steps": 28 if guidance_embeds else 4,
                "guidance_scale": 3.5 if guidance_embeds else 0.0, "width": side, "height": side}
    (folder / "difflens.json").write_text(json.dumps(defaults, indent=2) + "\n")
    return folder
