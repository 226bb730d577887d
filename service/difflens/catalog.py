"""The model catalog: what the front needs to know about each served model, from its config files alone (no
weights, no torch: the front's image carries neither).

Per configured name: the family (model_index.json's `_class_name`; an unknown one is refused as the worker's loader
refuses it), the recommended defaults (difflens.json), the image size multiple (VAE factor x 8, or 8 for a
pixel-space model, as engine.validate requires), the module paths DF-CAM accepts (derived from the UNet's
config.json as diffusers builds the UNet), the tokenizer (read with the `tokenizers` package: the prompt-token
limit and the prompt's words) and the scheduler's num_train_timesteps. Built once at start-up; a broken folder
fails there with ModelLoadError naming it.

A family with several tokenizers (SDXL: tokenizer, tokenizer_2) is described by its first: SDXL's attention layers
see both encoders' embeddings concatenated per token position, and both tokenizers split a prompt into the same
positions (one CLIP vocabulary; only the padding differs), so the first one's limit and words are the model's.
FLUX's first is its T5 tokenizer (tokenizer_2): T5's sequence is what its transformer attends to, CLIP gives only a
pooled vector, so the limit is T5's 512 less its end token and the words are T5's. The others are read too, so that
a broken one stops the front at start-up as it would stop a worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflens.config import ServiceSettings
from difflens.engine.model_config import SD, FamilySpec, ModelDefaults, cam_layer_paths, family_of, read_json_object
from difflens.engine.model_config import sample_size as model_sample_size
from difflens.errors import InvalidArgument, ModelLoadError, shown

LATENT_MULTIPLE = 8  # the UNet's three downsamplings: latent sides must be multiples of 8


@dataclass(frozen=True)
class CatalogModel:
    """One served model, described from its config files. Exposes the same geometry attributes as
    engine.loading.Model (defaults, vae_scale_factor, size_multiple, default_size, num_train_timesteps,
    scheduler_config), so the engine's own request resolution runs on it unchanged."""

    name: str
    folder: Path
    defaults: ModelDefaults
    vae_scale_factor: int
    sample_size: int
    cam_layers: tuple[str, ...]
    tokenizer: Any
    num_train_timesteps: int
    scheduler_config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    family: FamilySpec = SD

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * LATENT_MULTIPLE

    @property
    def default_size(self) -> tuple[int, int]:
        side = self.sample_size * self.vae_scale_factor
        return (self.defaults.width or side, self.defaults.height or side)

    @property
    def max_prompt_tokens(self) -> int:
        """Words-pieces the text encoder sees, BOS and EOS excluded (75 for CLIP, 511 for FLUX's T5)."""
        return int(self.tokenizer.model_max_length) - self.tokenizer.num_special_tokens

    def prompt_token_count(self, text: str) -> int:
        """Tokens of `text`, BOS/EOS excluded, untruncated (so an over-long prompt is seen as such)."""
        return max(0, len(self.tokenizer(text, truncation=False).input_ids) - self.tokenizer.num_special_tokens)


def _has_vae(index: dict[str, Any]) -> bool:
    entry = index.get("vae")
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def describe(name: str, folder: str | Path) -> CatalogModel:
    """Read one model folder's configs and tokenizer files (no weights). Raises ModelLoadError naming the file at
    fault."""
    from difflens.text_tokenizer import FileTokenizer

    root = Path(folder).resolve()
    index = read_json_object(root / "model_index.json")
    family = family_of(index, root / "model_index.json").present(index)
    unet_config = read_json_object(root / family.denoiser / "config.json")
    scheduler_config = read_json_object(root / "scheduler" / "scheduler_config.json")
    factor = 1
    if _has_vae(index):
        channels = read_json_object(root / "vae" / "config.json").get("block_out_channels", [])
        factor = 2 ** (len(channels) - 1) if channels else 1
    try:
        layers = cam_layer_paths(unet_config)
    except ValueError as e:
        raise ModelLoadError(str(root / family.denoiser / "config.json"),
                             f"cannot derive the UNet's layers: {e}") from e
    tokenizer, *others = (FileTokenizer(root / t) for t in family.tokenizers)
    del others  # read to fail here if broken; the first tokenizer speaks for the model (module docstring)
    # a transformer's config may lack sample_size (FLUX's): the loader's default then, not a UNet's 64
    unet = family.denoiser == "unet"
    sample_size = int(unet_config.get("sample_size", 64)) if unet else model_sample_size(unet_config)
    return CatalogModel(name=name, folder=root, defaults=ModelDefaults.read(root, 8 * factor, sample_size * factor),
                        vae_scale_factor=factor, sample_size=sample_size, cam_layers=layers, tokenizer=tokenizer,
                        num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
                        scheduler_config=scheduler_config, family=family)


class ModelCatalog:
    """name -> CatalogModel for every configured model; `default` is the name a request without one gets."""

    def __init__(self, models: dict[str, CatalogModel], default: str) -> None:
        if default not in models:
            raise ValueError(f"default model {default!r} is not among {sorted(models)}")
        self.models = models
        self.default = default

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ModelCatalog:
        """Every model of settings.model_dirs(). The default: settings.default_model when configured under that
        name, else the first configured model."""
        dirs = settings.model_dirs()
        models = {name: describe(name, folder) for name, folder in dirs.items()}
        default = settings.default_model if settings.default_model in models else next(iter(dirs))
        return cls(models, default)

    def names(self) -> list[str]:
        """The default first, then the others by name."""
        return [self.default] + sorted(n for n in self.models if n != self.default)

    def get(self, name: str) -> CatalogModel:
        """The model called `name` ('' = the default). Unknown: InvalidArgument('model') listing the names."""
        name = name or self.default
        if name not in self.models:
            raise InvalidArgument("model", f"unknown model {shown(name)}; available: {', '.join(self.names())}")
        return self.models[name]
