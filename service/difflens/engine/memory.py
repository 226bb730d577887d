"""Will a job's UNet calls fit in the device's memory? Activation memory per sample, from a trace of the model's
own forward (and DF-CAM's backward) on the meta device, against the memory free on the device.

The trace runs the family's denoiser call (families.Family.call) on a copy of the UNet built on the meta device
from its config, at the request's latent size, batch of one, under a dispatch mode that adds up the bytes of every
tensor an operator creates and subtracts them when the tensor dies: the peak of that count is the activation memory
the real call allocates, for this family, latent size, dtype and code path (attention processors, DF-CAM's saved
activations and captured gradients, the attention maps' recorded probabilities), with no arithmetic done. On the
meta device scaled-dot-product attention would decompose into its (N, S) attention matrix, which the fused kernels
that CPU and CUDA run never allocate (on the tiny SD model: 2.2 MB against 0.2 MB), so the trace runs it as the
fused kernel. A call of B samples needs B times that (a batch-2 trace of SDXL at 1024 px came to 2.03x the batch-1
peak). Not seen by the trace: the allocator's fragmentation and kernels' workspaces (cuBLAS, cuDNN): HEADROOM.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from difflens.engine import families
from difflens.errors import ResourceExhausted

if TYPE_CHECKING:
    from difflens.engine.loading import Model
    from difflens.engine.options import ExplainOptions

Kind = Literal["forward", "cam", "attn"]
HEADROOM = 1.25  # what the trace cannot see (fragmentation, kernel workspaces): a margin, not a measurement


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors operators create while they live; `peak` is the most at any one time.
    Outputs that alias an input (views, in-place results) are not new memory and are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor):
                    n = t.untyped_storage().nbytes()
                    self.live += n
                    weakref.finalize(t, self._free, n)
            self.peak = max(self.peak, self.live)
        return out


# (denoiser class and config, dtype, family, kind, latent shape) -> bytes: the same model loaded twice in a process
# (tests, a registry rebuilt) is traced once
_traced: dict[tuple[Any, ...], int] = {}
_lock = threading.Lock()


class FusedAttention(TorchFunctionMode):
    """F.scaled_dot_product_attention as the fused kernel (output and log-sum-exp, no attention matrix), where the
    meta device would run the math decomposition."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        # by position or by name (diffusers' attention dispatcher, FLUX's processor, passes query= key= value=)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        given = {**dict(zip(names, args, strict=False)), **kwargs}
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            given["query"], given["key"], given["value"], float(given.get("dropout_p", 0.0)),
            bool(given.get("is_causal", False)), attn_mask=given.get("attn_mask"), scale=given.get("scale"))[0]


class MemoryEstimator:
    """Activation bytes per sample of one loaded model's calls, traced once per (kind, latent shape) and cached.
    Thread-safe (a worker's job threads share it)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._meta: Any = None
        unet = model.unet
        self._key = (type(unet).__name__, json.dumps(dict(unet.config), sort_keys=True, default=str),
                     str(model.dtype), model.family.name, repr(families.of(model).conditioning_shapes(model)))

    def per_sample(self, kind: Kind, latent: tuple[int, int, int]) -> int:
        """Peak activation bytes of one sample's call. kind: "forward" (denoising, DF-RISE), "cam" (forward and
        backward with every DF-CAM layer captured), "attn" (forward with the attention maps' recorders);
        latent: (C, h, w)."""
        key = (*self._key, kind, tuple(latent))
        with _lock:
            if key not in _traced:
                _traced[key] = self._trace(kind, latent)
            return _traced[key]

    def _denoiser(self) -> Any:
        if self._meta is None:
            unet = self.model.unet
            with torch.device("meta"):
                self._meta = type(unet).from_config(unet.config).to(self.model.dtype).eval().requires_grad_(False)
        return self._meta

    def _trace(self, kind: Kind, latent: tuple[int, int, int]) -> int:
        from difflens.engine.attention import capture_text_attention
        from difflens.engine.cam import camable_layers, capture_layers

        family, meta, dtype = families.of(self.model), self._denoiser(), self.model.dtype
        (seq, dim), added_shapes = family.conditioning_shapes(self.model)

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device="meta", dtype=dtype)

        x = zeros(1, *latent).requires_grad_(kind == "cam")
        embeds, added = zeros(1, seq, dim), {k: zeros(1, *s) for k, s in added_shapes.items()} or None
        count = LiveBytes()
        if kind == "cam":
            with torch.enable_grad(), capture_layers(meta, camable_layers(meta)), FusedAttention(), count:
                out = family.call(meta, x, 999, embeds, added)
                torch.autograd.backward(out.sum(), inputs=[x])
        else:
            capture: Any = capture_text_attention(meta, seq) if kind == "attn" else nullcontext()
            with torch.no_grad(), capture, FusedAttention(), count:
                family.call(meta, x, 999, embeds, added)
        return count.peak


@dataclass(frozen=True)
class Call:
    """One kind of UNet call a job makes: `least` samples is the fewest it can be cut to, `planned` what it asks."""

    what: str
    kind: Kind
    least: int
    planned: int


def plan_calls(options: ExplainOptions, cfg: bool, max_batch: int | None) -> list[Call]:
    """The calls of a job: denoising (both CFG branches in one call, never cut), DF-RISE (masks x branches per
    call, capped at a worker's max_batch; a batch that runs out of device memory is halved down to one sample, by
    the runner or the worker's batcher), DF-CAM (both branches with gradients, never cut), the attention maps (the
    conditional branch alone)."""
    branches = 2 if cfg else 1
    calls = [Call("denoising", "forward", branches, branches)]
    if options.rise is not None:
        planned = branches * options.rise.batch_size
        calls.append(Call("DF-RISE", "forward", 1, min(planned, max_batch) if max_batch else planned))
    if options.cam is not None:
        calls.append(Call("DF-CAM", "cam", branches, branches))
    if options.attention is not None:
        calls.append(Call("attention maps", "attn", 1, 1))
    return calls


def check_fits(estimator: MemoryEstimator, options: ExplainOptions, latent: tuple[int, int, int], cfg: bool,
               device: str | torch.device, *, max_batch: int | None = None,
               free: Callable[[str | torch.device], int | None] | None = None) -> None:
    """ResourceExhausted when a call of the job would not fit in the device's free memory (x HEADROOM): on CUDA at
    the fewest samples each call can be cut to (an out-of-memory error there is caught and the batch halved, at run
    time), on the CPU as planned (running out of RAM ends the process; nothing halves it). No check where the free
    memory is unknown. latent: (C, h, w)."""
    available = (free or free_bytes)(device)
    if available is None:
        return
    on_cuda = torch.device(device).type == "cuda"
    for call in plan_calls(options, cfg, max_batch):
        samples = call.least if on_cuda else call.planned
        need = int(samples * estimator.per_sample(call.kind, latent) * HEADROOM)
        if need > available:
            raise ResourceExhausted(
                f"{call.what} needs about {need / 2**30:.2f} GiB of {'device' if on_cuda else 'host'} memory for "
                f"{samples} sample(s) of latents {latent[0]}x{latent[1]}x{latent[2]} per UNet call; "
                f"{available / 2**30:.2f} GiB is free on {device}: use a smaller image"
                f"{', a smaller DF-RISE batch' if samples > call.least else ''}"
                f"{', no DF-CAM' if call.kind == 'cam' else ''}, or a worker with more memory")


def free_bytes(device: str | torch.device) -> int | None:
    """Memory free for activations on `device`: on CUDA, the driver's free memory plus what torch's caching
    allocator holds unused; on the CPU, the kernel's MemAvailable, capped by the cgroup's limit (a container's);
    None where unknown."""
    d = torch.device(device)
    if d.type == "cuda":
        free, _ = torch.cuda.mem_get_info(d)
        return int(free + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d))
    if d.type != "cpu":
        return None
    known = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(known) if known else None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """cgroup v2: memory.max - memory.current, or None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None
