"""Optional OpenTelemetry tracing: off unless enabled, and OpenTelemetry is imported only then.

On with --otel (RWKVD_OTEL) or when OTEL_TRACES_EXPORTER names an exporter; the exporter, endpoint and
service name then come from the standard OTEL_* variables. When on, gRPC calls get OpenTelemetry's aio
server interceptor and HTTP calls its ASGI middleware; both continue the trace of an incoming W3C
`traceparent`. Each engine request becomes a span under the call that submitted it, built at its end
from the engine's clock (queue, prefill, first token), so the step loop never touches a span.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine.observer import RequestSample, StepSample

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger("rwkvd.tracing")
_INSTALL = (
    "pip install opentelemetry-sdk opentelemetry-exporter-otlp "
    "opentelemetry-instrumentation-grpc opentelemetry-instrumentation-asgi"
)


def tracing_wanted(flag: bool, environ: Mapping[str, str]) -> bool:
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return flag or exporter not in ("", "none")


class Tracing:
    """The tracer provider and what instruments the servers; also the engine observer that emits request spans."""

    wants_origin = True

    def __init__(self, provider: TracerProvider, owned: bool = False) -> None:
        self.provider = provider
        self._owned = owned  # built here from OTEL_* (flushed at shutdown), not handed in
        self._tracer = provider.get_tracer("rwkvd")

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(tracer_provider=self.provider)  # type: ignore[no-untyped-call]
        return interceptor

    def instrument_http(self, app: FastAPI) -> None:
        """Adds the ASGI middleware (outermost of those added so far) to `app`."""
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        def span_details(scope: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            # The method alone until routing names the route (_RouteName): paths hold ids.
            return str(scope.get("method", "HTTP")), {}

        app.add_middleware(_RouteName)
        app.add_middleware(
            OpenTelemetryMiddleware,
            tracer_provider=self.provider,
            default_span_details=span_details,
            # A span per ASGI message would be one per SSE event.
            exclude_spans=["receive", "send"],
        )

    def on_step(self, step: StepSample) -> None:
        pass

    def on_rejected(self, api: str, kind: str) -> None:
        pass  # the call's own span carries the error

    def on_request_end(self, request: RequestSample) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry.trace import SpanKind, Status, StatusCode

        parent = request.origin.run(otel_context.get_current) if request.origin is not None else None
        wall = time.time() - time.monotonic()  # engine clock values are monotonic; spans take wall-clock ns

        def ns(t: float) -> int:
            return int((t + wall) * 1e9)

        usage = request.usage
        span = self._tracer.start_span(
            "rwkvd.engine.generate",
            context=parent,
            kind=SpanKind.INTERNAL,
            start_time=ns(request.arrival),
            attributes={
                "rwkvd.request_id": request.request_id,
                "rwkvd.api": request.api,
                "rwkvd.finish_reason": request.reason.value,
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.completion_tokens,
                "rwkvd.cached_tokens": usage.cached_tokens,
            },
        )
        if request.prefill_start is not None:
            span.add_event("prefill_start", timestamp=ns(request.prefill_start))
        if request.first_token is not None:
            span.add_event("first_token", timestamp=ns(request.first_token))
        if request.error is not None:
            span.set_status(Status(StatusCode.ERROR, request.error))
        span.end(end_time=ns(request.end))

    def shutdown(self) -> None:
        """Flushes spans still queued when the provider was built here."""
        if self._owned:
            shutdown = getattr(self.provider, "shutdown", None)
            if shutdown is not None:
                shutdown()


def build_tracing(enabled: bool, environ: Mapping[str, str], provider: TracerProvider | None = None) -> Tracing | None:
    """Tracing with `provider` (tests), else with a provider from the OTEL_* environment when enabled, else None."""
    if provider is not None:
        return Tracing(provider)
    if not enabled:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ValueError(f"tracing is on but OpenTelemetry is not installed ({exc}): {_INSTALL}") from exc

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; rwkvd is the default name.
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": "rwkvd"}
    sdk = SdkTracerProvider(resource=Resource.create(attributes))
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    for name in names:
        if name != "none":
            sdk.add_span_processor(BatchSpanProcessor(_exporter(name, environ)))
    log.info("OpenTelemetry tracing on, exporting to %s", ", ".join(names))
    return Tracing(sdk, owned=True)


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: rwkvd knows otlp, console and none")
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    # An optional package (opentelemetry-exporter-otlp), so imported by name.
    module = f"opentelemetry.exporter.otlp.proto.{'http' if protocol.startswith('http') else 'grpc'}.trace_exporter"
    try:
        exporter = importlib.import_module(module).OTLPSpanExporter
    except ImportError as exc:
        raise ValueError(f"{module} is not installed: {_INSTALL}") from exc
    return exporter()  # endpoint, headers and TLS from the OTEL_EXPORTER_OTLP_* variables


class _RouteName:
    """Names the call's span "METHOD /route/{template}" once routing has run (just inside the tracing middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def named_send(message: Message) -> None:
            # At the response start: routing is done, and the span (ended with the body) is still open.
            template = getattr(scope.get("route"), "path", None)  # the router sets it on the shared scope
            if message["type"] == "http.response.start" and isinstance(template, str):
                from opentelemetry import trace

                span = trace.get_current_span()
                span.update_name(f"{scope['method']} {template}")
                span.set_attribute("http.route", template)
            await send(message)

        await self._app(scope, receive, named_send)
