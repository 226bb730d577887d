"""Jobs and their events: the domain types the gRPC front, the queue and the workers exchange.

A `JobSpec` is a validated request (engine option dataclasses plus serving fields); it travels through the queue
as JSON. An `Event` is one thing that happened to a job (queued, started, an explained step, completed, failed);
it travels as bytes. Both codecs (and the type check of JSON written by someone else) are in job_codec.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from difflens.engine.options import ExplainOptions, GenerationParams, RiseStats, check_choice

JobStateName = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
MapDType = Literal["float16", "float32"]
# Failure codes are gRPC status names; api/ maps them to grpc.StatusCode.
FailureCode = Literal["CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL",
                      "UNAVAILABLE", "ABORTED"]


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
        """The JSON the queue carries (job_codec.spec_to_json)."""
        from difflens.job_codec import spec_to_json

        return spec_to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobSpec:
        """to_json's JSON -> JobSpec (job_codec.spec_from_json)."""
        from difflens.job_codec import spec_from_json

        return spec_from_json(text)


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
