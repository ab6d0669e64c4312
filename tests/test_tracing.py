"""OpenTelemetry tracing: off by default; when on, gRPC and HTTP calls continue an incoming traceparent and
each engine request is a child span of the call that submitted it (SDK in-memory exporter)."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import httpx
import pytest
from rwkvd.v1 import common_pb2, completions_pb2, completions_pb2_grpc

from service.app import App
from service.config import build_config
from service.tracing import build_tracing, tracing_wanted
from tests.support import eventually, grpc_target, http_base, running_app

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.instrumentation.grpc")
pytest.importorskip("opentelemetry.instrumentation.asgi")
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"
ENGINE_SPAN = "rwkvd.engine.generate"


@asynccontextmanager
async def traced_app() -> AsyncIterator[tuple[App, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tempfile.TemporaryDirectory(prefix="rwkvd-test-") as scratch:
        config = build_config(
            {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "drain_seconds": 0.0, "data_dir": scratch}
        )
        app = App(config, tracer_provider=provider)
        await app.start()
        try:
            yield app, exporter
        finally:
            await app.shutdown()


def engine_span_under(spans: tuple[ReadableSpan, ...], server: ReadableSpan) -> ReadableSpan:
    assert server.context is not None
    children = [s for s in spans if s.name == ENGINE_SPAN and s.parent is not None]
    [child] = [s for s in children if s.parent is not None and s.parent.span_id == server.context.span_id]
    return child


async def test_grpc_and_http_calls_continue_the_incoming_trace() -> None:
    async with traced_app() as (app, exporter):
        async with grpc.aio.insecure_channel(grpc_target(app)) as channel:
            stub = completions_pb2_grpc.CompletionServiceStub(channel)
            request = completions_pb2.CreateCompletionRequest(
                prompt=common_pb2.Prompt(text="Hi"), sampling=common_pb2.SamplingParams(max_tokens=3, ignore_eos=True)
            )
            await stub.CreateCompletion(request, metadata=(("traceparent", TRACEPARENT),))
            # A streamed call too: its span must end cleanly when the stream does.
            async for _ in stub.CreateCompletionStream(request, metadata=(("traceparent", TRACEPARENT),)):
                pass
        async with httpx.AsyncClient(base_url=http_base(app), timeout=30) as client:
            body = {"model": "local/rwkv7-demo", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
            reply = await client.post("/v1/completions", json=body, headers={"traceparent": TRACEPARENT})
            assert reply.status_code == 200
            untraced = await client.post("/v1/completions", json=body)
            assert untraced.status_code == 200
        assert await eventually(lambda: sum(s.name == ENGINE_SPAN for s in exporter.get_finished_spans()) == 4)
        spans = exporter.get_finished_spans()

    grpc_span = next(s for s in spans if s.name == "/rwkvd.v1.CompletionService/CreateCompletion")
    http_spans = [s for s in spans if s.name == "POST /v1/completions"]
    assert len(http_spans) == 2
    for server in (grpc_span, http_spans[0]):
        assert server.context is not None
        assert server.context.trace_id == TRACE_ID  # continued, not a new trace
        assert server.parent is not None
        assert server.parent.span_id == PARENT_ID
        assert server.parent.is_remote
        engine = engine_span_under(spans, server)
        assert engine.context is not None
        assert engine.context.trace_id == TRACE_ID
        assert engine.attributes is not None
        assert engine.attributes["rwkvd.finish_reason"] == "length"
        assert engine.attributes["gen_ai.usage.output_tokens"] == 3
        assert engine.start_time is not None
        assert engine.end_time is not None
        assert server.start_time is not None
        assert engine.start_time >= server.start_time - 1_000_000  # same clock, to a millisecond
        assert engine.end_time >= engine.start_time
        assert [e.name for e in engine.events] == ["prefill_start", "first_token"]
    assert http_spans[0].attributes is not None
    assert engine_span_under(spans, grpc_span).attributes["rwkvd.api"] == "grpc"  # type: ignore[index]
    assert engine_span_under(spans, http_spans[0]).attributes["rwkvd.api"] == "openai"  # type: ignore[index]
    # Without a traceparent the call starts a trace of its own.
    fresh = http_spans[1]
    assert fresh.context is not None
    assert fresh.context.trace_id != TRACE_ID
    assert fresh.parent is None
    streamed = next(s for s in spans if s.name == "/rwkvd.v1.CompletionService/CreateCompletionStream")
    assert streamed.context is not None
    assert streamed.context.trace_id == TRACE_ID


async def test_http_span_names_use_the_route_template() -> None:
    async with traced_app() as (app, exporter), httpx.AsyncClient(base_url=http_base(app), timeout=30) as client:
        assert (await client.get("/v1/tasks/TASK_missing/status")).status_code == 404
        names = [s.name for s in exporter.get_finished_spans()]
    assert "GET /v1/tasks/{task_id}/status" in names


async def test_tracing_is_off_by_default() -> None:
    assert not tracing_wanted(False, {})
    assert not tracing_wanted(False, {"OTEL_TRACES_EXPORTER": "none"})
    assert tracing_wanted(False, {"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing_wanted(True, {})
    async with running_app() as app:
        assert app.tracing is None


def test_a_provider_from_the_otel_environment() -> None:
    tracing = build_tracing(True, {"OTEL_TRACES_EXPORTER": "console"})
    assert tracing is not None
    assert isinstance(tracing.provider, TracerProvider)
    assert tracing.provider.resource.attributes["service.name"] == "rwkvd"
    tracing.shutdown()
    assert build_tracing(False, {}) is None
    with pytest.raises(ValueError, match="zipkin"):
        build_tracing(True, {"OTEL_TRACES_EXPORTER": "zipkin"})
