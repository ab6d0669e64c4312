"""gRPC server interceptors: the error boundary with the access log and call observation, and bearer-token auth.

Interceptors only see the method name and metadata, so both work by wrapping the handler's behaviour
while keeping its cardinality and (de)serializers. Observation: each call runs with the API label
"grpc" (engine requests it submits carry it), errors are counted by status, and an optional tracing
interceptor goes around everything so the call's span sees the final status.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from service.engine.observer import request_api
from service.errors import InternalError, RwkvdError, Unauthenticated

from .calls import Context
from .status import abort

access_log = logging.getLogger("rwkvd.access")
log = logging.getLogger("rwkvd.grpc")

# Probes and tooling call these without credentials (kubelet gRPC probes send no metadata).
AUTH_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Unary = Callable[[Any, Context], Awaitable[Any]]
Streaming = Callable[[Any, Context], AsyncIterator[Any]]
if TYPE_CHECKING:  # generic only in the stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


def _rebuild(handler: Handler, unary: Callable[[Unary], Unary], streaming: Callable[[Streaming], Streaming]) -> Handler:
    """The same kind of handler with its behaviour wrapped."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)  # type: ignore[arg-type]
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kw)  # type: ignore[arg-type]
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kw)  # type: ignore[arg-type]
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CallObserver:
    """Where ObserveInterceptor reports: error counts (by status code name) and tracing around each call."""

    count_error: Callable[[str], None] | None = None
    tracing: grpc.aio.ServerInterceptor | None = None


class _Outcome:
    """Maps what a handler raised to a status, and remembers the code for the access log and metrics."""

    def __init__(self, method: str, count_error: Callable[[str], None] | None) -> None:
        self.method = method
        self._count_error = count_error
        self.code = "OK"
        self.started = time.perf_counter()
        self.messages = 0

    async def fail(self, context: Context, exc: Exception | asyncio.CancelledError) -> None:
        if isinstance(exc, RwkvdError):
            self.code = exc.kind.grpc_code_name
            await abort(context, exc)
        if isinstance(exc, grpc.aio.AbortError):
            code = context.code()
            self.code = code.name if isinstance(code, grpc.StatusCode) else "ABORTED"
            raise exc
        if isinstance(exc, asyncio.CancelledError):
            self.code = "CANCELLED"  # client went away or deadline passed: nothing to send
            raise exc
        log.exception("unhandled error in %s", self.method, exc_info=exc)
        self.code = "INTERNAL"
        await abort(context, InternalError("internal server error", reason="INTERNAL"))

    def log(self) -> None:
        ms = (time.perf_counter() - self.started) * 1e3
        access_log.info("grpc %s %s %.1fms messages=%d", self.method, self.code, ms, self.messages)
        if self.code != "OK" and self._count_error is not None:
            self._count_error(self.code)


class ObserveInterceptor(grpc.aio.ServerInterceptor):
    """The error boundary (domain errors -> status + details, bugs -> INTERNAL), the access log, observation."""

    def __init__(self, observer: CallObserver | None = None) -> None:
        self._observer = observer or CallObserver()

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        tracing = self._observer.tracing
        if tracing is None:
            return await self._intercept(continuation, details)
        # Tracing outside the boundary: its span is current in the handler, and aborts pass through it.
        return await tracing.intercept_service(lambda d: self._intercept(continuation, d), details)

    async def _intercept(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        count_error = self._observer.count_error

        # Each call runs in its own task, so the label set here dies with the call (and is inherited by
        # the tasks it starts); it is not reset, since a generator's finally may run in another context.

        def unary(behavior: Unary) -> Unary:
            async def run(request: Any, context: Context) -> Any:
                outcome = _Outcome(method, count_error)
                request_api.set("grpc")
                try:
                    return await behavior(request, context)
                except (Exception, asyncio.CancelledError) as exc:  # GeneratorExit passes through
                    await outcome.fail(context, exc)
                finally:
                    outcome.log()

            return run

        def streaming(behavior: Streaming) -> Streaming:
            async def run(request: Any, context: Context) -> AsyncIterator[Any]:
                outcome = _Outcome(method, count_error)
                request_api.set("grpc")
                try:
                    async for message in behavior(request, context):
                        outcome.messages += 1
                        yield message
                except (Exception, asyncio.CancelledError) as exc:  # GeneratorExit passes through
                    await outcome.fail(context, exc)
                finally:
                    outcome.log()

            return run

        return _rebuild(handler, unary, streaming)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <key>` with one of the configured keys; off when none is configured."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, token = text.partition(" ")
                if scheme.lower() == "bearer":
                    given = token.strip().encode()
                    # compare against every key, so timing does not tell which prefix matched
                    return any([hmac.compare_digest(given, k) for k in self._keys])
        return False

    async def intercept_service(self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        handler = await continuation(details)
        if handler is None or not self._keys or details.method.startswith(AUTH_EXEMPT_PREFIXES):
            return handler
        if self._authorized(details.invocation_metadata):
            return handler
        denied = Unauthenticated("missing or invalid bearer token", reason="UNAUTHENTICATED")

        def unary(_: Unary) -> Unary:
            async def deny(request: Any, context: Context) -> Any:
                await abort(context, denied)

            return deny

        def streaming(_: Streaming) -> Streaming:
            async def deny(request: Any, context: Context) -> AsyncIterator[Any]:
                await abort(context, denied)
                yield  # pragma: no cover - makes this an async generator

            return deny

        return _rebuild(handler, unary, streaming)
