"""Settings: one frozen object built once at start-up from flags and the environment, then passed down.

Nothing deeper in the code reads os.environ. Environment variables (all optional):
DIFFLENS_DEVICE (cpu | cuda | cuda:N), DIFFLENS_DTYPE (float32 | float16 | bfloat16),
DIFFLENS_UNET_BACKEND (eager | compile | triton), DIFFLENS_THREADS (torch's CPU threads, else OMP_NUM_THREADS; 0 or
unset: the CPUs this process may use), and for the triton backend DIFFLENS_TRITON_URL (HOST:PORT of the server's gRPC
endpoint), DIFFLENS_TRITON_MODEL ([MODEL=]NAME, comma-separated), DIFFLENS_TRITON_WAIT_S and
DIFFLENS_TRITON_CALL_TIMEOUT_S.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, get_args

from difflens.auth.settings import AuthSettings, TlsSettings
from difflens.errors import InvalidArgument

DType = Literal["float32", "float16", "bfloat16"]
DTYPES: tuple[str, ...] = get_args(DType)
TRITON_DTYPES = ("float32", "float16")  # what the triton backend sends (triton.contract.TRITON_TYPES)
UNetBackend = Literal["eager", "compile", "triton"]  # engine.options.Backend
TRITON_URL_ALLOWED = "allowed: HOST:PORT of the Triton server's gRPC endpoint (8001 by default), no scheme"
TRITON_MODEL_ALLOWED = "allowed: NAME or MODEL=NAME, a Triton model name of letters, digits, '.', '_' and '-'"
THREADS_ALLOWED = "allowed: an integer >= 0 (0: the CPUs this process may use)"
AUDIT_DIR_HELP = ("also keep every completed job's audit record here, <UTC date>/<job id>.a<attempt>.json "
                  "(default: DIFFLENS_AUDIT_DIR; none)")


# Spin iterations of an idle OpenMP (libgomp) thread before it sleeps, in worker processes. libgomp's default
# (300,000) keeps torch's thread team spinning for milliseconds after every parallel region; after each job that is
# a core taken from the front, Redis and the client on the same machine (bench.service on 2 cores: ~10 ms of worker
# CPU per tiny job, all of it spinning). 30,000 still bridges the gaps inside a job, a step event's publish
# included: measured against the default, paired, same run, 80 pairs: tiny plain job -1.1 ms added, DF-RISE job
# unchanged (10,000 gained 2 ms on the plain job but lost 2.5 ms on the DF-RISE one, whose threads then slept
# through each publish).
WORKER_GOMP_SPINCOUNT = "30000"


def limit_idle_spin(env: MutableMapping[str, str] | None = None) -> bool:
    """In a worker process, before torch loads: shorten libgomp's idle spin to WORKER_GOMP_SPINCOUNT, unless the
    operator chose a wait policy (OMP_WAIT_POLICY or GOMP_SPINCOUNT set). Returns whether it set it; False once
    torch is loaded, since libgomp reads its environment when it loads."""
    env = os.environ if env is None else env
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env or "torch" in sys.modules:
        return False
    env["GOMP_SPINCOUNT"] = WORKER_GOMP_SPINCOUNT
    return True


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a container's CPU limit,
    cgroup v2 cpu.max or v1 cfs_quota_us / cfs_period_us) rounded up. os.cpu_count() - what torch uses by default -
    counts the host's cores: in a pod limited to 4 CPUs on a 64-core node that is 64 threads fighting over 4 CPUs'
    worth of time, and every parallel op waits at its barrier for threads the quota has parked."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:
        fields = (cgroup_root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            quota = int(fields[0]) / int(fields[1])
    except (OSError, ValueError, IndexError):
        try:
            q = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
            if q > 0:
                quota = q / int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError, ZeroDivisionError):
            pass
    if quota is not None and quota > 0:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


T = TypeVar("T")


def _build(cls: type[T], values: dict[str, object], origin: dict[str, str], overrides: Mapping[str, object]) -> T:
    """cls(**values) with the flag overrides (those not None) applied last; an InvalidArgument about a value that
    came from the environment names its variable (the user never typed the flag)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {**values, **given}
    try:
        return cls(**values)
    except InvalidArgument as e:
        if e.field in origin and e.field not in given:
            raise InvalidArgument(origin[e.field], e.message) from None
        raise


@dataclass(frozen=True)
class Settings:
    device: str = "cpu"
    dtype: DType = "float32"
    unet_backend: UNetBackend = "eager"
    threads: int = 0  # torch intra-op threads; 0: available_cpus()
    # The triton backend: where the server's gRPC endpoint is, which of its models serves each difflens model
    # (("", NAME) for every model; none named: the difflens model's own name), how long start-up waits for it, and
    # how long one UNet call may take before its job fails UNAVAILABLE (a stalled server must not hold a job forever).
    triton_url: str | None = None
    triton_models: tuple[tuple[str, str], ...] = ()
    triton_wait_s: float = 60.0
    triton_call_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise InvalidArgument("threads", f"got {self.threads}; {THREADS_ALLOWED}")
        if self.dtype not in get_args(DType):
            raise InvalidArgument("dtype", f"got {self.dtype!r}; allowed: {', '.join(get_args(DType))}")
        if self.unet_backend not in get_args(UNetBackend):
            raise InvalidArgument("unet_backend",
                                  f"got {self.unet_backend!r}; allowed: {', '.join(get_args(UNetBackend))}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise InvalidArgument("device", f"got {self.device!r}; allowed: cpu, cuda, cuda:N")
        self._check_triton()

    def _check_triton(self) -> None:
        if self.triton_url is not None and not re.fullmatch(r"([^\s:/\[\]]+|\[[0-9a-fA-F:.]+\]):\d{1,5}",
                                                             self.triton_url):
            raise InvalidArgument("triton_url", f"got {self.triton_url!r}; {TRITON_URL_ALLOWED}")
        for model, name in self.triton_models:
            if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
                shown = f"{model}={name}" if model else name
                raise InvalidArgument("triton_models", f"got {shown!r}; {TRITON_MODEL_ALLOWED}")
        if not self.triton_wait_s >= 0:
            raise InvalidArgument("triton_wait_s", f"got {self.triton_wait_s}; must be >= 0 (seconds)")
        if not 0 < self.triton_call_timeout_s < math.inf:  # gRPC takes no infinite deadline
            raise InvalidArgument("triton_call_timeout_s",
                                  f"got {self.triton_call_timeout_s}; must be > 0 and finite (seconds)")
        if self.unet_backend != "triton":
            return
        if self.triton_url is None:
            raise InvalidArgument("triton_url", f"the triton UNet backend needs the server's address; "
                                                f"{TRITON_URL_ALLOWED}")
        if self.dtype not in TRITON_DTYPES:
            raise InvalidArgument("dtype", f"got {self.dtype!r}; the triton UNet backend takes "
                                           f"{' or '.join(TRITON_DTYPES)} (tensors travel as numpy, which has no "
                                           "bfloat16)")

    def triton_model(self, model: str) -> str:
        """The Triton model that serves difflens model `model`: the one named for it, else the one named for every
        model, else the same name."""
        named = dict(self.triton_models)
        return named.get(model) or named.get("") or model

    @staticmethod
    def parse_triton_models(values: list[str] | None) -> tuple[tuple[str, str], ...]:
        """['NAME' | 'MODEL=NAME', ...] -> (('' | MODEL, NAME), ...); errors name the field triton_models."""
        out = []
        for v in values or []:
            model, sep, name = v.rpartition("=")
            if (sep and not model) or not name:
                raise InvalidArgument("triton_models", f"got {v!r}; {TRITON_MODEL_ALLOWED}")
            out.append((model, name))
        if len(dict(out)) != len(out):
            raise InvalidArgument("triton_models", f"got {values}; one Triton model per difflens model")
        return tuple(out)

    def apply_threads(self) -> int:
        """Set torch's intra-op threads for this process (a worker's, once at start); returns the count."""
        import torch

        n = self.threads or available_cpus()
        torch.set_num_threads(n)
        return n

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Environment first, then explicit (flag) overrides that are not None."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        origin: dict[str, str] = {}  # field -> the variable it came from, for errors
        for key, var in (("device", "DIFFLENS_DEVICE"), ("dtype", "DIFFLENS_DTYPE"),
                         ("unet_backend", "DIFFLENS_UNET_BACKEND"), ("triton_url", "DIFFLENS_TRITON_URL")):
            if var in env:
                values[key], origin[key] = env[var], var
        if "DIFFLENS_TRITON_MODEL" in env:
            origin["triton_models"] = "DIFFLENS_TRITON_MODEL"
            try:
                values["triton_models"] = cls.parse_triton_models(
                    [v.strip() for v in env["DIFFLENS_TRITON_MODEL"].split(",") if v.strip()])
            except InvalidArgument as e:
                raise InvalidArgument("DIFFLENS_TRITON_MODEL", e.message) from None
        for key, var in (("triton_wait_s", "DIFFLENS_TRITON_WAIT_S"),
                         ("triton_call_timeout_s", "DIFFLENS_TRITON_CALL_TIMEOUT_S")):
            if var in env:
                try:
                    values[key] = float(env[var])
                except ValueError as e:
                    raise InvalidArgument(var, f"got {env[var]!r}: {e}") from e
                origin[key] = var
        for var in ("DIFFLENS_THREADS", "OMP_NUM_THREADS"):  # the OpenMP convention too, as torch honours it
            if var in env:
                # OMP_NUM_THREADS may list a count per nesting level ("4,2"): the first is this level's
                raw = env[var].split(",")[0] if var == "OMP_NUM_THREADS" else env[var]
                try:
                    threads = int(raw)
                except ValueError:
                    threads = -1
                if threads < 0:
                    raise InvalidArgument(var, f"got {env[var]!r}; {THREADS_ALLOWED}")
                values["threads"] = threads
                break
        return _build(cls, values, origin, overrides)


# `difflens serve` / `difflens worker` with no --model serve this folder as "default" (the repository's models/).
SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The front checks these before anything is queued."""

    max_steps: int = 200
    max_side: int = 1024  # width and height, pixels
    # T5's 512 minus its EOS (FLUX's prompt words); each model's own tokenizer caps it further (CLIP's 77 minus
    # BOS/EOS: 75 for SD and SDXL)
    max_prompt_tokens: int = 511
    max_masks: int = 8192
    max_mask_steps: int = 200_000  # masks x explained steps: the DF-RISE work budget of one job
    max_rise_batch: int = 1024
    max_cam_layers: int = 128
    max_idempotency_key: int = 256


@dataclass(frozen=True)
class ServiceSettings:
    """Front and worker settings. `models`: (name, folder) pairs; `redis_url` None means the in-process queue.

    Environment (all optional; flags override): DIFFLENS_REDIS_URL, DIFFLENS_REDIS_PASSWORD (where the URL carries
    none: the same Secret key can feed KEDA's TriggerAuthentication), DIFFLENS_REDIS_USERNAME (an ACL user, where the
    URL names none), DIFFLENS_REDIS_TLS_CA, DIFFLENS_REDIS_TLS_CERT, DIFFLENS_REDIS_TLS_KEY (PEM files for a rediss://
    URL: the CA that signed Redis' certificate, and a client certificate and key where Redis asks for one),
    DIFFLENS_QUEUE (stream name prefix),
    DIFFLENS_MAX_QUEUE_DEPTH, DIFFLENS_MAX_STREAMS, DIFFLENS_VISIBILITY_TIMEOUT_S, DIFFLENS_HEARTBEAT_INTERVAL_S
    (shorter than the visibility timeout), DIFFLENS_MAX_DELIVERIES, DIFFLENS_RESULT_TTL_S (how long a job's state
    and events stay in Redis after its last write), DIFFLENS_AUDIT_DIR, DIFFLENS_METRICS_HOST (where /metrics listens),
    DIFFLENS_REDIS_WAIT_S (how long a front or worker waits at start-up for Redis to answer), DIFFLENS_DRAIN_GRACE_S
    (on SIGTERM: a front's running streams, a worker's held jobs before it hands them back), plus Settings'
    variables and those of `auth` and `tls` (auth/settings.py). A bad value from the environment is an error naming
    its variable.
    """

    engine: Settings = Settings()
    models: tuple[tuple[str, str], ...] = ()
    default_model: str = "default"
    redis_url: str | None = None
    # Used where redis_url carries no password of its own (DIFFLENS_REDIS_PASSWORD); never printed.
    redis_password: str | None = field(default=None, repr=False)
    redis_username: str | None = None
    redis_tls_ca: str | None = None
    redis_tls_cert: str | None = None
    redis_tls_key: str | None = None
    queue_name: str = "difflens"
    max_queue_depth: int = 1000  # jobs waiting, per model
    # Job streams (Explain, WatchJob) one front follows at once; past it a new one gets RESOURCE_EXHAUSTED. Each
    # holds a Redis connection while it waits for events (or, on the in-process queue, a thread).
    max_streams: int = 500
    visibility_timeout_s: float = 30.0
    heartbeat_interval_s: float = 5.0
    max_deliveries: int = 3
    result_ttl_s: float = 24 * 3600.0
    redis_wait_s: float = 60.0
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None
    metrics_host: str | None = None  # where /metrics listens; None: `host` (a worker's: 127.0.0.1)
    max_message_bytes: int = 64 * 2**20
    drain_grace_s: float = 30.0
    worker_max_jobs: int = 4  # jobs a worker runs at once (their DF-RISE masks share UNet batches)
    worker_max_batch: int = 64  # samples per shared UNet call
    # Workers also write every completed job's audit record here (audit.store), before the image is delivered:
    # the record outlives the job's TTL in Redis. None: the record travels only in the Completed event.
    audit_dir: str | None = None
    limits: Limits = Limits()
    # Who may call the front (API keys, tenants' limits) and the gRPC port's TLS: the front's alone
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()

    def __post_init__(self) -> None:
        names = [n for n, _ in self.models]
        if len(set(names)) != len(names):
            raise InvalidArgument("model", f"model names must be unique, got {names}")
        for n in names:
            if not n or "=" in n:
                raise InvalidArgument("model", f"bad model name {n!r}; use NAME=DIR")
        for name in ("visibility_timeout_s", "heartbeat_interval_s"):
            if not getattr(self, name) > 0:  # a zero heartbeat interval spins a CPU on an idle worker
                raise InvalidArgument(name, f"got {getattr(self, name)}; must be > 0")
        if self.heartbeat_interval_s >= self.visibility_timeout_s:
            raise InvalidArgument("heartbeat_interval_s", "must be shorter than visibility_timeout_s")
        for name in ("max_queue_depth", "max_streams", "worker_max_jobs", "worker_max_batch"):
            if getattr(self, name) < 1:
                raise InvalidArgument(name, f"got {getattr(self, name)}; must be >= 1")
        if not self.drain_grace_s >= 0:
            raise InvalidArgument("drain_grace_s", f"got {self.drain_grace_s}; must be >= 0")
        if self.max_deliveries < 1:
            raise InvalidArgument("max_deliveries", "must be >= 1")
        if not self.result_ttl_s > 0:
            raise InvalidArgument("result_ttl_s", f"got {self.result_ttl_s}; must be > 0")
        if not self.redis_wait_s >= 0:
            raise InvalidArgument("redis_wait_s", f"got {self.redis_wait_s}; must be >= 0")

    def model_dirs(self) -> dict[str, str]:
        """name -> folder; with none configured, the shipped model as 'default'."""
        if self.models:
            return dict(self.models)
        return {self.default_model: str(SHIPPED_MODEL)}

    @staticmethod
    def parse_models(values: list[str] | None) -> tuple[tuple[str, str], ...]:
        """['name=DIR', ...] -> (('name', 'DIR'), ...); errors name the --model flag."""
        out = []
        for v in values or []:
            name, sep, folder = v.partition("=")
            if not sep or not name or not folder:
                raise InvalidArgument("--model", f"got {v!r}; expected NAME=DIR")
            out.append((name, folder))
        return tuple(out)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> ServiceSettings:
        """Environment first, then explicit (flag) overrides that are not None."""
        env = os.environ if env is None else env
        values: dict[str, object] = {"engine": Settings.from_env(env), "auth": AuthSettings.from_env(env),
                                     "tls": TlsSettings.from_env(env)}
        origin: dict[str, str] = {}
        for key, var, conv in (("redis_url", "DIFFLENS_REDIS_URL", str),
                               ("redis_password", "DIFFLENS_REDIS_PASSWORD", str),
                               ("redis_username", "DIFFLENS_REDIS_USERNAME", str),
                               ("redis_tls_ca", "DIFFLENS_REDIS_TLS_CA", str),
                               ("redis_tls_cert", "DIFFLENS_REDIS_TLS_CERT", str),
                               ("redis_tls_key", "DIFFLENS_REDIS_TLS_KEY", str),
                               ("queue_name", "DIFFLENS_QUEUE", str),
                               ("metrics_host", "DIFFLENS_METRICS_HOST", str),
                               ("max_queue_depth", "DIFFLENS_MAX_QUEUE_DEPTH", int),
                               ("max_streams", "DIFFLENS_MAX_STREAMS", int),
                               ("visibility_timeout_s", "DIFFLENS_VISIBILITY_TIMEOUT_S", float),
                               ("heartbeat_interval_s", "DIFFLENS_HEARTBEAT_INTERVAL_S", float),
                               ("max_deliveries", "DIFFLENS_MAX_DELIVERIES", int),
                               ("result_ttl_s", "DIFFLENS_RESULT_TTL_S", float),
                               ("audit_dir", "DIFFLENS_AUDIT_DIR", str),
                               ("redis_wait_s", "DIFFLENS_REDIS_WAIT_S", float),
                               ("drain_grace_s", "DIFFLENS_DRAIN_GRACE_S", float)):
            if var in env:
                try:
                    values[key] = conv(env[var])
                except ValueError as e:
                    raise InvalidArgument(var, f"got {env[var]!r}: {e}") from e
                origin[key] = var
        return _build(cls, values, origin, overrides)
