"""The model registry: each configured model loaded once per process, by name, and shared by every job thread.

A worker (or `difflens serve --embedded`) asks for a model by the name a request carries; the first request loads
it with the engine's settings (device, dtype) and builds its UNet runner with the configured backend, so a
compiled UNet is compiled once per process. Every user of a loaded model shares one `RWLock` over its UNet module:
plain UNet calls (denoising, DF-RISE batches) hold it shared; DF-CAM and the attention maps hold it exclusively,
because their hooks and attention processors sit on the module every thread calls.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difflens.config import ServiceSettings
from difflens.errors import InvalidArgument

if TYPE_CHECKING:  # torch stays out of this module's import: the gRPC front only needs the names
    from difflens.engine.loading import Model
    from difflens.engine.runner import UNetRunner

WEIGHT_SUFFIX = ".safetensors"
_CHUNK = 1 << 20


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers, so a DF-CAM job is not starved by a
    stream of denoising calls. Not re-entrant: a thread holding it must not acquire it again."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            while self._writer or self._writers_waiting:
                self._cv.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                if self._readers == 0:
                    self._cv.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cv.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cv:
                self._writer = False
                self._cv.notify_all()


@dataclass
class LoadedModel:
    """A model ready for jobs. `runner` is the process's base runner (backend from the settings); `lock` guards
    the UNet module (see the module docstring); `weights` maps each weight file (relative path) to its sha256,
    `configs` each config file (config_sha256)."""

    name: str
    folder: Path
    model: Model
    runner: UNetRunner
    lock: RWLock = field(default_factory=RWLock)
    weights: dict[str, str] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)
    unet_server: dict[str, Any] | None = None  # backend triton: the server and model its batched calls go to
    memory: Any = None  # engine.memory.MemoryEstimator: what a job's calls need, checked when it is claimed


def weight_files(folder: str | Path) -> list[Path]:
    """Every safetensors file under a model folder, sorted by relative path (the loader reads only these)."""
    root = Path(folder)
    return sorted((p for p in root.rglob(f"*{WEIGHT_SUFFIX}") if p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(folder: str | Path) -> dict[str, str]:
    """relative path (posix) -> sha256 hex of each weight file of the model folder."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): file_sha256(p) for p in weight_files(root)}


CONFIG_NAMES = ("config.json", "scheduler_config.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "tokenizer.json")


def config_sha256(folder: str | Path) -> dict[str, str]:
    """relative path (posix) -> sha256 hex of each file the loader reads besides the weights: model_index.json and
    the files of the components it names that diffusers and transformers read (CONFIG_NAMES: configs, scheduler
    config, tokenizer vocabulary and settings); a README or samples beside them are not hashed. Not difflens.json: a
    record pins the defaults it resolved, and replay runs those."""
    root = Path(folder)
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    components = [k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] is not None] \
        if isinstance(index, dict) else []
    files = [root / "model_index.json"] + [root / c / n for c in components for n in CONFIG_NAMES]
    return {p.relative_to(root).as_posix(): file_sha256(p)
            for p in sorted(files, key=lambda p: p.relative_to(root).as_posix()) if p.is_file()}


class ModelRegistry:
    """name -> LoadedModel, each loaded at most once (thread-safe; concurrent first requests load it once).

    `preloaded` lets a caller hand in models it already has (tests, the embedded server) under their names.
    """

    def __init__(self, settings: ServiceSettings, preloaded: Mapping[str, Model] | None = None) -> None:
        self.settings = settings
        self.folders = {name: Path(folder) for name, folder in settings.model_dirs().items()}
        self._loaded: dict[str, LoadedModel] = {}
        self._locks = {name: threading.Lock() for name in self.folders}
        for name, model in (preloaded or {}).items():
            self.folders.setdefault(name, Path(model.path))
            self._locks.setdefault(name, threading.Lock())
            self._loaded[name] = self._entry(name, model)

    def names(self) -> list[str]:
        return sorted(self.folders)

    def folder(self, name: str) -> Path:
        self._check(name)
        return self.folders[name]

    def loaded(self, name: str) -> bool:
        return name in self._loaded

    def get(self, name: str) -> LoadedModel:
        """The loaded model; loads it on first use. Unknown name: InvalidArgument('model') listing the names;
        a broken folder: ModelLoadError from the engine's loader."""
        self._check(name)
        with self._locks[name]:
            if name not in self._loaded:
                from difflens.engine.loading import load_model

                engine = self.settings.engine
                model = load_model(self.folders[name], device=engine.device, dtype=engine.torch_dtype)
                self._loaded[name] = self._entry(name, model)
            return self._loaded[name]

    def load_all(self) -> list[LoadedModel]:
        """Load every configured model now (a worker does this at start-up, so a bad folder fails fast)."""
        return [self.get(name) for name in self.names()]

    def _entry(self, name: str, model: Model) -> LoadedModel:
        from difflens.engine import families
        from difflens.engine.memory import MemoryEstimator

        folder = Path(model.path)
        engine = self.settings.engine
        remote, server = None, None
        if engine.unet_backend == "triton":  # checked against the local UNet before the model takes any job
            from difflens.triton.client import connect_unet

            if model.family.name != "sd":  # the Triton contract has no inputs for SDXL's added conditioning
                raise InvalidArgument("unet_backend", f"model {name!r} is {model.family.name}; the triton backend "
                                                      "serves SD-family UNets only (use eager or compile)")
            remote = connect_unet(engine, name, model.unet)
            server = remote.describe()
        # Hashed once per model and process: the audit record of every job cites them. The runner shares the
        # model's modules (one copy of the weights per process, whatever the number of jobs).
        return LoadedModel(name, folder, model, families.runner(model, engine.unet_backend, remote),
                           weights=weights_sha256(folder), configs=config_sha256(folder), unet_server=server,
                           memory=MemoryEstimator(model))

    def _check(self, name: str) -> None:
        if name not in self.folders:
            raise InvalidArgument("model", f"unknown model {name!r}; available: {', '.join(self.names()) or 'none'}")
