"""Jobs and their events: the domain types the gRPC front, the queue and the workers exchange.

A `JobSpec` is a validated request (engine option dataclasses plus serving fields); it travels through the queue
as JSON. An `Event` is one thing that happened to a job (queued, started, an explained step, completed, failed);
it travels as bytes from `encode_event` (a JSON header followed by the raw little-endian tensor buffers), so
neither the queue nor the worker needs the generated protobuf modules: only api/ converts these to pb.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np

from difflens.engine.options import (
    AttentionOptions,
    CamOptions,
    ExplainOptions,
    GenerationParams,
    RiseOptions,
    RiseStats,
    Sampling,
    StepSelector,
    check_choice,
)

JobStateName = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
MapDType = Literal["float16", "float32"]
# Failure codes are gRPC status names; api/ maps them to grpc.StatusCode.
FailureCode = Literal["CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL",
                      "UNAVAILABLE", "ABORTED"]
# DF-RISE fields added after the first release, with the values that reproduce what came before. A spec leaves
# them out while they hold those values: its JSON (and so its idempotency fingerprint, and the request of its audit
# record) stays what an earlier release wrote, and a worker of the previous release, which passes the "rise"
# object to RiseOptions(**...), still runs it.
RISE_LATER_FIELDS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(RiseOptions)
                                     if f.name in ("sampler", "antithetic", "stop_at_r", "min_masks")}
# Where a recorded request lacks a field whose default has changed since, the value it ran with: records made
# before ssim_padding existed ran with zero padding (the default until it became reflect).
RISE_LEGACY_DEFAULTS: dict[str, Any] = {"ssim_padding": "zero"}


@dataclass(frozen=True)
class OutputOptions:
    """How maps come back: map dtype on the wire, whether each explained step carries its x0 preview, and whether
    the steps that are not explained send a Progress event."""

    map_dtype: MapDType = "float32"
    include_x0_previews: bool = False
    progress_events: bool = False  # a Progress event for every denoising step that is not explained

    def __post_init__(self) -> None:
        check_choice("output.map_dtype", self.map_dtype, get_args(MapDType))


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to run a job. `deadline`: unix seconds or None; `caller` scopes idempotency where
    the front authenticates no one; `tenant`: whose job it is (the API key's tenant; '' without authentication),
    which scopes idempotency instead and decides who may see the job."""

    model: str
    params: GenerationParams
    explain: ExplainOptions = field(default_factory=ExplainOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    deadline: float | None = None
    idempotency_key: str = ""
    caller: str = ""
    tenant: str = ""

    def to_json(self) -> str:
        if self.explain.rise is not None and self.explain.rise.masks is not None:
            raise ValueError("explicit RISE masks cannot travel through the queue")
        d = dataclasses.asdict(self)
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

    @classmethod
    def from_json(cls, text: str | bytes) -> JobSpec:
        d = json.loads(text)
        p = dict(d["params"])
        s = p.pop("sampling")
        sampling = Sampling(kind=s["kind"], shift=s["shift"],
                            timesteps=tuple(s["timesteps"]) if s["timesteps"] is not None else None)
        e = d["explain"]
        st = e["steps"]
        explain = ExplainOptions(
            steps=StepSelector(kind=st["kind"], indices=tuple(st["indices"]), every=st["every"]),
            rise=RiseOptions(**{**RISE_LEGACY_DEFAULTS, **{k: v for k, v in e["rise"].items() if k != "masks"}})
            if e["rise"] else None,
            cam=CamOptions(layers=tuple(e["cam"]["layers"]), target=e["cam"]["target"]) if e["cam"] else None,
            attention=AttentionOptions() if e["attention"] is not None else None,
        )
        return cls(model=d["model"], params=GenerationParams(**p, sampling=sampling), explain=explain,
                   output=OutputOptions(**d["output"], progress_events=bool(d.get("progress_events", False))),
                   deadline=d["deadline"],
                   idempotency_key=d["idempotency_key"], caller=d["caller"], tenant=d.get("tenant", ""))


def json_type_problem(cls: type, value: Any, path: str) -> str | None:
    """Where JSON `value` does not have the types of dataclass `cls` (a JobSpec as to_json writes it), as
    'params.steps: expected an integer, got 3.5' under `path`, or None. For JSON written by someone else (an audit
    record): from_json checks values, not types, and a 3.5 for steps got through it. Fields absent from `value`
    and fields whose annotation names a type not imported here (RiseOptions.masks: torch) are not checked."""
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


@dataclass(frozen=True)
class JobRecord:
    """A job's state as the queue keeps it. Times are unix seconds; `error` is set once failed or cancelled."""

    id: str
    state: JobStateName
    model: str
    created_at: float
    updated_at: float
    queue_position: int = 0
    error: str = ""
    worker: str = ""
    deliveries: int = 0
    # Set only on what enqueue returns for a job it just made (whose event 0 is Queued(queue_position)); False
    # for an existing job returned for a repeated idempotency key, and for every other read.
    created: bool = False
    tenant: str = ""  # whose job it is ('' when it was submitted without authentication)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Queued:
    position: int


@dataclass(frozen=True)
class Started:
    worker: str
    attempt: int = 1


@dataclass(frozen=True)
class TokenMap:
    """One prompt word's attention map. map: (h, w); relevance in [0, 1]."""

    token: str
    map: np.ndarray
    relevance: float


@dataclass(frozen=True)
class Step:
    """One explained step. maps: name -> (h, w) ('rise', 'rise_raw', 'rise_mean', 'cam', 'cam/<layer>');
    x0_preview: (3, H, W) in [0, 1] when asked for; latency_s: wall time of denoising plus explaining; rise: the
    masks DF-RISE used and its split-half r, when it ran."""

    index: int
    timestep: int
    num_steps: int
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    tokens: tuple[TokenMap, ...] = ()
    latency_s: float = 0.0
    x0_preview: np.ndarray | None = None
    rise: RiseStats | None = None


@dataclass(frozen=True)
class Progress:
    """A denoising step that was not explained finished (sent only when the request asked for progress events)."""

    index: int
    timestep: int
    num_steps: int
    latency_s: float = 0.0


@dataclass(frozen=True)
class Completed:
    image_png: bytes
    audit_json: str


@dataclass(frozen=True)
class Failed:
    code: FailureCode
    message: str


Event = Queued | Started | Step | Progress | Completed | Failed
TERMINAL_EVENTS = (Completed, Failed)
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
