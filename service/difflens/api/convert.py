"""Contract <-> domain: ExplainRequest <-> JobSpec, ExplainEvent <-> Event, Job <-> JobRecord, Tensor <-> ndarray.

Building the domain dataclasses runs their own checks, so a malformed request fails here with InvalidArgument;
`pb_field` renames the domain's field names to the contract's paths for the error a client sees.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
import numpy as np

from difflens.api.pb import pb
from difflens.catalog import CatalogModel
from difflens.config import Limits
from difflens.engine.options import (
    AttentionOptions,
    CamOptions,
    ExplainOptions,
    GenerationParams,
    RiseOptions,
    RiseStats,
    Sampling,
    StepSelector,
)
from difflens.engine.validate import model_max_side
from difflens.errors import InvalidArgument
from difflens.job_codec import options_from_dict
from difflens.jobs import (
    Completed,
    Event,
    Failed,
    FailureCode,
    JobRecord,
    JobSpec,
    OutputOptions,
    Progress,
    Queued,
    Started,
    Step,
    TokenMap,
)
from difflens.validation import check_request_limits

if TYPE_CHECKING:
    from difflens.engine.loading import Model

T = TypeVar("T")

# Enum number -> domain value; UNSPECIFIED (0) is the documented default where one exists.
SCHEDULERS = {1: "ddim", 2: "ddpm", 3: "dpmsolver++", 4: "euler"}
STAGES = {1: "early", 2: "late"}
MASK_KINDS = {0: "pixel", 1: "pixel", 2: "grid"}
SCORES = {0: "structure", 1: "structure", 2: "cosine"}
RISE_TARGETS = {0: "eps", 1: "eps", 2: "x_prev"}
SUBSTRATES = {0: "zero", 1: "zero", 2: "blur"}
SSIM_PADDINGS = {0: "reflect", 1: "zero", 2: "reflect"}
MASK_SAMPLERS = {0: "mc", 1: "mc", 2: "stratified", 3: "sobol"}
RISE_ESTIMATORS = {0: "ratio", 1: "ratio", 2: "regression"}
CAM_TARGETS = {0: "output_sum", 1: "output_sum", 2: "guided_sum", 3: "guided_sqnorm"}
MAP_DTYPES = {0: "float32", 1: "float16", 2: "float32"}
TENSOR_DTYPES = {pb.Tensor.D_TYPE_FLOAT16: "float16", pb.Tensor.D_TYPE_FLOAT32: "float32",
                 pb.Tensor.D_TYPE_UINT8: "uint8"}
JOB_STATES = {"queued": pb.JOB_STATE_QUEUED, "running": pb.JOB_STATE_RUNNING, "completed": pb.JOB_STATE_COMPLETED,
              "failed": pb.JOB_STATE_FAILED, "cancelled": pb.JOB_STATE_CANCELLED}
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

# Domain field (InvalidArgument.field) -> the request field path a client sees. Prefix rules after exact ones.
PB_FIELDS = {
    "rise.num_masks": "explain.rise.masks", "rise.batch_size": "explain.rise.batch",
    "rise.mask": "explain.rise.mask_kind", "rise.seed": "explain.rise.mask_seed",
    "sampling.shift": "sampling.exponential.shift", "sampling.timesteps": "sampling.explicit.timesteps",
    "sampling.kind": "sampling", "explain.steps.indices": "explain.steps.indices.values",
}
PB_PREFIXES = {"rise.": "explain.rise.", "cam.": "explain.cam."}


def pb_field(domain_field: str) -> str:
    if domain_field in PB_FIELDS:
        return PB_FIELDS[domain_field]
    for prefix, path in PB_PREFIXES.items():
        if domain_field.startswith(prefix):
            return path + domain_field[len(prefix):]
    return domain_field


def _enum(field: str, value: int, table: dict[int, T], enum: Any) -> T:
    """A contract enum number -> its domain value; unknown numbers (and UNSPECIFIED where it has no default)
    are an InvalidArgument listing the names allowed."""
    if value not in table:
        allowed = [v.name for v in enum.DESCRIPTOR.values if v.number in table]
        raise InvalidArgument(field, f"got {value}; allowed: {', '.join(allowed)}")
    return table[value]


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


# ---------------------------------------------------------------- requests


def _kind(msg: Any, field: str, allowed: str) -> str | None:
    """The oneof `kind` set in `msg`, or None when none is. A message with bytes but no kind carries one this
    server does not know (a newer client's): refused, not read as unset."""
    kind = msg.WhichOneof("kind")
    if kind is None and msg.ByteSize():
        raise InvalidArgument(field, f"holds a kind this server does not know (a newer client's?); allowed: {allowed}")
    return kind  # type: ignore[no-any-return]


def sampling_from_pb(s: Any) -> Sampling:
    kind = _kind(s, "sampling", "uniform, exponential, explicit")
    if kind is None or kind == "uniform":
        return Sampling()
    if kind == "exponential":
        stage = _enum("sampling.exponential.stage", s.exponential.stage, STAGES, pb.ExponentialSampling.Stage)
        return Sampling(**_given(kind=stage, shift=_opt(s.exponential, "shift")))
    return Sampling(kind="explicit", timesteps=tuple(s.explicit.timesteps))


def steps_from_pb(s: Any) -> StepSelector:
    kind = _kind(s, "explain.steps", "all, indices, every")
    if kind is None:
        return StepSelector()
    if kind == "all":
        if not s.all:
            raise InvalidArgument("explain.steps.all", "must be true when set (use indices or every to select)")
        return StepSelector()
    if kind == "indices":
        return StepSelector("list", indices=tuple(s.indices.values))
    return StepSelector("every", every=s.every)


def rise_from_pb(r: Any) -> RiseOptions:
    R = pb.RiseOptions
    return options_from_dict(RiseOptions, {
        **_given(num_masks=_opt(r, "masks"), p=_opt(r, "p"), grid_size=_opt(r, "grid_size"),
                 batch_size=_opt(r, "batch"), seed=_opt(r, "mask_seed"), stop_at_r=_opt(r, "stop_at_r"),
                 min_masks=_opt(r, "min_masks")),
        "sampler": _enum("explain.rise.sampler", r.sampler, MASK_SAMPLERS, R.Sampler),
        "antithetic": r.antithetic,
        "estimator": _enum("explain.rise.estimator", r.estimator, RISE_ESTIMATORS, R.Estimator),
        "mask": _enum("explain.rise.mask_kind", r.mask_kind, MASK_KINDS, R.MaskKind),
        "score": _enum("explain.rise.score", r.score, SCORES, R.Score),
        "target": _enum("explain.rise.target", r.target, RISE_TARGETS, R.Target),
        "substrate": _enum("explain.rise.substrate", r.substrate, SUBSTRATES, R.Substrate),
        "ssim_padding": _enum("explain.rise.ssim_padding", r.ssim_padding, SSIM_PADDINGS, R.SsimPadding),
        "structure_2x": r.structure_2x})


def explain_from_pb(e: Any) -> ExplainOptions:
    cam = None
    if e.HasField("cam"):
        target = _enum("explain.cam.target", e.cam.target, CAM_TARGETS, pb.CamOptions.Target)
        cam = options_from_dict(CamOptions, {"layers": list(e.cam.layers), "target": target})
    return ExplainOptions(steps=steps_from_pb(e.steps), rise=rise_from_pb(e.rise) if e.HasField("rise") else None,
                          cam=cam, attention=AttentionOptions() if e.attention.enabled else None)


def job_deadline(req: Any, call_remaining_s: float | None, now: float | None = None) -> float | None:
    """Unix seconds by which the job must end: the earlier of the call's deadline and timeout_seconds."""
    now = time.time() if now is None else now
    candidates = [now + call_remaining_s] if call_remaining_s is not None else []
    if req.HasField("timeout_seconds"):
        t = req.timeout_seconds
        if not (math.isfinite(t) and t > 0):
            raise InvalidArgument("timeout_seconds", f"got {t}; must be a positive number of seconds")
        candidates.append(now + t)
    return min(candidates) if candidates else None


def request_to_spec(req: Any, *, caller: str = "", deadline: float | None = None,
                    limits: Limits | None = None) -> JobSpec:
    """ExplainRequest -> JobSpec (model name as given: '' means the default, resolved by validation). With
    `limits` (the front's), the counts and list lengths the request gives are first checked against them
    (validation.check_request_limits; the option dataclasses' own ranges are engine-wide, wider). `steps` is
    dropped with explicit timesteps: the contract ignores it there."""
    scheduler = None
    if req.scheduler:
        scheduler = _enum("scheduler", req.scheduler, SCHEDULERS, pb.Scheduler)
    steps = None if req.sampling.WhichOneof("kind") == "explicit" else _opt(req, "steps")
    if limits is not None:
        rise = req.explain.rise if req.explain.HasField("rise") else None
        check_request_limits(limits, {"steps": steps, "rise.num_masks": _opt(rise, "masks") if rise else None,
                                      "rise.batch_size": _opt(rise, "batch") if rise else None},
                             {"explain.steps.indices": len(req.explain.steps.indices.values),
                              "sampling.timesteps": len(req.sampling.explicit.timesteps),
                              "cam.layers": len(req.explain.cam.layers)})
    params = GenerationParams(
        req.prompt, negative_prompt=req.negative_prompt, seed=req.seed if req.HasField("seed") else 0,
        **_given(steps=steps, guidance_scale=_opt(req, "guidance_scale"), width=_opt(req, "width"),
                 height=_opt(req, "height"), scheduler=scheduler),
        sampling=sampling_from_pb(req.sampling))
    output = OutputOptions(
        map_dtype=_enum("output.map_dtype", req.output.map_dtype, MAP_DTYPES, pb.OutputOptions.MapDType),  # type: ignore[arg-type]
        include_x0_previews=req.output.include_x0_previews, progress_events=req.output.progress_events)
    return JobSpec(model=req.model, params=params, explain=explain_from_pb(req.explain), output=output,
                   deadline=deadline, idempotency_key=req.idempotency_key, caller=caller)


def _number(table: dict[int, str], value: str | None) -> Any:  # an enum number (the stubs type it as the enum)
    return next((k for k, v in table.items() if v == value and k), 0)


def spec_to_request(spec: JobSpec, timeout_s: float | None = None) -> Any:
    """JobSpec -> ExplainRequest (the client side). The spec's caller travels as metadata, its deadline as the
    call's; `timeout_s` becomes timeout_seconds."""
    p, e = spec.params, spec.explain
    req = pb.ExplainRequest(model=spec.model, prompt=p.prompt, negative_prompt=p.negative_prompt, seed=p.seed,
                            idempotency_key=spec.idempotency_key, **_given(
                                steps=p.steps, guidance_scale=p.guidance_scale, width=p.width, height=p.height,
                                timeout_seconds=timeout_s))
    req.scheduler = _number(SCHEDULERS, p.scheduler)
    s = p.sampling
    if s.kind == "explicit":
        req.sampling.explicit.timesteps.extend(s.timesteps or ())
    elif s.kind in STAGES.values():
        req.sampling.exponential.stage = _number(STAGES, s.kind)
        req.sampling.exponential.shift = s.shift
    if e.steps.kind == "list":
        req.explain.steps.indices.values.extend(e.steps.indices)
    elif e.steps.kind == "every":
        req.explain.steps.every = e.steps.every
    if e.rise is not None:
        r = e.rise
        if r.masks is not None:
            raise InvalidArgument("rise.masks", "explicit masks cannot be sent to a server")
        req.explain.rise.CopyFrom(pb.RiseOptions(
            masks=r.num_masks, p=r.p, mask_kind=_number(MASK_KINDS, r.mask), grid_size=r.grid_size,
            score=_number(SCORES, r.score), target=_number(RISE_TARGETS, r.target), batch=r.batch_size,
            substrate=_number(SUBSTRATES, r.substrate), structure_2x=r.structure_2x, mask_seed=r.seed,
            ssim_padding=_number(SSIM_PADDINGS, r.ssim_padding), sampler=_number(MASK_SAMPLERS, r.sampler),
            antithetic=r.antithetic, min_masks=r.min_masks, estimator=_number(RISE_ESTIMATORS, r.estimator),
            **_given(stop_at_r=r.stop_at_r)))
    if e.cam is not None:
        req.explain.cam.CopyFrom(pb.CamOptions(layers=list(e.cam.layers), target=_number(CAM_TARGETS, e.cam.target)))
    req.explain.attention.enabled = e.attention is not None
    req.output.map_dtype = _number(MAP_DTYPES, spec.output.map_dtype)
    req.output.include_x0_previews = spec.output.include_x0_previews
    req.output.progress_events = spec.output.progress_events
    return req


# ---------------------------------------------------------------- tensors and events


def tensor_to_pb(a: np.ndarray) -> Any:
    """(any shape) float16 / float32 / uint8 array -> Tensor, little-endian row-major."""
    codes = {v: k for k, v in TENSOR_DTYPES.items()}
    if a.dtype.name not in codes:
        raise TypeError(f"a Tensor holds {', '.join(codes)}, got {a.dtype}")
    data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=codes[a.dtype.name], shape=list(a.shape), data=data)


def tensor_from_pb(t: Any) -> np.ndarray:
    if t.dtype not in TENSOR_DTYPES:
        raise ValueError(f"unknown Tensor dtype {t.dtype}")
    dtype = np.dtype(TENSOR_DTYPES[t.dtype]).newbyteorder("<")
    shape = tuple(int(d) for d in t.shape)
    if len(t.data) != dtype.itemsize * math.prod(shape):
        raise ValueError(f"Tensor of shape {shape} {dtype.name} needs {dtype.itemsize * math.prod(shape)} bytes, "
                         f"got {len(t.data)}")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape)


def status_code(name: str) -> int:
    """A gRPC status name ('CANCELLED') -> its google.rpc.Code number."""
    return int(grpc.StatusCode[name].value[0])


def event_to_pb(job_id: str, sequence: int, event: Event) -> Any:
    out = pb.ExplainEvent(job_id=job_id, sequence=sequence)
    if isinstance(event, Queued):
        out.queued.position = event.position
    elif isinstance(event, Started):
        out.started.CopyFrom(pb.Started(worker=event.worker, attempt=event.attempt))
    elif isinstance(event, Step):
        step = out.step
        step.index, step.timestep, step.num_steps = event.index, event.timestep, event.num_steps
        step.latency_seconds = event.latency_s
        for name, m in event.maps.items():
            step.maps[name].CopyFrom(tensor_to_pb(m))
        step.tokens.extend(pb.TokenMap(token=t.token, map=tensor_to_pb(t.map), relevance=t.relevance)
                           for t in event.tokens)
        if event.x0_preview is not None:
            step.x0_preview.CopyFrom(tensor_to_pb(event.x0_preview))
        if event.rise is not None:
            step.rise.CopyFrom(pb.RiseStepStats(masks_used=event.rise.masks_used,
                                                masks_planned=event.rise.masks_planned, **_given(
                                                    split_half_r=event.rise.split_half_r,
                                                    stop_at_r=event.rise.stop_at_r)))
    elif isinstance(event, Progress):
        out.progress.CopyFrom(pb.Progress(index=event.index, timestep=event.timestep, num_steps=event.num_steps,
                                          latency_seconds=event.latency_s))
    elif isinstance(event, Completed):
        out.completed.CopyFrom(pb.Completed(image_png=event.image_png, audit_json=event.audit_json))
    elif isinstance(event, Failed):
        out.failed.CopyFrom(pb.Failed(code=status_code(event.code), message=event.message))
    else:
        raise TypeError(f"not an event: {type(event).__name__}")
    return out


def event_from_pb(e: Any) -> Event:
    kind = e.WhichOneof("event")
    if kind == "queued":
        return Queued(position=e.queued.position)
    if kind == "started":
        return Started(worker=e.started.worker, attempt=e.started.attempt or 1)
    if kind == "step":
        s = e.step
        return Step(index=s.index, timestep=s.timestep, num_steps=s.num_steps, latency_s=s.latency_seconds,
                    maps={k: tensor_from_pb(v) for k, v in s.maps.items()},
                    tokens=tuple(TokenMap(t.token, tensor_from_pb(t.map), t.relevance) for t in s.tokens),
                    x0_preview=tensor_from_pb(s.x0_preview) if s.HasField("x0_preview") else None,
                    rise=RiseStats(s.rise.masks_used, s.rise.masks_planned, _opt(s.rise, "split_half_r"),
                                   _opt(s.rise, "stop_at_r")) if s.HasField("rise") else None)
    if kind == "progress":
        p = e.progress
        return Progress(index=p.index, timestep=p.timestep, num_steps=p.num_steps, latency_s=p.latency_seconds)
    if kind == "completed":
        return Completed(image_png=e.completed.image_png, audit_json=e.completed.audit_json)
    if kind == "failed":
        return Failed(code=cast(FailureCode, STATUS_NAMES.get(e.failed.code, "UNKNOWN")), message=e.failed.message)
    raise ValueError("an ExplainEvent with no event set")


# ---------------------------------------------------------------- jobs and models


def job_to_pb(r: JobRecord) -> Any:
    return pb.Job(id=r.id, state=JOB_STATES[r.state], model=r.model, queue_position=r.queue_position, error=r.error,
                  created_at=r.created_at, updated_at=r.updated_at, worker=r.worker, deliveries=r.deliveries)


def job_from_pb(j: Any) -> JobRecord:
    states = {v: k for k, v in JOB_STATES.items()}
    return JobRecord(id=j.id, state=states[j.state], model=j.model,  # type: ignore[arg-type]
                     created_at=j.created_at, updated_at=j.updated_at, queue_position=j.queue_position,
                     error=j.error, worker=j.worker, deliveries=j.deliveries)


def model_to_pb(m: CatalogModel, *, is_default: bool, limits: Limits, queue: tuple[int, int] = (0, 0)) -> Any:
    """`queue`: (jobs waiting, live workers) of the model's queue, as the front last sampled them."""
    width, height = m.default_size
    return pb.ModelInfo(name=m.name, default_steps=m.defaults.steps, default_guidance_scale=m.defaults.guidance_scale,
                        default_scheduler=_number(SCHEDULERS, m.defaults.scheduler), default_width=width,
                        default_height=height, size_multiple=m.size_multiple, cam_layers=list(m.cam_layers),
                        is_default=is_default, num_train_timesteps=m.num_train_timesteps,
                        max_prompt_tokens=min(m.max_prompt_tokens, limits.max_prompt_tokens),
                        queue_depth=queue[0], live_workers=queue[1],
                        max_side=model_max_side(cast("Model", m), limits.max_side))


def limits_to_pb(limits: Limits) -> Any:
    return pb.RequestLimits(max_steps=limits.max_steps, max_side=limits.max_side, max_masks=limits.max_masks,
                            max_mask_steps=limits.max_mask_steps, max_rise_batch=limits.max_rise_batch,
                            max_cam_layers=limits.max_cam_layers)
