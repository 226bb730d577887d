"""Audit records: what a completed job was, what produced it, and hashes to check a re-run against.

A record holds the job id, its tenant (whose API key submitted it; null on a server without keys), the model's
name, family (sd, sdxl) and the sha256 of each of its weight files (every component's: SDXL's two text encoders),
the request (the JobSpec, seed included) and the parameters it resolved to, library versions, device/dtype/backend,
timings, and hashes of the image and of every map.
`difflens replay` re-runs the request in-process and compares the hashes.

Array hashes (ARRAY_HASH_RULE): sha256 over the ASCII header "<dtype>:<d0>x<d1>x...:" followed by the array's
C-order little-endian bytes. Images are hashed as uint8 (H, W, 3) RGB; maps as float32, whatever dtype the job's
events carried them in. PNG hashes are over the PNG file as the job returned it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from difflens.errors import InvalidArgument
from difflens.jobs import JobSpec

if TYPE_CHECKING:
    import torch

    from difflens.engine.explain import Explanation

SCHEMA = "difflens.audit/1"
ARRAY_HASH_RULE = ("sha256 over the ASCII header '<dtype>:<d0>x<d1>x...:' then the array's C-order little-endian "
                   "bytes; images as uint8 (H, W, 3) RGB, maps as float32")
LIBRARIES = ("torch", "diffusers", "transformers", "numpy", "safetensors", "pillow", "difflens")


def array_sha256(a: np.ndarray | torch.Tensor, dtype: str | None = None) -> str:
    """sha256 of an array under ARRAY_HASH_RULE. `dtype` converts first (e.g. 'float32' for maps)."""
    if not isinstance(a, np.ndarray):
        a = a.detach().cpu().numpy()
    arr = np.ascontiguousarray(a, dtype=np.dtype(dtype or a.dtype).newbyteorder("<"))
    header = f"{arr.dtype.name}:{'x'.join(str(d) for d in arr.shape)}:".encode("ascii")
    return hashlib.sha256(header + arr.tobytes()).hexdigest()


def image_hashes(image: np.ndarray, png: bytes) -> dict[str, Any]:
    """image: (H, W, 3) uint8 -> {"rgb_uint8": hash, "shape": [H, W, 3], "png": sha256 of the PNG bytes}."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
    return {"rgb_uint8": array_sha256(image), "shape": list(image.shape), "png": hashlib.sha256(png).hexdigest()}


def explanation_hashes(exp: Explanation, png: bytes) -> dict[str, Any]:
    """The hashes a record carries and replay recomputes: the image, and every map of every explained step
    ("maps": {"<step index>": {"<map name>": hash}})."""
    return {
        "image": image_hashes(exp.image, png),
        "maps": {str(s.index): {name: array_sha256(m, "float32") for name, m in sorted(s.maps.items())}
                 for s in exp.steps},
    }


@functools.cache  # metadata lookups cost ~2 ms per job; installed versions cannot change under a running process
def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "unknown"
    return out


def step_timings(exp: Explanation, denoise_s: Mapping[int, float]) -> list[dict[str, Any]]:
    """Per denoising step: index, timestep, denoise seconds, and each explainer's seconds where explained."""
    explained = {s.index: s.seconds for s in exp.steps}
    return [{"index": i, "timestep": t, "denoise_s": round(denoise_s.get(i, 0.0), 6),
             **{f"{k}_s": round(v, 6) for k, v in explained.get(i, {}).items()}}
            for i, t in enumerate(exp.timesteps)]


def runtime_of(device: str, dtype: str, backend: str, requested_backend: str,
               remote: Mapping[str, Any] | None = None, oom_batch: int | None = None) -> dict[str, Any]:
    """A record's "runtime": where and how the UNet ran (`backend` the one used, after any fallback; `remote`: the
    server that ran its batched calls, backend triton: url, model, max_batch; `oom_batch`: the samples per call a
    worker's DF-RISE calls were cut to when they ran out of device memory at --max-batch, None: they never did)."""
    import torch

    runtime = {"device": device, "dtype": dtype, "unet_backend": backend, "requested_backend": requested_backend,
               "torch_threads": torch.get_num_threads()}
    if remote is not None:
        runtime["triton"] = dict(remote)
    if oom_batch is not None:
        runtime["unet_batch_after_oom"] = oom_batch
    return runtime


def run_record(*, job_id: str, worker: str, attempt: int, model_name: str, folder: str,
               weights: Mapping[str, str], configs: Mapping[str, str], spec: JobSpec, exp: Explanation, png: bytes,
               runtime: Mapping[str, Any], started: float, denoise_s: Mapping[int, float],
               enqueued_at: float | None = None, rise_exact: Mapping[int, bool] | None = None,
               finished: float | None = None) -> dict[str, Any]:
    """The audit record of one run, a worker's job or a local `difflens explain` (replay takes either): the one
    builder both call. Timings from when it was queued (`enqueued_at`; None: a local run, never queued), started
    and `finished` (None: now), and each step's denoise seconds; `rise_exact` as build_record's (None: a local run,
    whose DF-RISE calls all ran alone)."""
    finished = time.time() if finished is None else finished
    enqueued_at = started if enqueued_at is None else enqueued_at
    timings = {"queue_wait_s": round(max(0.0, started - enqueued_at), 6), "run_s": round(finished - started, 6),
               "total_s": round(finished - enqueued_at, 6), "steps": step_timings(exp, denoise_s)}
    if rise_exact is None:
        rise_exact = {s.index: True for s in exp.steps if "rise" in s.seconds}
    return build_record(job_id=job_id, worker=worker, attempt=attempt, model_name=model_name, weights=weights,
                        configs=configs, folder=folder, spec=spec, exp=exp, png=png, runtime=runtime,
                        timings=timings, rise_exact=rise_exact)


def build_record(*, job_id: str, worker: str, attempt: int, model_name: str, weights: Mapping[str, str],
                 spec: JobSpec, exp: Explanation, png: bytes, runtime: Mapping[str, Any],
                 timings: Mapping[str, Any], rise_exact: Mapping[int, bool],
                 configs: Mapping[str, str] | None = None, folder: str | None = None) -> dict[str, Any]:
    """The audit record of one completed job, JSON-ready.

    weights / configs: sha256 of the model folder's weight files and of its config files (models.config_sha256);
    folder: where the model was read from (replay looks there when the record's model name is not configured).

    runtime: device, dtype, unet_backend (the one used), requested_backend. timings: queue_wait_s, run_s, total_s,
    steps (from step_timings). rise_exact: per explained step, whether its DF-RISE UNet calls held only this job's
    samples, unsplit, i.e. the calls a solo run makes (False: batched with other jobs, so its RISE maps may differ
    from a replay in the last bits; the image never does).
    """
    return {
        "schema": SCHEMA,
        "job_id": job_id,
        "tenant": spec.tenant or None,
        "worker": worker,
        "attempt": attempt,
        "model": {"name": model_name, **({"family": exp.params["family"]} if "family" in exp.params else {}),
                  **({"folder": folder} if folder is not None else {}),
                  "weights_sha256": dict(sorted(weights.items())),
                  "config_sha256": dict(sorted((configs or {}).items()))},
        "request": json.loads(spec.to_json()),
        "seed": spec.params.seed,
        "resolved": exp.params,
        "runtime": dict(runtime),
        "versions": dict(library_versions()),
        "timings": dict(timings),
        "rise_exact": {str(k): v for k, v in sorted(rise_exact.items())},
        "hash_rule": ARRAY_HASH_RULE,
        "hashes": explanation_hashes(exp, png),
    }


def dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, indent=2, sort_keys=False, default=str)


def check_store(folder: str | os.PathLike[str]) -> None:
    """Fail fast, before any job: `folder` (created if missing) must be a folder this process can write."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgument("--audit-dir", f"{path}: cannot create the folder ({e.strerror or e})") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise InvalidArgument("--audit-dir", f"{path}: not a folder this process can write")


def store(text: str, record: Mapping[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Write a job's record (`text` = dumps(record)) durably to FOLDER/<UTC date>/<job id>.a<attempt>.json: one file
    per attempt that produced the image (a worker that lost its claim may have finished too; the Completed event's
    record names the attempt that was delivered). Written to a temporary name, fsynced, then renamed: a reader
    never sees half a record, and the folder is fsynced after the rename, so the record is on disk before the
    Completed event goes out. OSError when it cannot be written."""
    day = time.strftime("%Y-%m-%d", time.gmtime())
    target = Path(folder) / day / f"{record['job_id']}.a{record['attempt']}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        for d in (target.parent, target.parent.parent):  # the rename's entry, and the day folder's (new at midnight)
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def method_of(map_name: str) -> str:
    """The explainer a map comes from: 'rise_raw' -> 'rise', 'cam/up_blocks.0' -> 'cam', 'attn' -> 'attn'."""
    return re.split(r"[_/]", map_name, maxsplit=1)[0]


def comparable_maps(recorded: Mapping[str, Any], replayed: Mapping[str, Any],
                    methods: set[str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """For a re-explanation: the parts of two "maps" hashes ({"<step>": {"<map>": hash}}) that can be compared -
    steps explained in both, maps of `methods` (those run with the record's options) - and the replayed maps
    outside them ({"stepNNN/<map>": hash}: new, nothing to compare them with)."""
    steps = set(recorded) & set(replayed)

    def part(side: Mapping[str, Any]) -> dict[str, Any]:
        return {s: {n: h for n, h in side[s].items() if method_of(n) in methods} for s in steps}

    old, new = part(recorded), part(replayed)
    fresh = {f"step{int(s):03d}/{n}": h for s, maps in replayed.items() for n, h in maps.items()
             if n not in new.get(s, {})}
    return old, new, fresh


def compare_hashes(recorded: Mapping[str, Any], replayed: Mapping[str, Any]) -> list[tuple[str, str, str, bool]]:
    """Per item (image.rgb_uint8, image.png, step<i>/<map>): (item, recorded, replayed, match). Items present on
    only one side are listed with '-' on the other and count as mismatches."""
    rows: list[tuple[str, str, str, bool]] = []
    for key in ("rgb_uint8", "png"):
        a, b = recorded.get("image", {}).get(key, "-"), replayed.get("image", {}).get(key, "-")
        rows.append((f"image.{key}", a, b, a == b))
    rec_maps, rep_maps = recorded.get("maps", {}), replayed.get("maps", {})
    for step in sorted(set(rec_maps) | set(rep_maps), key=int):
        ra, rb = rec_maps.get(step, {}), rep_maps.get(step, {})
        for name in sorted(set(ra) | set(rb)):
            a, b = ra.get(name, "-"), rb.get(name, "-")
            rows.append((f"step{int(step):03d}/{name}", a, b, a == b))
    return rows
