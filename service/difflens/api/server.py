"""The gRPC front: a grpc.aio server with the Explainer service, the standard health service (grpc.health.v1) and
server reflection, maximum message sizes from the settings, and a graceful drain. With settings.auth.keys_file every
call but health's needs an API key (api/auth.py; the key file is checked for changes every settings.auth.reload_s);
with settings.tls the port speaks TLS (api/tls.py), mutual TLS with a client CA.

Drain (SIGTERM in `difflens serve`): health goes NOT_SERVING and new Explain / Submit / WatchJob calls get
UNAVAILABLE (clients go to another replica); the job streams already running finish, for up to
settings.drain_grace_s; then the server stops (cancelling what is left, such as health watches, which would
otherwise hold the drain for the whole grace), an embedded worker finishes what it holds, and the process exits.

`DifflensServer` is the asyncio object; `BackgroundServer` runs one on its own event-loop thread (tests, bench).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from difflens import metrics
from difflens.api.front import Front
from difflens.api.interceptors import ErrorInterceptor
from difflens.api.pb import SERVICE_NAME, pb_grpc
from difflens.api.servicer import ExplainerServicer
from difflens.catalog import ModelCatalog
from difflens.config import ServiceSettings
from difflens.errors import InvalidArgument
from difflens.jobs import Failed
from difflens.queue.base import JobQueue
from difflens.queue.common import SHUTDOWN_MESSAGE
from difflens.queue.memory import InProcessQueue

log = logging.getLogger(__name__)

STOP_GRACE_S = 1.0  # for unary calls in flight when the job streams are done


def make_queue(settings: ServiceSettings) -> JobQueue:
    """Redis Streams when settings.redis_url is set, else the in-process queue."""
    if settings.redis_url:
        from difflens.queue.redis_streams import connect

        return connect(settings)  # waits for Redis up to settings.redis_wait_s (before serving: blocking is fine)
    from difflens.queue.memory import InProcessQueue

    return InProcessQueue(settings)


class DifflensServer:
    """The front, and with `run_worker` one worker in the same process (the embedded mode).

    queue: default make_queue(settings); registry: the worker's ModelRegistry (default: one over the settings'
    models; tests hand in preloaded models).
    """

    def __init__(self, settings: ServiceSettings, *, queue: JobQueue | None = None, run_worker: bool = False,
                 registry: Any | None = None, catalog: ModelCatalog | None = None,
                 probe: metrics.Health | None = None) -> None:
        self.settings = settings
        self.probe = probe  # /readyz on the metrics port, kept as the gRPC health is
        # the key file and the TLS files first: a bad one fails at once, not after the wait for Redis
        self.keys = None
        if settings.auth.keys_file is not None:
            from difflens.auth.keys import KeyFileError, KeyStore

            try:
                self.keys = KeyStore(settings.auth.keys_file, settings.auth.limits)
            except (OSError, KeyFileError) as e:  # names the part of the file, never a key or a hash
                raise InvalidArgument("--auth-keys", f"{settings.auth.keys_file}: {e}") from None
        self._credentials = None
        if settings.tls.enabled:
            from difflens.api.tls import server_credentials

            self._credentials = server_credentials(settings.tls)
        self._own_queue = queue is None
        self.queue = queue if queue is not None else make_queue(settings)
        self.queue.on_ended = metrics.count_ended  # queued jobs its callers cancel
        self.catalog = catalog or ModelCatalog.from_settings(settings)
        self.queue.prepare(self.catalog.names())  # KEDA watches a model's consumer group before any worker runs
        self.front = Front(settings, self.queue, self.catalog)
        self.worker: Any = None
        if run_worker:
            from difflens.models import ModelRegistry
            from difflens.worker import Worker

            registry = registry or ModelRegistry(settings)
            entries = registry.load_all()  # a broken folder fails now, not on the first job
            self.worker = Worker(settings, self.queue, registry)
            if probe is not None and settings.engine.unet_backend == "triton":
                from difflens.triton.client import readiness_check

                # /readyz follows the embedded worker's Triton servers, as a worker's does (commands/worker.py)
                probe.check = readiness_check(entries)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._sampler_stop = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None
        self._key_watch: asyncio.Task[None] | None = None

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The error mapping around our handlers, and authentication (outermost) when there are keys."""
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor()]
        if self.keys is not None:
            from difflens.api.auth import AuthInterceptor

            interceptors.insert(0, AuthInterceptor(self.keys, self.front.admit))
        return interceptors

    def _bind(self, server: grpc.aio.Server) -> int:
        address = f"{self.settings.host}:{self.settings.port}"
        if self._credentials is not None:
            return server.add_secure_port(address, self._credentials)
        return server.add_insecure_port(address)

    async def _watch_keys(self) -> None:
        """Take a changed key file within settings.auth.reload_s (a mounted Secret swapped by the kubelet)."""
        assert self.keys is not None
        while not self._sampler_stop.is_set():
            try:
                await asyncio.wait_for(self._sampler_stop.wait(), self.settings.auth.reload_s)
            except TimeoutError:
                if await asyncio.to_thread(self.keys.refresh) == "failed":
                    metrics.ERRORS.labels("auth_keys").inc()

    async def start(self) -> int:
        """Bind settings.host:settings.port (0 = a free port), start serving; returns the bound port."""
        s = self.settings
        options = [("grpc.max_send_message_length", s.max_message_bytes),
                   ("grpc.max_receive_message_length", s.max_message_bytes),
                   ("grpc.so_reuseport", 0)]  # a second server on a taken port must fail, not share it
        server = grpc.aio.server(interceptors=self._interceptors(), options=options)
        pb_grpc.add_ExplainerServicer_to_server(ExplainerServicer(self.front), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            self.port = self._bind(server)
        except RuntimeError as e:  # grpc: "Failed to bind to address ..."
            raise InvalidArgument("--port", f"cannot listen on {s.host}:{s.port}: {e}") from None
        if self.port == 0:
            raise InvalidArgument("--port", f"cannot listen on {s.host}:{s.port}")
        if self.worker is not None:
            self.worker.start()
        await server.start()
        self._server = server
        await self._set_serving(True)
        self._sampler = asyncio.create_task(self.front.sample_depth(self._sampler_stop, self._set_serving))
        if self.keys is not None:
            self._key_watch = asyncio.create_task(self._watch_keys())
        log.info("serving %s on %s:%d (%s queue%s; %s; %s)", SERVICE_NAME, s.host, self.port,
                 "Redis" if s.redis_url else "in-process", ", embedded worker" if self.worker else "",
                 "API keys required" if self.keys is not None else "no authentication",
                 ("mutual TLS" if s.tls.client_ca else "TLS") if s.tls.enabled else "plaintext")
        return self.port

    async def _set_serving(self, serving: bool) -> None:
        """Health of the server and of the Explainer service: NOT_SERVING while the queue cannot be reached, so a
        readiness probe sends callers to a front that can take their jobs (no-op once draining)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)
        if self.probe is not None and not self.front.draining:
            self.probe.set(serving, "serving" if serving else "the queue cannot be reached")

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop gracefully: NOT_SERVING, refuse new work, let running calls finish within `grace_s`
        (default settings.drain_grace_s), then stop the embedded worker (its held jobs fail UNAVAILABLE at their
        next step) and close."""
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        self.front.draining = True
        if self.probe is not None:
            self.probe.set(False, "draining")
        await self.health.enter_graceful_shutdown()
        if not await self.front.wait_idle(grace):
            log.warning("drain: job streams still running after %g s; cancelling them", grace)
        if self.worker is not None:
            # The embedded worker's jobs live in this process's queue, which goes with it: once no stream
            # follows them (or the grace is over) nobody can receive their results, so they fail UNAVAILABLE ("the
            # server shut down ...: submit it again") at their next step instead of running to the end first.
            # Unconditionally: a job the worker just took may not be among held() yet (its thread registers it a
            # moment after the claim), and it must fail too, at its first step.
            held = self.worker.held()
            log.info("drain: the embedded worker's jobs fail at their next step (%d held: %s)", len(held),
                     ", ".join(held) or "none")
            self.worker.fail_held()
            if self._own_queue and isinstance(self.queue, InProcessQueue):
                # ... and in the queue at once, queued ones too: the streams still open get the Failed event
                # before the server stops, even when the step running now outlasts its last second
                ended = self.queue.end_all(Failed("UNAVAILABLE", SHUTDOWN_MESSAGE))
                log.info("drain: %d job(s) not ended failed UNAVAILABLE (the queue goes with the process)", ended)
        if self._server is not None:
            await self._server.stop(STOP_GRACE_S)
        self._sampler_stop.set()
        for task in (self._sampler, self._key_watch):
            if task is not None:
                await task
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop)
        await self.front.close()
        if self._own_queue:
            self.queue.close()
        log.info("drained and stopped")


class BackgroundServer:
    """A DifflensServer on its own event-loop thread: `with BackgroundServer(settings, ...) as srv:` then connect
    to srv.target. Leaving the block drains it (grace `stop_grace_s`)."""

    def __init__(self, settings: ServiceSettings, stop_grace_s: float = 5.0, **kwargs: Any) -> None:
        self.settings = settings
        self.kwargs = kwargs
        self.stop_grace_s = stop_grace_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-front", daemon=True)
        self.server: DifflensServer | None = None

    @property
    def target(self) -> str:
        assert self.server is not None
        return f"{self.settings.host}:{self.server.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def start(self) -> BackgroundServer:
        self.thread.start()

        async def make() -> DifflensServer:  # built on the loop: its asyncio objects belong there
            return DifflensServer(self.settings, **self.kwargs)

        self.server = self._call(make())
        self._call(self.server.start())
        return self

    def stop(self, grace_s: float | None = None) -> None:
        if self.server is not None:
            self._call(self.server.drain(self.stop_grace_s if grace_s is None else grace_s))
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        with contextlib.suppress(RuntimeError):
            self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
