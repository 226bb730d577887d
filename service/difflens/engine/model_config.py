"""What a model folder's config files say, read without torch: the model's family (model_index.json), the sampling
defaults (difflens.json), the JSON config reader, and the module paths DF-CAM accepts, derived from the UNet's config
the way diffusers builds the UNet from it. The gRPC front works from these alone (it loads no weights and imports no
torch); the engine's loader uses the same readers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from difflens.errors import InvalidArgument, ModelLoadError

DEFAULTS_FILE = "difflens.json"  # recommended sampling defaults, beside model_index.json


@dataclass(frozen=True)
class ModelDefaults:
    """Sampling defaults used when a request leaves a field unset. SD's usual values unless the folder says."""

    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    width: int | None = None  # None: unet.sample_size * vae_scale_factor
    height: int | None = None
    # The largest width or height a request may ask of this model, where the folder caps it below the
    # deployment's limit (a model trained at 32 px has nothing to give at 1024, and one step there takes hours).
    max_side: int | None = None

    @classmethod
    def read(cls, folder: Path, size_multiple: int = 8, unet_side: int = 0) -> ModelDefaults:
        """The folder's defaults file, checked as a request's fields are (so that a bad file stops the model at
        load, not every request that leaves a field unset); `size_multiple`: what width and height must divide
        by; `unet_side`: the UNet's own size in pixels, what an unset width or height means. ModelLoadError naming
        the file and the field. A flow-matching model's scheduler default is "euler" (the only one it takes),
        and a file naming another is refused."""
        f = folder / DEFAULTS_FILE
        allowed = _allowed_schedulers(folder)
        steps, guidance = _family_sampling(folder)
        base = cls(steps=steps, guidance_scale=guidance,
                   scheduler=cls.scheduler if cls.scheduler in allowed else allowed[0])
        if not f.exists():
            return base
        try:
            raw = json.loads(f.read_text())
        except ValueError as e:
            raise ModelLoadError(str(f), f"malformed defaults file: {e}") from e
        if not isinstance(raw, dict):
            raise ModelLoadError(str(f), f"malformed defaults file: expected a JSON object, got {type(raw).__name__}")
        fields = ("steps", "guidance_scale", "scheduler", "width", "height", "max_side")
        unknown = sorted(set(raw) - set(fields))
        if unknown:  # a misspelt key would silently fall back to SD's defaults (guidance 7.5 for "guidance")
            raise ModelLoadError(str(f), f"malformed defaults file: unknown key(s) {', '.join(map(repr, unknown))}; "
                                         f"allowed: {', '.join(fields)}")
        known = {k: raw[k] for k in fields if k in raw}
        problem = _defaults_problem(known, size_multiple, unet_side)
        if not problem and known.get("scheduler", base.scheduler) not in allowed:
            problem = f"scheduler: got {known['scheduler']!r}; this model's scheduler allows: {', '.join(allowed)}"
        if problem:
            raise ModelLoadError(str(f), f"malformed defaults file: {problem}")
        return dataclasses.replace(base, **known)


def _family_sampling(folder: Path) -> tuple[int, float]:
    """(steps, guidance_scale) the folder's family's pipeline defaults to (FamilySpec); SD's where model_index.json
    is missing, unreadable or names no known family (the loader and the catalog report that file themselves). A
    FLUX transformer without a guidance input (FLUX.1-schnell) samples in 4 steps, as its model card says."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
        family = family_of(index, folder / "model_index.json") if isinstance(index, dict) else SD
    except (OSError, ValueError, ModelLoadError):
        return ModelDefaults.steps, ModelDefaults.guidance_scale
    if family.name == "flux":
        try:
            config = json.loads((folder / family.denoiser / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        if isinstance(config, dict) and config.get("guidance_embeds") is False:
            return 4, family.guidance_scale
    return family.steps, family.guidance_scale


def _allowed_schedulers(folder: Path) -> tuple[str, ...]:
    """The request scheduler names the folder's scheduler config takes (schedule.schedulers_for); all of them
    where the config is missing or unreadable (the loader and the catalog report that file themselves)."""
    from difflens.engine.options import SCHEDULERS
    from difflens.engine.schedule import schedulers_for

    try:
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return SCHEDULERS
    return schedulers_for(config) if isinstance(config, dict) else SCHEDULERS


def _defaults_problem(d: dict[str, Any], size_multiple: int, unet_side: int = 0) -> str | None:
    """What is wrong with a defaults file's fields, or None: their types here, their ranges a request's own
    (GenerationParams checks them), and width/height against the model's size multiple."""
    from difflens.engine.options import GenerationParams

    for key in ("steps", "width", "height", "max_side"):
        v = d.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            return f"{key}: got {v!r}; must be an integer"
    g = d.get("guidance_scale")
    if g is not None and (isinstance(g, bool) or not isinstance(g, int | float)):
        return f"guidance_scale: got {g!r}; must be a number"
    try:
        GenerationParams("", steps=d.get("steps"), guidance_scale=d.get("guidance_scale"), scheduler=d.get("scheduler"))
    except InvalidArgument as e:
        return str(e)
    for side in ("width", "height"):
        v = d.get(side)
        if v is not None and not (v > 0 and v % size_multiple == 0):
            return f"{side}: got {v!r}; must be a positive multiple of {size_multiple} (or null: the UNet's size)"
    top = d.get("max_side")
    if top is not None:
        least = max(size_multiple, d.get("width") or unet_side, d.get("height") or unet_side)
        if top < least:
            return f"max_side: got {top}; must be at least {least} (the size multiple and the default width and height)"
    return None



def sample_size(denoiser_config: Any) -> int:
    """The denoiser's latent side when a request sets no size: its config's sample_size; FLUX's transformer
    config has none, and FluxPipeline's default_sample_size is 128 (1024 px at a VAE factor of 8)."""
    return int(denoiser_config.get("sample_size", 128))


def read_json_object(path: Path) -> dict[str, Any]:
    """A config file holding one JSON object; errors name the file and what is wrong with it."""
    if not path.exists():
        raise ModelLoadError(str(path), "missing")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ModelLoadError(str(path), f"malformed JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(str(path), "must hold a JSON object")
    return data



# ---------------------------------------------------------------- model families


@dataclass(frozen=True)
class FamilySpec:
    """What a family's folder holds, as its model_index.json declares it (the torch side is engine/families.py).

    `pipelines`: the model_index.json `_class_name`s that mean this family (`cfg`: whether it guides with a
    negative branch). `denoiser`: the component that predicts
    the noise (SD3 and FLUX: "transformer"). `text_encoders` / `tokenizers`: in the order the family encodes a
    prompt, each encoder with the transformers class it is loaded as; the first tokenizer sets the prompt-token
    limit and splits the prompt into the words the attention maps are labelled with. `vae` may be [null, null]
    (pixel-space models) in every family.
    """

    name: str
    pipelines: tuple[str, ...]
    text_encoders: tuple[tuple[str, str], ...]
    tokenizers: tuple[str, ...]
    denoiser: str = "unet"
    status: Literal["supported", "next"] = "supported"
    # Components a folder may declare [null, null] (SD3's T5: text_encoder_3, tokenizer_3): `present` drops them.
    optional: tuple[str, ...] = ()
    cfg: bool = True  # classifier-free guidance over a negative branch; False: one branch (FLUX)
    # What the family's diffusers pipeline samples with when a call leaves them out: a folder without a difflens.json
    # gets these, not SD's (SDXL 50 at 5.0, SD3 28 at 7.0, FLUX.1-dev 28 at 3.5; FLUX.1-schnell, no guidance input, 4)
    steps: int = 50
    guidance_scale: float = 7.5

    @property
    def required(self) -> tuple[str, ...]:
        """Components model_index.json must declare."""
        return (self.denoiser, "scheduler", *(name for name, _ in self.text_encoders), *self.tokenizers)

    def present(self, index: dict[str, Any]) -> FamilySpec:
        """This family as a folder's model_index.json declares it: the optional components it declares [null, null]
        (or not at all) dropped from its encoders and tokenizers, so that they are neither required nor loaded."""
        gone = {name for name in self.optional
                if not (isinstance(index.get(name), list) and None not in index[name] and len(index[name]) == 2)}
        if not gone:
            return self
        return dataclasses.replace(self, text_encoders=tuple(e for e in self.text_encoders if e[0] not in gone),
                                   tokenizers=tuple(t for t in self.tokenizers if t not in gone))


FAMILIES: dict[str, FamilySpec] = {f.name: f for f in (
    # SD 1.x / 2.x, and the pixel-space layout of models/shapes (the same pipeline with vae [null, null])
    FamilySpec("sd", ("StableDiffusionPipeline",), (("text_encoder", "CLIPTextModel"),), ("tokenizer",)),
    FamilySpec("sdxl", ("StableDiffusionXLPipeline",),
               (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")),
               ("tokenizer", "tokenizer_2"), guidance_scale=5.0),
    # SD3 / SD3.5: CLIP first (its 77 positions open the embeddings: the attention maps' words), T5 optional
    FamilySpec("sd3", ("StableDiffusion3Pipeline",),
               (("text_encoder", "CLIPTextModelWithProjection"), ("text_encoder_2", "CLIPTextModelWithProjection"),
                ("text_encoder_3", "T5EncoderModel")),
               ("tokenizer", "tokenizer_2", "tokenizer_3"), denoiser="transformer",
               optional=("text_encoder_3", "tokenizer_3"), steps=28, guidance_scale=7.0),
    # FLUX: T5 first, as its sequence is the embeddings the attention maps' words index (CLIP gives the pooled
    # vector only); guidance-distilled, one branch: no negative prompt
    FamilySpec("flux", ("FluxPipeline",), (("text_encoder_2", "T5EncoderModel"), ("text_encoder", "CLIPTextModel")),
               ("tokenizer_2", "tokenizer"), denoiser="transformer", cfg=False, steps=28, guidance_scale=3.5),
)}
SD = FAMILIES["sd"]


def supported_pipelines() -> str:
    """'StableDiffusionPipeline (sd), StableDiffusionXLPipeline (sdxl)': what an error lists as allowed."""
    return ", ".join(f"{p} ({f.name})" for f in FAMILIES.values() if f.status == "supported" for p in f.pipelines)


def family_of(index: dict[str, Any], index_path: Path) -> FamilySpec:
    """The family model_index.json's `_class_name` names. ModelLoadError naming the file and the field for a
    missing, unknown or not yet supported pipeline class, listing the supported ones."""
    name = index.get("_class_name")
    for family in FAMILIES.values():
        if name in family.pipelines:
            if family.status != "supported":
                raise ModelLoadError(str(index_path), f"_class_name: {name!r} ({family.name}) is not supported yet; "
                                                      f"supported: {supported_pipelines()}")
            return family
    got = "missing" if name is None else f"{name!r} is not a supported pipeline"
    raise ModelLoadError(str(index_path), f"_class_name: {got}; supported: {supported_pipelines()}")



# ---------------------------------------------------------------- DF-CAM's layer paths

# The reference's module set: resnets, attentions (Transformer2DModel) and samplers of the down, mid and up blocks.
LAYER_PATTERN = re.compile(
    r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|attentions|downsamplers|upsamplers)\.\d+")
BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
# A transformer denoiser's blocks (FLUX: double-stream, then single-stream; SD3: joint blocks), in forward order.
TRANSFORMER_LAYER_PATTERN = re.compile(r"(transformer_blocks|single_transformer_blocks)\.\d+")

# Per block type of UNet2DConditionModel: whether each layer has an attention module beside its resnet. Within a
# block diffusers registers attentions before resnets and the sampler last; camable_layers lists modules in that
# registration order, and the paths below follow it (a test builds each type on the meta device and compares).
_DOWN_BLOCKS = {"DownBlock2D": False, "ResnetDownsampleBlock2D": False, "CrossAttnDownBlock2D": True,
                "SimpleCrossAttnDownBlock2D": True, "AttnDownBlock2D": True}
_UP_BLOCKS = {"UpBlock2D": False, "ResnetUpsampleBlock2D": False, "CrossAttnUpBlock2D": True,
              "SimpleCrossAttnUpBlock2D": True, "AttnUpBlock2D": True}
# mid block type -> (resnets, attentions): the cross-attention mid blocks have one layer (two resnets around one
# attention); UNetMidBlock2D is built with no layers and no attention (one resnet).
_MID_BLOCKS: dict[str | None, tuple[int, int]] = {"UNetMidBlock2DCrossAttn": (2, 1),
                                                  "UNetMidBlock2DSimpleCrossAttn": (2, 1),
                                                  "UNetMidBlock2D": (1, 0), None: (0, 0)}


def _per_block(config: dict[str, Any], key: str, n: int) -> list[int]:
    value = config.get(key, 2 if key == "layers_per_block" else 1)
    values = [value] * n if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(values, list | tuple) and len(values) == n
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)):
        raise ValueError(f"{key}: got {value!r}; expected an integer >= 1 or a list of {n} of them")
    return list(values)


def _block_paths(prefix: str, attention: bool, layers: int, sampler: str | None) -> list[str]:
    paths = [f"{prefix}.attentions.{j}" for j in range(layers)] if attention else []
    paths += [f"{prefix}.resnets.{j}" for j in range(layers)]
    return paths + ([f"{prefix}.{sampler}.0"] if sampler else [])


def transformer_layer_paths(config: dict[str, Any]) -> tuple[str, ...]:
    """Every block path DF-CAM accepts on a transformer denoiser built from `config`: transformer_blocks.0 ..
    num_layers - 1, then single_transformer_blocks.0 .. num_single_layers - 1 (FLUX's; absent: none), the order
    engine.cam.camable_layers lists them in. ValueError naming the key for a count that is not an integer >= 0."""
    counts = {key: config.get(key, 0) for key in ("num_layers", "num_single_layers")}
    for key, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{key}: got {n!r}; expected an integer >= 0")
    return (*(f"transformer_blocks.{i}" for i in range(counts["num_layers"])),
            *(f"single_transformer_blocks.{i}" for i in range(counts["num_single_layers"])))


def cam_layer_paths(unet_config: dict[str, Any]) -> tuple[str, ...]:
    """Every module path DF-CAM accepts on a UNet2DConditionModel built from `unet_config` (its config.json), in
    engine.cam.camable_layers' order: down, mid, then up blocks; on a transformer denoiser's config (num_layers, no
    down blocks: FLUX, SD3), `transformer_layer_paths`. ValueError naming the key for a config diffusers'
    UNet2DConditionModel would not build this way (an unknown block type, mismatched list lengths)."""
    if "down_block_types" not in unet_config and "num_layers" in unet_config:
        return transformer_layer_paths(unet_config)
    down = list(unet_config.get("down_block_types") or ())
    up = list(unet_config.get("up_block_types") or ())
    n = len(down)
    if n == 0 or len(up) != n:
        raise ValueError(f"down_block_types / up_block_types: got {n} and {len(up)} blocks; expected the same "
                         "number, at least one")
    layers = _per_block(unet_config, "layers_per_block", n)
    paths: list[str] = []
    for i, kind in enumerate(down):
        if kind not in _DOWN_BLOCKS:
            raise ValueError(f"down_block_types[{i}]: {kind!r} is not supported; supported: {', '.join(_DOWN_BLOCKS)}")
        paths += _block_paths(f"down_blocks.{i}", _DOWN_BLOCKS[kind], layers[i],
                              "downsamplers" if i < n - 1 else None)
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in _MID_BLOCKS:
        raise ValueError(f"mid_block_type: {mid!r} is not supported; supported: "
                         f"{', '.join(str(k) for k in _MID_BLOCKS)}")
    resnets, attentions = _MID_BLOCKS[mid]
    paths += [f"mid_block.attentions.{j}" for j in range(attentions)]
    paths += [f"mid_block.resnets.{j}" for j in range(resnets)]
    reversed_layers = layers[::-1]
    for i, kind in enumerate(up):
        if kind not in _UP_BLOCKS:
            raise ValueError(f"up_block_types[{i}]: {kind!r} is not supported; supported: {', '.join(_UP_BLOCKS)}")
        paths += _block_paths(f"up_blocks.{i}", _UP_BLOCKS[kind], reversed_layers[i] + 1,
                              "upsamplers" if i < n - 1 else None)
    return tuple(paths)
