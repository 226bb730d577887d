"""Load a local diffusers model folder (model_index.json) of a supported family (SD 1.x/2.x and pixel-space UNets,
SDXL), offline and safetensors-only."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflens.engine.model_config import (
    DEFAULTS_FILE,
    SD,
    FamilySpec,
    ModelDefaults,
    family_of,
    read_json_object,
    sample_size,
)
from difflens.errors import InvalidArgument, ModelLoadError

__all__ = ["DEFAULTS_FILE", "Model", "ModelDefaults", "check_device", "load_model", "read_json_object"]

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Model:
    """The loaded components. `vae` is None for a pixel-space model (the UNet works on RGB directly). `unet` is
    the family's denoiser, `text_encoder` / `tokenizer` its first encoder and tokenizer; `components` holds the
    family's others by their model_index.json names (SDXL: text_encoder_2, tokenizer_2); `options` the pipeline's
    own settings from model_index.json (SDXL: force_zeros_for_empty_prompt)."""

    path: Path
    unet: Any
    scheduler: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any | None
    defaults: ModelDefaults = field(default_factory=ModelDefaults)
    family: FamilySpec = SD
    components: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (the VAE factor x 8)."""
        return self.vae_scale_factor * 8

    @property
    def default_size(self) -> tuple[int, int]:
        side = sample_size(self.unet.config) * self.vae_scale_factor
        return (self.defaults.width or side, self.defaults.height or side)

    # The UNet's first parameter, not ModelMixin.device/.dtype: those walk every module looking for diffusers'
    # group-offloading hooks (~1.3 ms each on the tiny model, called several times per job); difflens never
    # offloads, so a UNet's parameters share one device and dtype.
    @property
    def device(self) -> torch.device:
        return _first_parameter(self.unet).device

    @property
    def dtype(self) -> torch.dtype:
        return _first_parameter(self.unet).dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The scheduler's config with its `_class_name`, as scheduler_config.json has it (schedule.is_flow)."""
        return {**dict(self.scheduler.config), "_class_name": type(self.scheduler).__name__}


def _first_parameter(module: Any) -> torch.Tensor:
    p = next(module.parameters(), None)
    if p is None:
        raise ValueError(f"{type(module).__name__} has no parameters: its device and dtype are undefined")
    return p


def _read_index(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise ModelLoadError(str(folder), "folder does not exist")
    if not folder.is_dir():
        raise ModelLoadError(str(folder), "is not a folder (expected a diffusers model folder)")
    index = folder / "model_index.json"
    if not index.exists():
        raise ModelLoadError(str(folder), "no model_index.json: not a diffusers model folder")
    return read_json_object(index)


def _declared(index: dict[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


def _check_weights(folder: Path, name: str) -> None:
    sub = folder / name
    if not sub.is_dir():
        raise ModelLoadError(str(sub), f"component '{name}' is declared in model_index.json but its folder is missing")
    files = [p for p in sub.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelLoadError(
            str(sub),
            f"only pickle weights found ({', '.join(sorted(pickles))}); difflens loads safetensors only "
            "(convert them with safetensors first)",
        )
    raise ModelLoadError(str(sub), f"no .safetensors weights for component '{name}'")


def _load(what: str, path: Path, fn: Any) -> Any:
    try:
        return fn()
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ModelLoadError(str(path), f"cannot load {what}: {e}") from e


def check_device(device: str | torch.device) -> None:
    """InvalidArgument on "device" for a CUDA device this process cannot use (a CPU build of torch, or no such
    index), before anything is loaded onto it."""
    d = torch.device(device)
    if d.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise InvalidArgument("device", f"got {str(device)!r}; this process has no CUDA device (torch "
                                        f"{torch.__version__}, CUDA available: no); use cpu")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise InvalidArgument("device", f"got {str(device)!r}; allowed cuda:0..cuda:{torch.cuda.device_count() - 1}")


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Model:
    """Load the denoiser, scheduler, text encoders, tokenizers and (optional) vae of the folder's family
    (model_index.json's `_class_name`; an unknown or not yet supported one is refused, naming it).

    Never contacts a hub (local_files_only, HF_HUB_OFFLINE); refuses pickle weights. One copy of each weight in
    `dtype`, except an SDXL VAE that asks for float32 (force_upcast) under float16: it is loaded in float32, as
    StableDiffusionXLPipeline upcasts it to decode.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces beside local_files_only
    import diffusers
    import transformers
    from diffusers import AutoencoderKL

    from difflens.engine import families

    # Their per-file progress bars and "install accelerate" hints are noise in a service log.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    check_device(device)
    folder = Path(path).resolve()
    index = _read_index(folder)
    family = family_of(index, folder / "model_index.json").present(index)
    for name in family.required:
        if not _declared(index, name):
            raise ModelLoadError(str(folder / "model_index.json"), f"required component '{name}' is not declared")
    has_vae = _declared(index, "vae")
    for name in (family.denoiser, *(e for e, _ in family.text_encoders), *(("vae",) if has_vae else ())):
        _check_weights(folder, name)
    for name in ("scheduler", *family.tokenizers):
        if not (folder / name).is_dir():
            raise ModelLoadError(str(folder / name), f"component '{name}' folder is missing")

    kw: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    denoiser = _component_class(diffusers, index, family.denoiser, folder)
    unet = _load(family.denoiser, folder / family.denoiser,
                 lambda: denoiser.from_pretrained(folder / family.denoiser, torch_dtype=dtype, **kw))
    loaded: dict[str, Any] = {}
    for name, cls_name in family.text_encoders:
        cls = getattr(transformers, cls_name)
        loaded[name] = _load(name, folder / name,
                             lambda cls=cls, name=name: cls.from_pretrained(folder / name, dtype=dtype, **kw))
    for name in family.tokenizers:
        tokenizer = _component_class(transformers, index, name, folder)
        loaded[name] = _load(name, folder / name,
                             lambda name=name, cls=tokenizer: cls.from_pretrained(folder / name, local_files_only=True))
    scheduler = _load("scheduler", folder / "scheduler", lambda: _load_scheduler(folder / "scheduler", index))
    vae = None
    if has_vae:
        behaviour = families.FAMILIES[family.name]
        vae = _load("vae", folder / "vae",
                    lambda: AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype, **kw))
        if behaviour.upcast_vae and dtype == torch.float16 and vae.config.get("force_upcast", False):
            vae.to(torch.float32)  # it overflows in float16; the pipeline decodes in float32 too
    first_encoder, first_tokenizer = family.text_encoders[0][0], family.tokenizers[0]
    if _first_parameter(unet).dtype != dtype:  # diffusers 0.42 without accelerate leaves SD3's transformer float32
        unet.to(dtype)
    for module in (unet, vae, *(loaded[e] for e, _ in family.text_encoders)):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    options = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    model = Model(folder, unet, scheduler, loaded.pop(first_encoder), loaded.pop(first_tokenizer), vae,
                  ModelDefaults.read(folder, 8 * factor, sample_size(unet.config) * factor),
                  family=family, components=loaded, options=options)
    families.of(model).check(model)
    return model


def _component_class(library: Any, index: dict[str, Any], name: str, folder: Path) -> Any:
    """The class model_index.json names for component `name` (the denoiser: UNet2DConditionModel,
    FluxTransformer2DModel, ...; a tokenizer: CLIPTokenizer, T5TokenizerFast), from `library` (diffusers or
    transformers). ModelLoadError naming the file and the component for a class the library lacks."""
    cls_name = index[name][1]
    cls = getattr(library, cls_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(str(folder / "model_index.json"),
                             f"{name}: unknown class {cls_name!r} (not a {library.__name__} model class)")
    return cls


def _load_scheduler(sub: Path, index: dict[str, Any]) -> Any:
    import diffusers

    cls_name = index["scheduler"][1]
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(str(sub), f"unknown scheduler class {cls_name!r}")
    config_file = sub / "scheduler_config.json"
    if not config_file.exists():
        raise ModelLoadError(str(sub), "scheduler_config.json is missing")
    return cls.from_pretrained(sub, local_files_only=True)
