"""The Python client of the difflens gRPC service.

    from difflens.client import DifflensClient, explanation_from_events
    from difflens.engine.options import ExplainOptions, GenerationParams, RiseOptions
    from difflens.jobs import JobSpec

    with DifflensClient("127.0.0.1:50051", caller="alice") as client:
        spec = JobSpec(model="", params=GenerationParams("a red circle", steps=20),
                       explain=ExplainOptions(rise=RiseOptions(num_masks=64)))
        stream = client.explain(spec, timeout=600)
        for event in stream:             # Queued, Started, Step..., then Completed or Failed
            print(stream.job_id, event)
        exp = explanation_from_events(stream.events)   # -> render.write_outputs(exp, "out/")

Events are the domain's (difflens.jobs: numpy maps), or the contract's ExplainEvent with `raw=True`. A request is a
JobSpec (its model '' = the server's default; deadline and caller are ignored: use `timeout` and `caller`) or a
ready pb ExplainRequest.

Retry-friendly: a request without an idempotency key gets a random one, so a retried Submit/Explain never runs a
job twice; UNAVAILABLE is retried (with backoff) up to `retries` times; an Explain stream that breaks after the job
id is known resumes with WatchJob from the next sequence, so no event is lost or repeated, and keeps trying for
`resume_for_s` (30 s by default: long enough for a front to be restarted; the job goes on meanwhile). A step (or
progress) event of a step the stream already gave is skipped: after Redis lost writes it had acknowledged, the
worker that takes the job on publishes the lost steps again, and some may be ones this client received before the
loss (docs/security.md, "Faults"). Such a break is not silent: `stream.on_break(err)` is called once per break if
set (the CLI prints a line), else it is logged as a warning.
RESOURCE_EXHAUSTED is not retried (`retry_after_s(err)` reads the server's hint), except by a broken stream
resuming its job, which waits as the hint says (a front at its stream limit). `caller` (metadata
x-difflens-caller) scopes idempotency keys on a server without API keys: the same key from another caller is
another job.

A server that requires API keys gets `api_key` as `authorization: Bearer <key>` on every call. TLS: `tls_ca` (the
CA file that signed the server's certificate; `tls=True` alone trusts the system's CAs), and for mutual TLS
`tls_cert` and `tls_key` (the client's certificate and key, PEM files).

    DifflensClient("difflens.example.com:443", api_key=os.environ["DIFFLENS_API_KEY"], tls_ca="ca.pem")
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from difflens.api import convert
from difflens.api.auth import AUTHORIZATION
from difflens.api.interceptors import RETRY_AFTER_KEY
from difflens.api.pb import pb, pb_grpc
from difflens.api.servicer import CALLER_KEY
from difflens.errors import InvalidArgument
from difflens.jobs import TERMINAL_EVENTS, Completed, Event, Failed, JobRecord, JobSpec, Progress, Step

if TYPE_CHECKING:
    from difflens.engine.explain import Explanation

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
MAX_RESUME_BACKOFF_S = 2.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
FIND_JOB_TIMEOUT_S = 10.0  # ExplainStream.cancel before the first event: the Submit that finds the job


def retry_after_s(err: grpc.RpcError) -> float | None:
    """The server's retry hint of a RESOURCE_EXHAUSTED error (trailing metadata `retry-after-s`), or None."""
    for key, value in getattr(err, "trailing_metadata", lambda: ())() or ():
        if key == RETRY_AFTER_KEY:
            return float(value)
    return None


class ExplainStream:
    """An iterator over one job's events (Explain, or WatchJob). `job_id` is known after the first event;
    `events` keeps every event received; `cancel()` asks the server to stop the job and ends the stream.
    `on_break(err)`, if set, is called when the stream of a known job breaks and is about to be resumed (once per
    break, however many attempts the resume takes); unset, the break is logged as a warning."""

    def __init__(self, client: DifflensClient, open_call: Callable[[], Any], *, raw: bool,
                 deadline: float | None, find_job: Callable[[], str] | None = None) -> None:
        self.client = client
        self._find_job = find_job
        self.job_id = ""
        self.sequence = -1
        self.events: list[Event] = []
        self._steps: set[tuple[str, int]] = set()  # (event kind, step index) of the Step and Progress events given
        self._raw = raw
        self._deadline = deadline
        self._call: Any = open_call()
        self._open_first = open_call
        self._done = False
        self.on_break: Callable[[grpc.RpcError], None] | None = None

    def __iter__(self) -> Iterator[Any]:
        attempts, broke_at = 0, 0.0
        while not self._done:
            try:
                for msg in self._call:
                    if msg.sequence <= self.sequence:
                        continue  # a resumed or retried stream replays what we already have
                    self.job_id, self.sequence = msg.job_id, msg.sequence
                    event = convert.event_from_pb(msg)
                    if self._given_before(event):
                        continue
                    self.events.append(event)
                    self._done = isinstance(event, TERMINAL_EVENTS)
                    yield msg if self._raw else event
                    if self._done:  # the terminal event is the job's last: no need to wait for the stream's close
                        return
                    attempts = 0
                return  # the server ended the stream (WatchJob from past the end ends without a terminal event)
            except grpc.RpcError as e:
                if self._done:
                    return
                # Resuming a job that goes on, a front at its stream limit (max_streams) says when to come back:
                # its clients' streams must not end there while the fronts that are left take the load of one gone.
                resuming = bool(self.events) or attempts > 0  # not a first call: that reports it, as Explain does
                hint = retry_after_s(e) if resuming and self.job_id and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED \
                    else None
                if e.code() not in RETRYABLE and hint is None:
                    raise
                if hint is not None and not hint > 0:
                    hint = self.client.backoff_s  # a hint of 0 (or nonsense) must not make a busy loop
                attempts += 1
                wait = self.client.backoff_s * 2 ** min(attempts - 1, 16)
                if self.job_id:  # the job exists and goes on: ride out a front's restart, not just a blip
                    broke_at = broke_at if attempts > 1 else time.monotonic()
                    wait = min(wait, MAX_RESUME_BACKOFF_S) if hint is None else hint
                    if time.monotonic() + wait - broke_at > self.client.resume_for_s:
                        raise
                    if attempts == 1:
                        self._tell_break(e)
                elif attempts > self.client.retries:
                    raise
                time.sleep(wait)
                self._call = self._reopen()

    def _given_before(self, event: Event) -> bool:
        """Whether `event` is a step (or progress) event of a step this stream already gave (see the module doc)."""
        if not isinstance(event, Step | Progress):
            return False
        key = (type(event).__name__, event.index)
        if key in self._steps:
            log.info("job %s: step %d came again (a worker published it again after the queue lost it); skipped",
                     self.job_id, event.index)
            return True
        self._steps.add(key)
        return False

    def _tell_break(self, err: grpc.RpcError) -> None:
        if self.on_break is not None:
            self.on_break(err)
        else:
            log.warning("the stream of job %s broke (%s: %s); resuming it with WatchJob for up to %g s", self.job_id,
                        err.code().name, err.details(), self.client.resume_for_s)

    def _reopen(self) -> Any:
        if not self.job_id:  # nothing arrived: Explain again (same idempotency key, so the same job)
            return self._open_first()
        timeout = None if self._deadline is None else max(0.0, self._deadline - time.time())
        return self.client.stub.WatchJob(pb.WatchJobRequest(job_id=self.job_id, from_sequence=self.sequence + 1),
                                         timeout=timeout, metadata=self.client.metadata)

    def cancel(self) -> None:
        """Stop the job and end the stream. Before the first event its id is not known yet (ending the call alone
        would leave the job running): the request's idempotency key finds it - a Submit of the same request returns
        that job, or makes it if the call never reached a front, and the cancel then ends it before it runs or at
        its first step. Sets `job_id`. Raises grpc.RpcError when the server cannot be asked."""
        self._call.cancel()
        if not self.job_id and self._find_job is not None:
            self.job_id = self._find_job()
        if self.job_id:
            self.client.cancel(self.job_id)

    @property
    def result(self) -> Completed | Failed | None:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, Completed | Failed) else None


def channel_credentials(tls_ca: str | None = None, tls_cert: str | None = None,
                        tls_key: str | None = None) -> grpc.ChannelCredentials:
    """TLS credentials from PEM files: the CA to trust (None: the system's), a client certificate and key for
    mutual TLS (both or neither). InvalidArgument naming the parameter of a file that cannot be read."""
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("tls_key" if tls_key is None else "tls_cert",
                              "a client certificate needs its key (both, or neither)")
    files: dict[str, bytes | None] = {}
    for name, path in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)):
        try:
            files[name] = None if path is None else Path(path).read_bytes()
        except OSError as e:
            raise InvalidArgument(name, f"cannot read {path}: {e.strerror or e}") from None
    return grpc.ssl_channel_credentials(root_certificates=files["tls_ca"], private_key=files["tls_key"],
                                        certificate_chain=files["tls_cert"])


class DifflensClient:
    """A connection to a difflens front. Thread-safe (one gRPC channel); close() or use as a context manager."""

    def __init__(self, target: str, *, caller: str | None = None, api_key: str | None = None,
                 tls: bool | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, retries: int = 3, backoff_s: float = 0.2, resume_for_s: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.target = target
        self.retries = retries
        self.backoff_s = backoff_s
        self.resume_for_s = resume_for_s
        self.metadata: tuple[tuple[str, str], ...] = (((CALLER_KEY, caller),) if caller else ()) + (
            ((AUTHORIZATION, f"Bearer {api_key}"),) if api_key else ())
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if tls or (tls is None and (tls_ca or tls_cert or tls_key)):
            self.channel = grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key), options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.ExplainerStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> DifflensClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ calls

    def request(self, spec: JobSpec | Any, timeout_s: float | None = None) -> Any:
        """JobSpec or ExplainRequest -> an ExplainRequest that carries an idempotency key, and `timeout_s` as its
        timeout_seconds (an ExplainRequest that has another one: InvalidArgument)."""
        if not isinstance(spec, pb.ExplainRequest):
            req = convert.spec_to_request(spec, timeout_s)
        else:
            if timeout_s is not None and spec.HasField("timeout_seconds") and spec.timeout_seconds != timeout_s:
                raise InvalidArgument("timeout_s", f"got {timeout_s}; the request says timeout_seconds "
                                                   f"{spec.timeout_seconds}: give one of them")
            req = pb.ExplainRequest.FromString(spec.SerializeToString())  # leave the caller's message alone
            if timeout_s is not None:
                req.timeout_seconds = timeout_s
        if not req.idempotency_key:
            req.idempotency_key = f"client-{uuid.uuid4().hex}"
        return req

    def explain(self, spec: JobSpec | Any, *, timeout: float | None = None, raw: bool = False) -> ExplainStream:
        """Submit and follow: iterate the returned stream for the events. `timeout` (seconds) is the call's
        deadline, which the server makes the job's deadline."""
        req = self.request(spec)
        deadline = None if timeout is None else time.time() + timeout

        def open_call() -> Any:
            left = None if deadline is None else max(0.0, deadline - time.time())
            return self.stub.Explain(req, timeout=left, metadata=self.metadata)

        return ExplainStream(self, open_call, raw=raw, deadline=deadline,
                             find_job=lambda: self.submit(req, timeout=FIND_JOB_TIMEOUT_S).id)

    def watch(self, job_id: str, *, from_sequence: int = 0, timeout: float | None = None,
              raw: bool = False) -> ExplainStream:
        """Replay a job's events from `from_sequence`, then follow it to the end."""
        deadline = None if timeout is None else time.time() + timeout
        stream = ExplainStream(self, lambda: self.stub.WatchJob(
            pb.WatchJobRequest(job_id=job_id, from_sequence=from_sequence), timeout=timeout,
            metadata=self.metadata), raw=raw, deadline=deadline)
        stream.job_id, stream.sequence = job_id, from_sequence - 1
        return stream

    def submit(self, spec: JobSpec | Any, *, timeout_s: float | None = None, timeout: float | None = 30.0) -> JobRecord:
        """Queue a job and return its record at once. `timeout_s` bounds the job's run (timeout_seconds);
        `timeout` the call."""
        req = self.request(spec, timeout_s)
        return convert.job_from_pb(self._unary(self.stub.Submit, req, timeout))

    def get(self, job_id: str, *, timeout: float | None = 30.0) -> JobRecord:
        return convert.job_from_pb(self._unary(self.stub.GetJob, pb.GetJobRequest(job_id=job_id), timeout))

    def cancel(self, job_id: str, *, timeout: float | None = 30.0) -> JobRecord:
        return convert.job_from_pb(self._unary(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id), timeout))

    def delete(self, job_id: str, *, timeout: float | None = 30.0) -> JobRecord:
        """Delete a job that ended, with its events and record, before they expire; returns it as it was
        (FAILED_PRECONDITION while it is queued or running)."""
        return convert.job_from_pb(self._unary(self.stub.DeleteJob, pb.DeleteJobRequest(job_id=job_id), timeout))

    def list_models(self, *, timeout: float | None = 30.0) -> Any:
        """The ListModelsResponse: models (the default first, with defaults, size multiple, CAM layers) and the
        deployment's request limits."""
        return self._unary(self.stub.ListModels, pb.ListModelsRequest(), timeout)

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")


def explanation_from_events(events: list[Event]) -> Explanation:
    """A completed job's events -> an engine Explanation, so render.write_outputs writes the same files as a local
    `difflens explain`: the image from the PNG, params/timesteps from the audit record, maps (h, w) per step,
    attention as attn (T, h, w) and attn_relevance (T,), explainer timings from the record."""
    import io
    import json

    import numpy as np
    import torch
    from PIL import Image

    from difflens.engine.explain import Explanation, StepExplanation
    from difflens.engine.options import GenerationParams
    from difflens.engine.sampler import Generation

    done = events[-1] if events else None
    if not isinstance(done, Completed):
        raise ValueError(f"the job did not complete: {done}")
    record = json.loads(done.audit_json)
    resolved = record["resolved"]
    seconds = {row["index"]: {k[:-2]: v for k, v in row.items() if k.endswith("_s") and k != "denoise_s"}
               for row in record.get("timings", {}).get("steps", [])}
    # The prompt's words; a record from before they were recorded has them only with attention maps.
    steps, tokens = [], [str(w) for w in resolved.get("tokens", [])]
    # A prompt of no words has attention maps of no rows, (0, h, w): no TokenMap carries them (older records
    # lack the size, and then the step has no attention maps)
    size = resolved.get("latent_size")
    attention_on = "attn" in resolved.get("methods", ()) and isinstance(size, list) and len(size) == 2
    for ev in events:
        if not isinstance(ev, Step):
            continue
        maps = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in ev.maps.items()}  # writable copies
        if ev.tokens:
            tokens = [t.token for t in ev.tokens]
            maps["attn"] = torch.from_numpy(np.stack([np.asarray(t.map, np.float32) for t in ev.tokens]))
            maps["attn_relevance"] = torch.tensor([t.relevance for t in ev.tokens], dtype=torch.float32)
        elif attention_on:
            maps["attn"] = torch.zeros((0, int(size[0]), int(size[1])))
            maps["attn_relevance"] = torch.zeros(0)
        steps.append(StepExplanation(ev.index, ev.timestep, maps, seconds.get(ev.index, {}), rise=ev.rise))
    image = np.asarray(Image.open(io.BytesIO(done.image_png)).convert("RGB"))
    timesteps = [int(t) for t in resolved["timesteps"]]
    gen = resolved["generation"]
    params = GenerationParams(gen["prompt"], negative_prompt=gen["negative_prompt"], seed=gen["seed"])
    generation = Generation(image.astype(np.float32) / 255.0, torch.empty(0), timesteps, params, [])
    return Explanation(image, timesteps, steps, tokens, resolved, generation)
