"""Wire and JSON codecs of the job domain (jobs.py): a JobSpec <-> the JSON the queue carries and audit records hold,
an Event <-> the bytes the queue carries, the type check of JSON written by someone else (json_type_problem), and
options_from_dict, the one path from a mapping of field names (JSON, a request's given fields, command-line flags)
to the option dataclasses.

An event travels as bytes from `encode_event` (a JSON header followed by the raw little-endian tensor buffers), so
neither the queue nor the worker needs the generated protobuf modules: only api/ converts these to pb.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
import types
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import numpy as np

from difflens.engine.options import ExplainOptions, GenerationParams, RiseOptions, RiseStats
from difflens.jobs import (
    Completed,
    Event,
    Failed,
    JobSpec,
    OutputOptions,
    Progress,
    Queued,
    Started,
    Step,
    TokenMap,
)

T = TypeVar("T")

# DF-RISE fields added after the first release, with the values that reproduce what came before. A spec leaves
# them out while they hold those values: its JSON (and so its idempotency fingerprint, and the request of its audit
# record) stays what an earlier release wrote, and a worker of the previous release, which passes the "rise"
# object to RiseOptions(**...), still runs it.
RISE_LATER_FIELDS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(RiseOptions)
                                     if f.name in ("sampler", "antithetic", "stop_at_r", "min_masks", "estimator")}
# Where a recorded request lacks a field whose default has changed since, the value it ran with: records made
# before ssim_padding existed ran with zero padding (the default until it became reflect).
RISE_LEGACY_DEFAULTS: dict[str, Any] = {"ssim_padding": "zero"}


# ---------------------------------------------------------------- options and specs


def options_from_dict(cls: type[T], values: Mapping[str, Any], base: T | None = None) -> T:
    """Dataclass `cls` (GenerationParams, ExplainOptions and the options they hold, OutputOptions) from a mapping of
    its field names, as JSON, a request's given fields or command-line flags hold them: a list becomes the tuple
    its field is, a mapping the dataclass its field is (None stays None). Fields not in `values` keep `base`'s
    values (None: the defaults). The dataclass's own checks run; a name it lacks is a TypeError."""
    types_of = field_types(cls)  # type: ignore[arg-type]  # a dataclass type: hashable
    kw = {k: _from_plain(types_of.get(k), v) for k, v in values.items()}
    return dataclasses.replace(base, **kw) if base is not None else cls(**kw)  # type: ignore[type-var]


def _from_plain(tp: Any, value: Any) -> Any:
    if value is None or tp is None:
        return value
    kinds = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    if isinstance(value, Mapping):
        inner = next((k for k in kinds if dataclasses.is_dataclass(k)), None)
        return value if inner is None else options_from_dict(inner, value)  # type: ignore[arg-type]
    if isinstance(value, list) and any(get_origin(k) is tuple for k in kinds):
        return tuple(value)
    return value


def spec_to_json(spec: JobSpec) -> str:
    """JobSpec -> the compact JSON the queue carries (and an audit record's "request" holds)."""
    if spec.explain.rise is not None and spec.explain.rise.masks is not None:
        raise ValueError("explicit RISE masks cannot travel through the queue")
    d = dataclasses.asdict(spec)
    rise = d["explain"]["rise"]
    for k, v in RISE_LATER_FIELDS.items():
        if rise is not None and rise[k] == v:
            del rise[k]
    # Outside "output", whose keys a worker of the previous release passes to OutputOptions(**...): there it
    # would fail the job; at the top level it is ignored (that worker just sends no Progress events).
    if d["output"].pop("progress_events"):
        d["progress_events"] = True
    if not d["tenant"]:  # a job without a tenant keeps the JSON (and fingerprint) of releases before tenants
        del d["tenant"]
    return json.dumps(d, separators=(",", ":"))


def spec_from_json(text: str | bytes) -> JobSpec:
    """spec_to_json's JSON (of this release or an earlier one) -> JobSpec; the option dataclasses check values."""
    d = json.loads(text)
    e = dict(d["explain"])
    rise, cam = e["rise"], e["cam"]
    e["rise"] = {**RISE_LEGACY_DEFAULTS, **{k: v for k, v in rise.items() if k != "masks"}} if rise else None
    e["cam"] = cam or None
    output = {**d["output"], "progress_events": bool(d.get("progress_events", False))}
    return JobSpec(model=d["model"], params=options_from_dict(GenerationParams, d["params"]),
                   explain=options_from_dict(ExplainOptions, e), output=options_from_dict(OutputOptions, output),
                   deadline=d["deadline"], idempotency_key=d["idempotency_key"], caller=d["caller"],
                   tenant=d.get("tenant", ""))


def json_type_problem(cls: type, value: Any, path: str) -> str | None:
    """Where JSON `value` does not have the types of dataclass `cls` (a JobSpec as to_json writes it), as
    'params.steps: expected an integer, got 3.5' under `path`, or None. For JSON written by someone else (an audit
    record): from_json checks values, not types, and a 3.5 for steps got through it. Fields absent from `value`
    and fields whose annotation names a type imported only for type checking (RiseOptions.masks) are not checked."""
    if not isinstance(value, dict):
        return f"{path}: expected an object, got {value!r}"
    types_of = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name not in value or f.name not in types_of:
            continue
        problem = _value_problem(types_of[f.name], value[f.name], f"{path}.{f.name}" if path else f.name)
        if problem:
            return problem
    return None


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Dataclass `cls`'s field annotations, evaluated (typing.get_type_hints in its module). A field whose
    annotation names a type its module imports only for type checking (RiseOptions.masks: torch) is left out."""
    try:
        return get_type_hints(cls)
    except NameError:  # one annotation does not resolve: take the fields one by one
        hints: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            one = type(cls.__name__, (), {"__annotations__": {f.name: f.type}, "__module__": cls.__module__})
            try:
                hints.update(get_type_hints(one))
            except NameError:
                continue
        return hints


def _value_problem(tp: Any, value: Any, path: str) -> str | None:
    if dataclasses.is_dataclass(tp):
        return json_type_problem(tp, value, path)  # type: ignore[arg-type]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if any(_value_problem(a, value, path) is None for a in args):
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and value is not None:  # X | None: what is wrong inside X, if X is a list or object
            problem = _value_problem(others[0], value, path)
            if problem is not None and not problem.startswith(f"{path}: "):
                return problem
        return f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}"
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return f"{path}: expected a list, got {value!r}"
        for i, item in enumerate(value):
            problem = _value_problem(args[0], item, f"{path}[{i}]")
            if problem:
                return problem
        return None
    if not _is(tp, value):
        return f"{path}: expected {_type_name(tp)}, got {value!r}"
    return None


def _is(tp: Any, value: Any) -> bool:
    if get_origin(tp) is Literal:  # which of the choices is checked by the dataclass itself (check_choice)
        return all(isinstance(value, type(a)) for a in get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is type(None):
        return value is None
    return isinstance(value, tp) if isinstance(tp, type) else True


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "an object"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


# ---------------------------------------------------------------- events


_KINDS: dict[str, type] = {"queued": Queued, "started": Started, "step": Step, "progress": Progress,
                           "completed": Completed, "failed": Failed}
_KIND_OF = {v: k for k, v in _KINDS.items()}
_DTYPES = ("float16", "float32", "uint8")


class _Buffers:
    """Collects array payloads while a header is built; each array becomes {"@": index, dtype, shape}."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def put(self, a: np.ndarray | bytes) -> dict[str, Any]:
        if isinstance(a, bytes):
            self.chunks.append(a)
            return {"@": len(self.chunks) - 1, "bytes": True}
        if a.dtype.name not in _DTYPES:
            raise TypeError(f"event arrays must be one of {_DTYPES}, got {a.dtype}")
        self.chunks.append(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())
        return {"@": len(self.chunks) - 1, "dtype": a.dtype.name, "shape": list(a.shape)}


def encode_event(event: Event) -> bytes:
    """Event -> bytes: u32 header length, JSON header, then the buffers back to back (lengths in the header)."""
    bufs = _Buffers()
    body: dict[str, Any]
    if isinstance(event, Step):
        body = {"index": event.index, "timestep": event.timestep, "num_steps": event.num_steps,
                "latency_s": event.latency_s, "maps": {k: bufs.put(v) for k, v in event.maps.items()},
                "tokens": [{"token": t.token, "relevance": t.relevance, "map": bufs.put(t.map)}
                           for t in event.tokens],
                "x0_preview": bufs.put(event.x0_preview) if event.x0_preview is not None else None,
                "rise": dataclasses.asdict(event.rise) if event.rise is not None else None}
    elif isinstance(event, Completed):
        body = {"image_png": bufs.put(event.image_png), "audit_json": event.audit_json}
    else:
        body = dataclasses.asdict(event)
    header = json.dumps({"kind": _KIND_OF[type(event)], "body": body, "sizes": [len(c) for c in bufs.chunks]},
                        separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + b"".join(bufs.chunks)


def decode_event(data: bytes) -> Event:
    (n,) = struct.unpack_from("<I", data)
    header = json.loads(data[4:4 + n])
    chunks, pos = [], 4 + n
    for size in header["sizes"]:
        chunks.append(data[pos:pos + size])
        pos += size

    def get(ref: dict[str, Any]) -> Any:
        raw = chunks[ref["@"]]
        if ref.get("bytes"):
            return raw
        return np.frombuffer(raw, dtype=np.dtype(ref["dtype"]).newbyteorder("<")).reshape(ref["shape"])

    kind, body = header["kind"], header["body"]
    if kind == "step":
        return Step(index=body["index"], timestep=body["timestep"], num_steps=body["num_steps"],
                    latency_s=body["latency_s"], maps={k: get(v) for k, v in body["maps"].items()},
                    tokens=tuple(TokenMap(t["token"], get(t["map"]), t["relevance"]) for t in body["tokens"]),
                    x0_preview=get(body["x0_preview"]) if body["x0_preview"] is not None else None,
                    rise=RiseStats(**body["rise"]) if body.get("rise") else None)  # absent: an older worker's
    if kind == "completed":
        return Completed(image_png=get(body["image_png"]), audit_json=body["audit_json"])
    return _KINDS[kind](**body)  # type: ignore[no-any-return]
