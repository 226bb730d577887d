"""Architecture configs of the shapes model, building its components, and saving them as a diffusers folder.

The model is pixel-space (no VAE): a UNet2DConditionModel on (3, S, S) RGB in [-1, 1], a small CLIP text encoder
trained jointly with it, a CLIP tokenizer in which every caption word is one token, and a cosine-schedule
DDIM scheduler. Saved with StableDiffusionPipeline.save_pretrained (model_index.json lists vae as null), so
`difflens.engine.loading.load_model` loads it like any SD folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflens.engine.loading import DEFAULTS_FILE
from difflens.engine.tiny import write_word_tokenizer
from difflens.scenes.captions import VOCABULARY


@dataclass(frozen=True)
class ArchConfig:
    """UNet and text-encoder shape. `cross_levels[i]`: level i (resolution S / 2**i) has cross-attention."""

    sample_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64, 64)
    cross_levels: tuple[bool, ...] = (False, True, True, True)
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 16
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    max_tokens: int = 24  # the longest caption (two objects) is 17 words + BOS + EOS

    def __post_init__(self) -> None:
        if len(self.block_out_channels) != len(self.cross_levels):
            raise ValueError("cross_levels: one flag per entry of block_out_channels")
        if self.sample_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"sample_size {self.sample_size} does not halve {len(self.block_out_channels) - 1} times")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArchConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown arch fields: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


ARCHS: dict[str, ArchConfig] = {
    # Four levels (32, 16, 8, 4): at 4 x 4 every position sees the zero-padded border, so "left" / "top" can be
    # told apart; cross-attention at 16, 8 and 4 (and the mid block at 4) binds position words coarsely.
    "deep4": ArchConfig(),
    # The quick trial's set-up (three levels, cross-attention at 16 and 8): position at chance.
    "trial3": ArchConfig(block_out_channels=(32, 64, 64), cross_levels=(False, True, True), norm_num_groups=32),
    "deep4-wide": ArchConfig(block_out_channels=(32, 64, 64, 96)),
    "deep4-lite": ArchConfig(cross_levels=(False, False, True, True)),
    "deep4-2layer": ArchConfig(layers_per_block=2),
    # deep4 drew objects at the five places at random, whatever the position word said. Five levels end at
    # 2 x 2, where every cell is a corner and a 3 x 3 convolution's zero padding gives each one a different code;
    # cross-attention there (and in the mid block) can bind "left" / "top" to those cells.
    "deep5": ArchConfig(block_out_channels=(32, 64, 64, 64, 64), cross_levels=(False, True, True, True, True)),
    # For tests: builds and steps in well under a second.
    "tiny": ArchConfig(block_out_channels=(8, 16, 16, 16), cross_levels=(False, False, True, True),
                       attention_heads=2, norm_num_groups=4, text_hidden=16, text_heads=2, text_intermediate=32),
}


def resolve_arch(name_or_path: str) -> ArchConfig:
    """A preset name from ARCHS, or the path of a JSON file with ArchConfig fields."""
    if name_or_path in ARCHS:
        return ARCHS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"--arch: {name_or_path!r} is neither a preset ({', '.join(ARCHS)}) nor a JSON file")
    return ArchConfig.from_json(json.loads(path.read_text()))


def build_unet(arch: ArchConfig):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in arch.cross_levels)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(arch.cross_levels))
    return UNet2DConditionModel(
        sample_size=arch.sample_size, in_channels=3, out_channels=3,
        down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if arch.cross_levels[-1] else None,
        block_out_channels=arch.block_out_channels, layers_per_block=arch.layers_per_block,
        cross_attention_dim=arch.text_hidden, attention_head_dim=arch.attention_heads,  # diffusers: = head count
        norm_num_groups=arch.norm_num_groups,
    )


def build_tokenizer(folder: str | Path, arch: ArchConfig):
    """Write the caption-vocabulary tokenizer to `folder` and load it."""
    from transformers import CLIPTokenizer

    write_word_tokenizer(folder, VOCABULARY, model_max_length=arch.max_tokens)
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def build_text_encoder(arch: ArchConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_hidden, intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.max_tokens, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def cosine_betas(num_steps: int, terminal_alpha_bar: float, s: float = 0.008) -> list[float]:
    """Betas of the cosine schedule (Nichol & Dhariwal) stopped where alpha_bar reaches `terminal_alpha_bar`.

    alpha_bar(t) = f(tau * t / T) / f(0), f(u) = cos^2((u + s) / (1 + s) * pi / 2), with tau < 1 chosen so that
    alpha_bar(T) = terminal_alpha_bar. Plain squaredcos_cap_v2 is tau = 1 and ends at ~2e-9.
    """
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    tau = (1 + s) * 2 / math.pi * math.acos(math.sqrt(terminal_alpha_bar * f0)) - s

    def alpha_bar(i: int) -> float:
        return math.cos((tau * i / num_steps + s) / (1 + s) * math.pi / 2) ** 2 / f0

    return [1 - alpha_bar(i + 1) / alpha_bar(i) for i in range(num_steps)]


def build_noise_scheduler(terminal_alpha_bar: float | None = None, prediction_type: str = "epsilon"):
    """The training scheduler: 1000 steps, cosine betas, epsilon (or v) prediction.

    terminal_alpha_bar None: diffusers' squaredcos_cap_v2 (terminal alpha_bar ~2e-9, i.e. zero terminal SNR);
    else the same curve stopped at that alpha_bar (see `cosine_betas`).
    """
    from diffusers import DDPMScheduler

    kw: dict[str, Any] = {"beta_schedule": "squaredcos_cap_v2"} if terminal_alpha_bar is None else \
        {"trained_betas": cosine_betas(1000, terminal_alpha_bar)}
    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False, **kw)


def sampling_scheduler(train_scheduler):
    """The scheduler saved with the model: DDIM on the training betas, x0 clipped to the pixel range [-1, 1]."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(train_scheduler.config, clip_sample=True, clip_sample_range=1.0,
                                     set_alpha_to_one=True, steps_offset=1, timestep_spacing="trailing")


def build_components(arch: ArchConfig, tokenizer_dir: str | Path, seed: int = 0,
                     terminal_alpha_bar: float | None = None, prediction_type: str = "epsilon") -> dict[str, Any]:
    """Fresh components (fixed seed): unet, text_encoder, tokenizer, noise_scheduler."""
    torch.manual_seed(seed)
    unet = build_unet(arch)
    tokenizer = build_tokenizer(tokenizer_dir, arch)
    torch.manual_seed(seed + 1)
    text_encoder = build_text_encoder(arch, tokenizer)
    return {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "noise_scheduler": build_noise_scheduler(terminal_alpha_bar, prediction_type)}


def save_model(folder: str | Path, unet, text_encoder, tokenizer, train_scheduler, defaults: dict[str, Any],
               extra: dict[str, Any] | None = None) -> Path:
    """Write a standard diffusers folder (safetensors, vae null) plus difflens.json with sampling defaults.

    `extra` (training config, measured accuracy) goes to training.json beside it, for the record.
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scheduler = sampling_scheduler(train_scheduler)
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=type(scheduler).from_config(scheduler.config, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]
    # The pipeline's constructor forces clip_sample off (with a warning; an SD v1 latent-space fix), but pixels
    # do want x0 clipped to [-1, 1]: the scheduler is written again as built.
    scheduler.save_pretrained(folder / "scheduler")
    (folder / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2) + "\n")
    if extra is not None:
        (folder / "training.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
    return folder


def count_parameters(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
