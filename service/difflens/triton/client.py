"""The UNet on a Triton Inference Server, as the engine's RemoteUNet (`--backend triton`).

At start-up (`connect_unet`): the server is live and ready and the model ready (waiting up to triton_wait_s, as a
worker waits for Redis: a sidecar may start after the worker), the model's config declares exactly what difflens
sends (triton/contract.py: names, element types, dims, batching), and its output on a probe input matches the local
UNet's, so the weights the audit records hash (and DF-CAM and the attention maps, which run on the local copy) are
the ones the server runs. Every error names the flag to fix.

Per call: tensors travel as numpy over tritonclient's gRPC API, split at the model's max_batch_size. A server that
cannot be reached fails the call with BackendUnavailable (the job fails UNAVAILABLE); the channel is then made
anew, so the next job connects at once when the server is back instead of waiting out gRPC's reconnect backoff. A
call that takes longer than triton_call_timeout_s (DIFFLENS_TRITON_CALL_TIMEOUT_S) fails the same way: a stalled
server does not hold a job forever.

Readiness (`TritonUNet.ready`, a worker's /readyz): the server and the model ready, asked with a short timeout and
the answer kept for READY_CACHE_S, so a probe every few seconds costs the server little.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from difflens.config import Settings
from difflens.errors import BackendUnavailable, InvalidArgument, NotReady
from difflens.triton import contract

log = logging.getLogger(__name__)

STARTUP_CALL_TIMEOUT_S = 5.0  # one health or config call at start-up
READY_CALL_TIMEOUT_S = 1.0  # one health call of a readiness probe (the chart's worker probes time out at 5 s)
READY_CACHE_S = 5.0  # how long a readiness answer is reused
# Relative L2 distance between the server's and the local UNet's output on the probe input above which they are taken
# for different weights. The same weights differ by float noise (~1e-6 here; a GPU's TF32 or a TensorRT engine by
# ~1e-3); other weights by ~1.
PROBE_TOLERANCE = {"float32": 1e-2, "float16": 5e-2}
TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}
TRITON_DATATYPE = {"TYPE_FP32": "FP32", "TYPE_FP16": "FP16"}  # config type -> the wire's datatype


def _unreachable(err: InferenceServerException) -> bool:
    return "UNAVAILABLE" in str(err.status() or "")


def _timed_out(err: InferenceServerException) -> bool:
    return "DEADLINE_EXCEEDED" in str(err.status() or "")


@dataclass(frozen=True)
class ServedModel:
    """What start-up learned of the model: `max_batch` samples per call (0: no limit), and `dims[name]` as the
    server declares each input, batch dimension excluded (-1: free)."""

    max_batch: int
    dims: Mapping[str, tuple[int, ...]]


def _mismatch(name: str, what: str) -> InvalidArgument:
    return InvalidArgument("triton_models", f"{name}: {what}")


def _shown(dims: Sequence[int]) -> str:
    return "[" + ", ".join("-1" if d == contract.ANY else str(d) for d in dims) + "]"


def check_config(name: str, config: Mapping[str, Any], dtype: str, unet_config: Any) -> ServedModel:
    """The model config (get_model_config as JSON, its "config") against what difflens sends at `dtype` for a UNet
    with `unet_config`; InvalidArgument('triton_models', '<name>: <what differs>') on the first difference."""
    inputs, outputs = contract.unet_tensors(dtype, int(unet_config.in_channels), int(unet_config.out_channels),
                                            int(unet_config.cross_attention_dim))
    max_batch = int(config.get("max_batch_size", 0))
    # Without batching in the config (max_batch_size 0), dims carry the batch dimension: it must be free.
    batch = () if max_batch > 0 else (contract.ANY,)
    dims: dict[str, tuple[int, ...]] = {}
    for kind, verb, wanted in (("input", "sends", inputs), ("output", "expects", outputs)):
        declared = {t["name"]: t for t in config.get(kind, [])}
        names = ", ".join(repr(n) for n in declared) or "none"
        for spec in wanted:
            t = declared.pop(spec.name, None)
            if t is None:
                raise _mismatch(name, f"the server's model has no {kind} {spec.name!r} (it declares {names}); "
                                      f"difflens {verb} {', '.join(repr(s.name) for s in wanted)}")
            if t.get("data_type") != spec.data_type:
                why = f"dtype {dtype}" if spec.name != contract.TIMESTEP else "timesteps as float32"
                raise _mismatch(name, f"{kind} {spec.name!r} is {t.get('data_type')} on the server, difflens {verb} "
                                      f"{spec.data_type} ({why})")
            have = tuple(int(d) for d in t.get("dims", ()))
            want = batch + spec.dims
            fits = len(have) == len(want) and all(
                w == contract.ANY or h in (w, contract.ANY) for h, w in zip(have, want, strict=True))
            if not fits or (batch and have[0] != contract.ANY):
                raise _mismatch(name, f"{kind} {spec.name!r} has dims {_shown(have)} on the server, difflens {verb} "
                                      f"{_shown(want)} ({'batch dimension first, ' if batch else ''}-1: any size; "
                                      f"max_batch_size {max_batch})")
            dims[spec.name] = have[len(batch):]
        if kind == "input":
            extra = [n for n, t in declared.items() if not t.get("optional")]
            if extra:
                raise _mismatch(name, f"the server's model also requires input {extra[0]!r}, which difflens does "
                                      f"not send (it sends {', '.join(repr(s.name) for s in inputs)})")
    return ServedModel(max_batch=max_batch, dims=dims)


class TritonUNet:
    """RemoteUNet over one Triton model. `served` as check_config found it; each call may take up to
    `call_timeout_s`. Thread-safe (tritonclient's gRPC infer is), so a worker's job threads and its DF-RISE batcher
    share one."""

    def __init__(self, url: str, model: str, served: ServedModel, call_timeout_s: float = 120.0) -> None:
        self.url = url
        self.model = model
        self.served = served
        self.call_timeout_s = call_timeout_s
        self._lock = threading.Lock()
        self._client = grpcclient.InferenceServerClient(url)
        self._ready_lock = threading.Lock()  # one readiness check at a time; the others wait for its answer
        self._ready: tuple[float, bool, str] | None = None  # (when, ready, why)

    def close(self) -> None:
        with self._lock:
            self._client.close()

    def describe(self) -> dict[str, Any]:
        """For audit records: where the UNet ran."""
        return {"url": self.url, "model": self.model, "max_batch": self.served.max_batch}

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """latents: (N, C, h, w); timesteps: (N,); embeds: (N, L, D) -> (N, C_out, h, w) on the latents' device and
        dtype, in calls of at most max_batch samples."""
        n = int(latents.shape[0])
        step = self.served.max_batch or n
        parts = [self._infer(latents[i:i + step], timesteps[i:i + step], embeds[i:i + step])
                 for i in range(0, n, step)]
        out = torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))
        return out.to(device=latents.device, dtype=latents.dtype)

    def _infer(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> np.ndarray:
        kind = TORCH_TO_NUMPY.get(latents.dtype)
        if kind is None:
            raise InvalidArgument("dtype", f"the triton UNet backend sends float32 or float16, got {latents.dtype}")
        arrays = ((contract.SAMPLE, latents.detach().to("cpu", latents.dtype).numpy()),
                  (contract.TIMESTEP, timesteps.detach().to("cpu", torch.float32).reshape(-1, 1).numpy()),
                  (contract.ENCODER_HIDDEN_STATES, embeds.detach().to("cpu", latents.dtype).contiguous().numpy()))
        datatype = "FP16" if kind is np.float16 else "FP32"
        inputs = []
        for name, arr in arrays:
            tensor = grpcclient.InferInput(name, list(arr.shape), "FP32" if name == contract.TIMESTEP else datatype)
            tensor.set_data_from_numpy(np.ascontiguousarray(arr))
            inputs.append(tensor)
        client = self._client
        try:
            result = client.infer(self.model, inputs, outputs=[grpcclient.InferRequestedOutput(contract.OUTPUT)],
                                  client_timeout=self.call_timeout_s)
        except InferenceServerException as e:
            if _unreachable(e):
                self._renew(client)
                raise BackendUnavailable(f"the UNet's Triton server at {self.url} (model {self.model!r}) cannot be "
                                         f"reached: {e.message()}; submit the job again") from None
            if _timed_out(e):
                # The connection may be the stalled part (tritonclient sends no keepalive pings): the next call
                # gets a fresh one. The old one is not closed under the calls other threads have in flight on it
                # (a slow server may still answer them); it closes when the last of them lets go of it.
                self._renew(client, close=False)
                raise BackendUnavailable(f"the UNet's Triton server at {self.url} (model {self.model!r}) did not "
                                         f"answer within {self.call_timeout_s:g} s (DIFFLENS_TRITON_CALL_TIMEOUT_S); "
                                         "submit the job again") from None
            if "INVALID_ARGUMENT" in str(e.status() or ""):
                raise InvalidArgument("triton_models", f"{self.model}: the server refused the call: "
                                                       f"{e.message()}") from None
            raise
        out = result.as_numpy(contract.OUTPUT)
        if out is None or out.shape[0] != arrays[0][1].shape[0]:
            # numpy >= 2 on the server's side answers with empty outputs and no error
            raise RuntimeError(f"Triton model {self.model!r} at {self.url} returned "
                               f"{'no' if out is None else tuple(out.shape)} {contract.OUTPUT!r} for "
                               f"{arrays[0][1].shape[0]} samples")
        return np.array(out, copy=True)  # the response's buffer is read-only; torch wants its own

    def _renew(self, broken: Any, close: bool = True) -> None:
        """A fresh channel for the next call (once per broken one, whichever thread saw it first); the broken one
        closed now, or (close=False) when the last call holding it ends (tritonclient closes it when collected)."""
        with self._lock:
            if self._client is broken:
                self._client = grpcclient.InferenceServerClient(self.url)
                if not close:
                    return
                try:
                    broken.close()
                except Exception:  # noqa: BLE001 - a dead channel may refuse to close cleanly; it is dropped anyway
                    log.debug("closing the old Triton channel failed", exc_info=True)

    def ready(self) -> tuple[bool, str]:
        """Whether the server and the model are ready now, and why not: (ready, reason). Each health call waits up
        to READY_CALL_TIMEOUT_S; the answer is reused for READY_CACHE_S. A server that does not answer gets a fresh
        channel, as a failed call does, so the first check after it is back finds it."""
        with self._ready_lock:
            now = time.monotonic()
            if self._ready is not None and now - self._ready[0] < READY_CACHE_S:
                return self._ready[1:]
            client = self._client
            where = f"Triton model {self.model!r} at {self.url}"
            try:
                if not client.is_server_ready(client_timeout=READY_CALL_TIMEOUT_S):
                    answer = (False, f"{where}: the server is not ready")
                elif not client.is_model_ready(self.model, client_timeout=READY_CALL_TIMEOUT_S):
                    answer = (False, f"{where}: the server has no model {self.model!r} ready")
                else:
                    answer = (True, f"{where} ready")
            except InferenceServerException as e:
                if _unreachable(e) or _timed_out(e):
                    self._renew(client, close=False)  # a job's call may be in flight on it
                said = f"no answer within {READY_CALL_TIMEOUT_S:g} s" if _timed_out(e) else e.message() or str(e)
                answer = (False, f"{where}: {said}")
            self._ready = (time.monotonic(), *answer)
            return answer


def readiness_check(entries: Sequence[Any]) -> Callable[[], tuple[bool, str]] | None:
    """/readyz's check for a process whose loaded models (ModelRegistry entries) run their UNet on Triton: every
    server and model ready (`all_ready`); None when none of them does."""
    remotes = [e.runner.remote for e in entries if isinstance(e.runner.remote, TritonUNet)]
    return (lambda: all_ready(remotes)) if remotes else None


def all_ready(remotes: Sequence[TritonUNet]) -> tuple[bool, str]:
    """(True, '') when every remote's server and model are ready (TritonUNet.ready), else the first one's reason."""
    for remote in remotes:
        ok, why = remote.ready()
        if not ok:
            return False, why
    return True, ""


def wait_ready(client: Any, url: str, model: str, wait_s: float) -> None:
    """Until the server is live and ready and `model` is ready, for up to wait_s: NotReady naming --triton-url
    (no server answered) or --triton-model (the server has no such model ready)."""
    end = time.monotonic() + wait_s
    told = False
    while True:
        try:
            server = client.is_server_live(client_timeout=STARTUP_CALL_TIMEOUT_S) \
                and client.is_server_ready(client_timeout=STARTUP_CALL_TIMEOUT_S)
            if server and client.is_model_ready(model, client_timeout=STARTUP_CALL_TIMEOUT_S):
                return
            problem = f"the server has no model {model!r} ready" if server else "the server is not ready"
        except InferenceServerException as e:
            server, problem = False, e.message() or str(e)
        if time.monotonic() >= end:
            if server:
                raise NotReady(f"--triton-model: {problem} at {url} (waited {wait_s:g} s, DIFFLENS_TRITON_WAIT_S)")
            raise NotReady(f"--triton-url: no Triton server ready at {url} (waited {wait_s:g} s, "
                           f"DIFFLENS_TRITON_WAIT_S): {problem}")
        if not told:
            log.warning("waiting up to %g s for Triton model %r at %s: %s", wait_s, model, url, problem)
            told = True
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))


def probe_inputs(unet: Any, served: ServedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One small sample the server accepts: the smallest side the UNet's levels allow (or the server's fixed
    size), a mid-range timestep, 8 tokens (or the fixed count). Seeded: the same input on every start."""
    cfg = unet.config
    side = 2 ** (len(cfg.block_out_channels) - 1)
    _, h, w = (side if d == contract.ANY else d for d in served.dims[contract.SAMPLE])
    tokens, _ = (8 if d == contract.ANY else d for d in served.dims[contract.ENCODER_HIDDEN_STATES])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, int(cfg.in_channels), h, w, generator=g)
    embeds = torch.randn(1, tokens, int(cfg.cross_attention_dim), generator=g)
    return latents, torch.tensor([500.0]), embeds


def check_weights(remote: TritonUNet, unet: Any, dtype: str) -> None:
    """The server's output on the probe input against the local UNet's: other weights are refused, naming both."""
    param = next(unet.parameters())
    latents, t, embeds = (x.to(param.device) for x in probe_inputs(unet, remote.served))
    latents, embeds = latents.to(param.dtype), embeds.to(param.dtype)
    with torch.no_grad():
        local = unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0].float()
    served = remote(latents, t, embeds).float()
    distance = float((served - local).norm() / local.norm().clamp_min(1e-12))
    if not distance <= PROBE_TOLERANCE[dtype]:
        raise _mismatch(remote.model, f"its output on a probe input is {distance:.3g} away from the local UNet's "
                                      f"(relative L2; the same weights give < {PROBE_TOLERANCE[dtype]:g}): the server "
                                      "runs other weights than the model folder's, whose hashes the audit records "
                                      "cite and on which DF-CAM and the attention maps run")
    log.info("Triton model %r at %s matches the local UNet (probe distance %.2g)", remote.model, remote.url, distance)


def connect_unet(settings: Settings, model_name: str, unet: Any) -> TritonUNet:
    """The checked RemoteUNet of difflens model `model_name` (its local `unet` gives the config and the probe's
    reference), per `settings` (triton_url, triton_model(), triton_wait_s, triton_call_timeout_s, dtype)."""
    url, model = str(settings.triton_url), settings.triton_model(model_name)
    client = grpcclient.InferenceServerClient(url)
    try:
        wait_ready(client, url, model, settings.triton_wait_s)
        try:
            config = client.get_model_config(model, as_json=True, client_timeout=STARTUP_CALL_TIMEOUT_S)["config"]
        except InferenceServerException as e:
            raise NotReady(f"--triton-url: reading model {model!r}'s config at {url}: {e.message()}") from None
    finally:
        client.close()
    remote = TritonUNet(url, model, check_config(model, config, settings.dtype, unet.config),
                        call_timeout_s=settings.triton_call_timeout_s)
    try:
        check_weights(remote, unet, settings.dtype)
    except BaseException:
        remote.close()
        raise
    return remote
