"""Settings: one frozen object built once at start-up from flags and the environment, then passed down.

Nothing deeper in the code reads os.environ. Environment variables (all optional):
DIFFLENS_DEVICE (cpu | cuda | cuda:N), DIFFLENS_DTYPE (float32 | float16 | bfloat16),
DIFFLENS_UNET_BACKEND (eager | compile).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from difflens.errors import InvalidArgument

DType = Literal["float32", "float16", "bfloat16"]
DTYPES: tuple[str, ...] = get_args(DType)
UNetBackend = Literal["eager", "compile"]  # engine.options.Backend


@dataclass(frozen=True)
class Settings:
    device: str = "cpu"
    dtype: DType = "float32"
    unet_backend: UNetBackend = "eager"

    def __post_init__(self) -> None:
        if self.dtype not in get_args(DType):
            raise InvalidArgument("dtype", f"got {self.dtype!r}; allowed: {', '.join(get_args(DType))}")
        if self.unet_backend not in get_args(UNetBackend):
            raise InvalidArgument("unet_backend",
                                  f"got {self.unet_backend!r}; allowed: {', '.join(get_args(UNetBackend))}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise InvalidArgument("device", f"got {self.device!r}; allowed: cpu, cuda, cuda:N")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: str | None) -> Settings:
        """Environment first, then explicit (flag) overrides that are not None."""
        env = os.environ if env is None else env
        values = {
            "device": env.get("DIFFLENS_DEVICE", cls.device),
            "dtype": env.get("DIFFLENS_DTYPE", cls.dtype),
            "unet_backend": env.get("DIFFLENS_UNET_BACKEND", cls.unet_backend),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
