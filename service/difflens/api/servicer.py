"""The Explainer servicer: convert at the edge, call the Front, convert back. Errors are the interceptor's.

With authentication (api/auth.py) a call acts for its API key's tenant: its jobs carry the tenant, idempotency
keys are the tenant's, and another tenant's job is NOT_FOUND to it. Without, idempotency is scoped by caller: the
call metadata `x-difflens-caller` when given, else the TLS peer identity (mutual TLS), else empty (one shared scope
for every anonymous caller), and every job is everyone's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc

from difflens.api import convert
from difflens.api.auth import current_caller
from difflens.api.front import Front
from difflens.api.pb import pb, pb_grpc
from difflens.errors import Unauthenticated

CALLER_KEY = "x-difflens-caller"


def caller_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_KEY:
            return str(value)
    identities = context.peer_identities()
    return b",".join(identities).decode("utf-8", "replace") if identities else ""


class ExplainerServicer(pb_grpc.ExplainerServicer):
    def __init__(self, front: Front) -> None:
        self.front = front

    def _tenant(self) -> str | None:
        """The caller's tenant; None where the server authenticates no one (every job is everyone's)."""
        who = current_caller()
        if who is None and self.front.settings.auth.enabled:
            raise Unauthenticated()  # a handler the auth interceptor did not wrap must not act for anyone
        return None if who is None else who.tenant

    async def _submit(self, request: Any, context: grpc.aio.ServicerContext, deadline: float | None) -> Any:
        tenant, who = self._tenant(), current_caller()
        spec = convert.request_to_spec(request, caller="" if tenant is not None else caller_of(context),
                                       deadline=deadline, limits=self.front.settings.limits)
        spec = dataclasses.replace(spec, tenant=tenant or "")
        return await self.front.submit(spec, who.limits.max_in_flight if who is not None else 0)

    async def Explain(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # one call for drain, from the enqueue to the last event; the stream is taken first: a refusal queues nothing
        async with self.front.active(), self.front.stream():
            record = await self._submit(request, context, convert.job_deadline(request, context.time_remaining()))
            async for seq, event in self.front.follow(record.id, admit=True, created=record):
                yield convert.event_to_pb(record.id, seq, event)

    async def Submit(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Submit returns at once: its own deadline says nothing about the job's (timeout_seconds does).
        return convert.job_to_pb(await self._submit(request, context, convert.job_deadline(request, None)))

    async def GetJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return convert.job_to_pb(await self.front.get(request.job_id, self._tenant()))

    async def WatchJob(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with self.front.stream(request.job_id):
            async for seq, event in self.front.follow(request.job_id, after=request.from_sequence - 1,
                                                      tenant=self._tenant()):
                yield convert.event_to_pb(request.job_id, seq, event)

    async def CancelJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return convert.job_to_pb(await self.front.cancel(request.job_id, self._tenant()))

    async def DeleteJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return convert.job_to_pb(await self.front.delete(request.job_id, self._tenant()))

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        catalog, limits = self.front.catalog, self.front.settings.limits
        models = [convert.model_to_pb(catalog.get(n), is_default=n == catalog.default, limits=limits,
                                      queue=self.front.queue_stats.get(n, (0, 0)))
                  for n in catalog.names()]
        return pb.ListModelsResponse(models=models, limits=convert.limits_to_pb(limits))
