"""The Explainer servicer: convert at the edge, call the Front, convert back. Errors are the interceptor's.

Idempotency is scoped by caller: the call metadata `x-difflens-caller` when given, else the TLS peer identity
(mutual TLS), else empty (one shared scope for every anonymous caller).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from difflens.api import convert
from difflens.api.front import Front
from difflens.api.pb import pb, pb_grpc

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

    async def _submit(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        deadline = convert.job_deadline(request, context.time_remaining())
        spec = convert.request_to_spec(request, caller=caller_of(context), deadline=deadline,
                                       limits=self.front.settings.limits)
        return await self.front.submit(spec)

    async def Explain(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # one call for drain, from the enqueue to the last event; the stream is taken first: a refusal queues nothing
        async with self.front.active(), self.front.stream():
            record = await self._submit(request, context)
            async for seq, event in self.front.follow(record.id, admit=True, created=record):
                yield convert.event_to_pb(record.id, seq, event)

    async def Submit(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Submit returns at once: its own deadline says nothing about the job's (timeout_seconds does).
        spec = convert.request_to_spec(request, caller=caller_of(context),
                                       deadline=convert.job_deadline(request, None), limits=self.front.settings.limits)
        return convert.job_to_pb(await self.front.submit(spec))

    async def GetJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return convert.job_to_pb(await self.front.get(request.job_id))

    async def WatchJob(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with self.front.stream(request.job_id):
            async for seq, event in self.front.follow(request.job_id, after=request.from_sequence - 1):
                yield convert.event_to_pb(request.job_id, seq, event)

    async def CancelJob(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return convert.job_to_pb(await self.front.cancel(request.job_id))

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        catalog, limits = self.front.catalog, self.front.settings.limits
        models = [convert.model_to_pb(catalog.get(n), is_default=n == catalog.default, limits=limits,
                                      queue=self.front.queue_stats.get(n, (0, 0)))
                  for n in catalog.names()]
        return pb.ListModelsResponse(models=models, limits=convert.limits_to_pb(limits))
