"""A tiny random-weights Stable Diffusion 3 model (StableDiffusion3Pipeline layout), built in code and written
locally (no hub): SD3Transformer2DModel with two joint blocks at a width of 16 (2 x 2 patches, the last block
context_pre_only as in SD3), two CLIP encoders with projection of different widths (16 and 8, zero-padded to T5's
32 as the pipeline pads them), an optional T5 of width 32 (its tokenizer a `tokenizers` model saved as
tokenizer.json, no sentencepiece file: tiny_flux.write_t5_tokenizer), a VAE with a shift factor and no quant
convolutions as SD3's, and SD3's flow-matching scheduler (shift 3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from difflens.engine.sd3 import T5_LENGTH
from difflens.engine.tiny import BASE_WORDS, _fit_text_config, tiny_flow_vae, write_word_tokenizer

T5_WIDTH = 32  # T5's d_model: the transformer's joint_attention_dim
CLIP_WIDTHS = (16, 8)  # text_encoder's and text_encoder_2's hidden sizes (24 < 32: the padding is exercised)
PROJECTION = 16  # each CLIP's projection_dim: pooled_projection_dim 32


def build_tiny_sd3_components(folder: str | Path, seed: int = 0, sample_size: int = 16,
                              t5: bool = True) -> dict[str, Any]:
    """Random-weights SD3 components (fixed seed); tokenizers are written under `folder` first. Latents are
    (4, sample_size, sample_size), images 2x that. `t5`: False leaves text_encoder_3 / tokenizer_3 out (None)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    from difflens.engine.tiny_flux import write_t5_tokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=2 * PROJECTION, pos_embed_max_size=sample_size)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3-medium's scheduler config
    torch.manual_seed(seed)
    vae = tiny_flow_vae(sample_size, scaling_factor=1.5305, shift_factor=0.0609)
    write_word_tokenizer(folder / "tokenizer", BASE_WORDS)
    write_word_tokenizer(folder / "tokenizer_2", BASE_WORDS, pad_token="!")
    tokenizers = [CLIPTokenizer.from_pretrained(folder / name) for name in ("tokenizer", "tokenizer_2")]
    encoders = []
    for width, tok in zip(CLIP_WIDTHS, tokenizers, strict=True):
        config = CLIPTextConfig(hidden_size=width, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=2,
                                num_hidden_layers=2, max_position_embeddings=77, projection_dim=PROJECTION,
                                hidden_act="gelu")
        _fit_text_config(config, tok)
        torch.manual_seed(seed)
        encoders.append(CLIPTextModelWithProjection(config).eval())
    text_encoder_3 = tokenizer_3 = None
    if t5:
        write_t5_tokenizer(folder / "tokenizer_3", model_max_length=T5_LENGTH)
        tokenizer_3 = T5Tokenizer.from_pretrained(folder / "tokenizer_3")  # transformers 5: the fast one
        t5_config = T5Config(vocab_size=len(tokenizer_3), d_model=T5_WIDTH, d_ff=37, d_kv=8, num_layers=2,
                             num_heads=4, relative_attention_num_buckets=8, pad_token_id=tokenizer_3.pad_token_id,
                             eos_token_id=tokenizer_3.eos_token_id)
        torch.manual_seed(seed)
        text_encoder_3 = T5EncoderModel(t5_config).eval()
    modules: tuple[Any, ...] = (transformer, vae)
    for m in modules:
        m.eval()
    return {"transformer": transformer, "scheduler": scheduler, "vae": vae, "text_encoder": encoders[0],
            "text_encoder_2": encoders[1], "text_encoder_3": text_encoder_3, "tokenizer": tokenizers[0],
            "tokenizer_2": tokenizers[1], "tokenizer_3": tokenizer_3}


def write_tiny_sd3(folder: str | Path, seed: int = 0, sample_size: int = 16, t5: bool = True) -> Path:
    """Write the tiny SD3 model as a StableDiffusion3Pipeline folder with safetensors weights (without T5:
    text_encoder_3 and tokenizer_3 declared [null, null]) and a difflens.json of SD3's sampling defaults (28 steps,
    guidance 7.0, the flow-matching Euler scheduler) at the tiny size. Returns the folder."""
    from diffusers import StableDiffusion3Pipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe: Any = StableDiffusion3Pipeline(**build_tiny_sd3_components(folder, seed, sample_size, t5))
    pipe.save_pretrained(folder, safe_serialization=True)
    side = sample_size * 2
    defaults = {"scheduler": "euler", "steps": 28, "guidance_scale": 7.0, "width": side, "height": side}
    (folder / "difflens.json").write_text(json.dumps(defaults, indent=2) + "\n")
    return folder
