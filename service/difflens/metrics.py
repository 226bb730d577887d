"""Every Prometheus collector of difflens, front and worker. Labels are low-cardinality only (never a job id).

method: denoise | rise | cam | attention; t_bucket: timestep // 100 as a string ("0".."9"); tenant: one the front's
--tenant-labels lists, else "other";
status: completed | failed | cancelled | deadline_exceeded (requests refused before queueing are not jobs:
difflens_errors_total{type} counts them).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from difflens.jobs import Failed

REGISTRY = CollectorRegistry(auto_describe=True)

# Per-step work is milliseconds on a GPU and seconds on a CPU: buckets span both.
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# A worker that is free takes a job within a millisecond or two (claim-ahead); a busy deployment's jobs wait
# minutes: from 0.5 ms up.
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 120.0, 300.0, 600.0, 1800.0)

STEP_DURATION = Histogram(
    "difflens_step_duration_seconds", "Wall time of one denoising step's work, by method and timestep bucket.",
    ["model", "method", "t_bucket"], buckets=_STEP_BUCKETS, registry=REGISTRY)
REQUEST_DURATION = Histogram(
    "difflens_request_duration_seconds", "Time from enqueue to the terminal event of a job a worker ran (jobs "
    "the queue ends itself, never run, count in difflens_jobs_total only).",
    ["model", "status"], buckets=_REQUEST_BUCKETS, registry=REGISTRY)
QUEUE_WAIT = Histogram(
    "difflens_queue_wait_seconds", "Time a job waited in the queue before a worker took it (first deliveries).",
    ["model"], buckets=_WAIT_BUCKETS, registry=REGISTRY)
QUEUE_DEPTH = Gauge("difflens_queue_depth", "Jobs waiting in the model's queue (sampled by the front).", ["model"],
                    registry=REGISTRY)
LIVE_WORKERS = Gauge("difflens_live_workers", "Workers serving the model, heard from within the visibility timeout "
                     "(sampled by the front).", ["model"], registry=REGISTRY)
JOBS = Counter("difflens_jobs_total", "Jobs that reached a terminal state, by status.", ["status"],
               registry=REGISTRY)
UNET_BATCH_SIZE = Histogram(
    "difflens_unet_batch_size", "Samples per UNet call (DF-RISE batches shared across a worker's jobs).",
    ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=REGISTRY)
RISE_MASKS = Counter("difflens_rise_masks_total", "DF-RISE masks evaluated.", ["model"], registry=REGISTRY)
ERRORS = Counter("difflens_errors_total", "Errors by type (invalid_argument, resource_exhausted, internal, ...).",
                 ["type"], registry=REGISTRY)
# tenant: a tenant named by the front's --tenant-labels, else "other" (bounded by the operator's list, however many
# tenants hold keys)
TENANT_CALLS = Counter(
    "difflens_tenant_calls_total", "Authenticated calls by tenant and outcome: admitted, rate_limited (over the "
    "tenant's request rate), in_flight_limited (a job refused: the tenant's jobs queued or running at their limit).",
    ["tenant", "outcome"], registry=REGISTRY)

# The series alerts take rate() or increase() of exist from the start, at 0: a counter series born at 1 has no
# earlier sample, and its first event would be lost to those functions (a worker's first dead letter, say).
for _status in ("completed", "failed", "cancelled", "deadline_exceeded"):
    JOBS.labels(_status)
for _type in ("dead_letter", "internal", "deadline_exceeded", "shutdown", "queue"):
    ERRORS.labels(_type)


def t_bucket(timestep: int) -> str:
    return str(max(0, int(timestep)) // 100)


class Health:
    """What a process tells its probes on the metrics port: GET /healthz (liveness: 200 while the process serves
    HTTP at all) and /readyz (200 once it can take work: a front that reaches its queue, a worker whose models are
    loaded and whose queue answered; 503 with the reason before that and while draining). Kubernetes' startup and
    readiness probes read /readyz; a worker has no gRPC port to probe.

    `check` (a worker on the triton backend: its Triton servers' readiness) is asked while the process itself is
    ready: not ready, its reason is the answer. It caches its own answer (probes come every few seconds)."""

    def __init__(self, check: Callable[[], tuple[bool, str]] | None = None) -> None:
        self._lock = threading.Lock()
        self._ready, self._why = False, "starting"
        self.check = check

    def set(self, ready: bool, why: str = "") -> None:
        with self._lock:
            self._ready, self._why = ready, why or ("ready" if ready else "not ready")

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            ready, why = self._ready, self._why
        if ready and self.check is not None:
            ok, reason = self.check()
            if not ok:
                return False, reason
        return ready, why


def _app(health: Health) -> Callable[..., Any]:
    """WSGI: /healthz, /readyz, and every other path the metrics (as prometheus_client serves them)."""
    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            return metrics_app(environ, start_response)
        ok, why = (True, "alive") if path == "/healthz" else health.readiness()
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"{why}\n".encode()]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a probe in flight never holds the process open


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # a probe every few seconds is not news
        pass


def serve_metrics(port: int, addr: str = "127.0.0.1", health: Health | None = None) -> int:
    """/metrics, /healthz and /readyz (from `health`; without one, never ready) on their own port (a daemon
    thread); returns the bound port (0: a free one). A port that cannot be bound is InvalidArgument on
    --metrics-port (exit 2), not a traceback."""
    from difflens.errors import InvalidArgument

    try:
        family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsServer", (_Server,), {"address_family": family})
        httpd: WSGIServer = make_server(addr, port, _app(health or Health()), server_class, _QuietHandler)
    except OSError as e:
        raise InvalidArgument("--metrics-port", f"cannot listen on {addr}:{port}: {e.strerror or e}") from None
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return int(httpd.server_port)


def count_ended(event: Failed) -> None:
    """difflens_jobs_total for a job the queue ended itself (JobQueue.on_ended), with the status labels a worker
    uses for the same outcomes."""
    status = {"CANCELLED": "cancelled", "DEADLINE_EXCEEDED": "deadline_exceeded"}.get(event.code, "failed")
    JOBS.labels(status).inc()
    # the error types a worker counts for the same outcomes (a deadline passed while queued, not only running)
    error = {"DEADLINE_EXCEEDED": "deadline_exceeded", "ABORTED": "dead_letter", "INTERNAL": "internal",
             "UNAVAILABLE": "shutdown"}.get(event.code)
    if error is not None:
        ERRORS.labels(error).inc()
