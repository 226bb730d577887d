"""Who is calling: the API key of the call metadata `authorization: Bearer <key>` -> the caller's Identity (its
tenant, and the tenant's limits), checked before any handler of ours runs, then one token of the tenant's request
rate. No key, or one the key file does not hold: UNAUTHENTICATED with a fixed message (nothing of what was sent
is repeated, logged or counted).

Every service needs a key except grpc.health.v1: kubelet's gRPC probes send no metadata. Reflection needs one too:
what it lists is the contract, public in the repository anyway, but an open reflection endpoint would tell anyone
who finds the port what serves there, and grpcurl sends a key to reflection as to any method
(`-H 'authorization: Bearer ...'`).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

import grpc

from difflens.api.interceptors import abort
from difflens.auth.keys import Identity, KeyStore
from difflens.errors import Unauthenticated

AUTHORIZATION = "authorization"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_METHOD_HANDLERS = {"unary_unary": grpc.unary_unary_rpc_method_handler,
                    "unary_stream": grpc.unary_stream_rpc_method_handler,
                    "stream_unary": grpc.stream_unary_rpc_method_handler,
                    "stream_stream": grpc.stream_stream_rpc_method_handler}

# The caller of the call being handled: set by the interceptor in the call's own task, before the handler runs.
_caller: ContextVar[Identity | None] = ContextVar("difflens_caller", default=None)


def current_caller() -> Identity | None:
    """The authenticated caller of the call being handled; None where the server authenticates no one."""
    return _caller.get()


def bearer_key(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The key of an `authorization: Bearer <key>` entry (the scheme in any case), else None."""
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            scheme, _, token = str(value).partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the handler of every method outside OPEN_PREFIXES: authenticate against `keys`, then `admit` (the
    tenant's request rate; it raises ResourceExhausted), then the handler. Its refusals go through the error
    interceptor's mapping (interceptors.abort); it is the outermost interceptor, so an unauthenticated caller
    learns nothing else, not even whether its message parses."""

    def __init__(self, keys: KeyStore, admit: Callable[[Identity], Awaitable[None]]) -> None:
        self.keys = keys
        self.admit = admit

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler

        async def check(context: grpc.aio.ServicerContext) -> None:
            try:
                who = self.keys.authenticate(bearer_key(context.invocation_metadata()))
                if who is None:
                    raise Unauthenticated()
                await self.admit(who)
            except Exception as e:  # Unauthenticated; over the rate; a queue that cannot be reached
                await abort(context, method, e)
            _caller.set(who)

        for kind, make in _METHOD_HANDLERS.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                return make(_checked(behavior, check), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler


def _checked(behavior: Callable[..., Any], check: Callable[[Any], Awaitable[None]]) -> Callable[..., Any]:
    """`behavior` with `check(context)` first: an async generator stays one (a streaming response), anything else
    becomes a coroutine."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(context)
            async for item in behavior(request, context):
                yield item

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(context)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return call
