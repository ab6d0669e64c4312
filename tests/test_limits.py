"""Request limits over the wire: each answers its own status and hint, and the requests after it go on.

HTTP body size (413, no retry hint, in each dialect's shape), received gRPC message size and concurrent
gRPC calls (RESOURCE_EXHAUSTED), concurrent HTTP requests (429 + Retry-After; probes exempt), the engine's
queue (RESOURCE_EXHAUSTED + RetryInfo / 429 + Retry-After), max_tokens above --max-new-tokens and prompts
above --max-prompt-tokens (INVALID_ARGUMENT naming the field / 400).
Deadlines are covered where their APIs are: a gRPC deadline frees the engine slot in
tests/clients/test_client.py (test_deadline_ends_a_generation_on_the_server), an HTTP client timeout or
hang-up in tests/http/test_openai_wire.py (test_a_client_that_hangs_up_*).
Also here: the HTTP listener's connections send small writes at once (TCP_NODELAY), so streams are not held.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import rwkvd

from service.app import App
from service.config import parse_serve_args
from service.http.server import _listening_socket
from tests.support import eventually, grpc_target, http_base, running_app
from tests.test_metrics import delta, scrape

on_module_loop = pytest.mark.asyncio(loop_scope="module")  # the loop the module's servers live on

MAX_REQUEST_BYTES = 4096
MAX_NEW_TOKENS = 64
MAX_PROMPT_TOKENS = 32
LONG: dict[str, Any] = {"max_tokens": 100_000, "ignore_eos": True}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def small() -> AsyncIterator[App]:
    """Small size limits: request bytes, max_tokens and prompt length."""
    settings = {
        "max_request_bytes": MAX_REQUEST_BYTES,
        "engine.max_new_tokens": MAX_NEW_TOKENS,
        "engine.max_prompt_tokens": MAX_PROMPT_TOKENS,
    }
    async with running_app(**settings) as app:
        yield app


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def narrow() -> AsyncIterator[App]:
    """Two HTTP requests and two gRPC calls at once."""
    async with running_app(http_max_concurrency=2, grpc_max_concurrent_rpcs=2) as app:
        yield app


def big_text() -> str:
    return "word " * (MAX_REQUEST_BYTES // 4)


@on_module_loop
@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "{big}"}]}, "application/json"),
        ("/v1/tasks/tmp", {"prompt": "{big}"}, "application/json"),
        ("/v1/predictions", {"version": "v", "input": {"prompt": "{big}"}}, "application/problem+json"),
    ],
)
async def test_a_body_over_the_limit_is_413_in_the_dialects_shape(
    small: App, path: str, body: dict[str, Any], content_type: str
) -> None:
    raw = str(body).replace("'", '"').replace("{big}", big_text()).encode()
    before = await scrape(small)
    async with httpx.AsyncClient(base_url=http_base(small)) as http:
        reply = await http.post(path, content=raw, headers={"content-type": "application/json"})
        assert reply.status_code == 413
        api = {"/v1/chat/completions": "openai", "/v1/tasks/tmp": "tasks", "/v1/predictions": "replicate"}[path]
        assert delta(before, await scrape(small), "rwkvd_request_errors_total", api=api, code="413") == 1
        assert reply.headers["content-type"] == content_type
        assert "retry-after" not in reply.headers  # the same body would be refused again
        assert reply.headers["connection"] == "close"  # the rest of the body is never read
        message = {
            "/v1/chat/completions": lambda j: j["error"]["message"],
            "/v1/tasks/tmp": lambda j: j["detail"],
            "/v1/predictions": lambda j: j["detail"],
        }[path](reply.json())
        assert str(MAX_REQUEST_BYTES) in message
        if path.startswith("/v1/chat"):
            assert reply.json()["error"]["code"] == "request_too_large"
        ok = await http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert ok.status_code == 200  # the next request goes on


@on_module_loop
async def test_a_chunked_body_is_counted_as_it_arrives(small: App) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(8):
            yield b"x" * 1024  # no content-length: the limit trips while the app reads
        yield b'"}'

    async with httpx.AsyncClient(base_url=http_base(small)) as http:
        reply = await http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert reply.status_code == 413
        assert reply.json()["error"]["code"] == "request_too_large"
        ok = await http.post("/v1/completions", json={"prompt": "x " * 100, "max_tokens": 1})
        assert ok.status_code == 400  # under the byte limit, the prompt limit answers: the app ran
        assert ok.json()["error"]["code"] == "context_length_exceeded"


@on_module_loop
async def test_a_grpc_message_over_the_limit_is_resource_exhausted(small: App) -> None:
    async with rwkvd.AsyncClient(grpc_target(small), max_attempts=1) as client:
        with pytest.raises(rwkvd.ResourceExhausted, match="larger than max"):
            await client.complete(big_text(), max_tokens=1)
        reply = await client.complete("Hello", max_tokens=2, ignore_eos=True)
        assert reply.usage.completion_tokens == 2


@on_module_loop
async def test_max_tokens_above_the_cap_is_invalid_naming_the_field(small: App) -> None:
    async with rwkvd.AsyncClient(grpc_target(small)) as client:
        with pytest.raises(rwkvd.InvalidArgument) as refused:
            await client.complete("Hello", max_tokens=MAX_NEW_TOKENS + 1)
        assert [v.field for v in refused.value.field_violations] == ["sampling.max_tokens"]
        reply = await client.complete("Hello", max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
        assert reply.usage.completion_tokens == MAX_NEW_TOKENS
    async with httpx.AsyncClient(base_url=http_base(small)) as http:
        reply = await http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": MAX_NEW_TOKENS + 1})
        assert reply.status_code == 400
        assert reply.json()["error"]["param"] == "max_tokens"
        assert reply.headers["x-should-retry"] == "false"


@on_module_loop
async def test_a_prompt_over_the_limit_is_invalid_naming_the_prompt(small: App) -> None:
    too_long = list(range(1000, 1000 + MAX_PROMPT_TOKENS + 1))
    async with rwkvd.AsyncClient(grpc_target(small)) as client:
        with pytest.raises(rwkvd.InvalidArgument) as refused:
            await client.complete(too_long, max_tokens=1)
        assert refused.value.reason == "PROMPT_TOO_LONG"
        assert [v.field for v in refused.value.field_violations] == ["prompt"]
        assert (await client.complete(too_long[1:], max_tokens=1)).usage.prompt_tokens == MAX_PROMPT_TOKENS
    async with httpx.AsyncClient(base_url=http_base(small)) as http:
        reply = await http.post("/v1/completions", json={"prompt": too_long, "max_tokens": 1})
        assert reply.status_code == 400
        assert (reply.json()["error"]["code"], reply.json()["error"]["param"]) == ("context_length_exceeded", "prompt")


async def open_sse(stack: contextlib.AsyncExitStack, http: httpx.AsyncClient) -> AsyncIterator[str]:
    """Starts a long streamed completion and waits for its first event; the stack closes it.

    Keep the returned line iterator referenced: collecting it closes the response.
    """
    body = {"prompt": "Count:", "stream": True, **LONG}
    response = await stack.enter_async_context(http.stream("POST", "/v1/completions", json=body))
    assert response.status_code == 200
    lines = response.aiter_lines()
    while not (await anext(lines)).startswith("data: "):
        pass
    return lines


@on_module_loop
async def test_http_requests_beyond_the_limit_are_429_with_retry_after_and_probes_still_answer(narrow: App) -> None:
    assert narrow.http is not None
    limits = narrow.http.limits
    assert limits is not None
    before = await scrape(narrow)
    async with httpx.AsyncClient(base_url=http_base(narrow), timeout=30) as http:
        async with contextlib.AsyncExitStack() as stack:
            streams = [await open_sse(stack, http) for _ in range(2)]
            assert limits.active == len(streams)
            refused = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "requests"
            assert refused.json()["error"]["code"] == "too_many_requests"
            tasks = await http.post("/v1/tasks/tmp", json={"prompt": "x"})
            assert tasks.status_code == 429
            assert "detail" in tasks.json()
            after = await scrape(narrow)  # /metrics is exempt from the limit too
            assert delta(before, after, "rwkvd_request_errors_total", api="openai", code="429") == 1
            assert delta(before, after, "rwkvd_request_errors_total", api="tasks", code="429") == 1
            assert (await http.get("/health/ready")).status_code == 200  # kubelets and balancers still get answers
            assert (await http.get("/health/live")).status_code == 200
        assert await eventually(lambda: limits.active == 0)  # the closed streams ended on the server
        ok = await http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert ok.status_code == 200


@on_module_loop
async def test_grpc_calls_beyond_the_limit_are_resource_exhausted(narrow: App) -> None:
    async with rwkvd.AsyncClient(grpc_target(narrow), max_attempts=1) as client:
        streams = [client.complete_stream("Count:", **LONG) for _ in range(2)]
        for stream in streams:
            await anext(stream)  # both calls are running
        with pytest.raises(rwkvd.ResourceExhausted, match="Concurrent RPC limit exceeded"):
            await client.list_models()
        for stream in streams:
            await stream.aclose()
        await asyncio.sleep(0.1)  # the server sees both cancellations before the next call
        assert len(await client.list_models()) == 1


@on_module_loop
async def test_a_full_engine_queue_is_resource_exhausted_with_a_retry_hint() -> None:
    async with running_app(**{"engine.max_batch_size": 1, "engine.max_queued": 0}) as app:
        assert app.engine is not None
        engine = app.engine
        async with (
            rwkvd.AsyncClient(grpc_target(app), max_attempts=1) as client,
            httpx.AsyncClient(base_url=http_base(app)) as http,
        ):
            busy = client.complete_stream("Count:", **LONG)
            await anext(busy)  # holds the only slot
            with pytest.raises(rwkvd.ResourceExhausted) as full:
                await client.complete("x", max_tokens=1)
            assert (full.value.reason, full.value.retry_delay) == ("QUEUE_FULL", 1.0)
            reply = await http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1})
            assert reply.status_code == 429
            assert reply.headers["retry-after"] == "1"
            assert reply.json()["error"]["code"] == "rate_limit_exceeded"
            await busy.aclose()
            assert await eventually(lambda: engine.stats().running == 0)
            ok = await http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1})
            assert ok.status_code == 200


async def test_http_connections_get_tcp_nodelay() -> None:
    # Without it Nagle's algorithm held each SSE event behind the previous one's delayed ACK (~40 ms),
    # so streamed tokens arrived in bursts. asyncio sets it only if the listener says IPPROTO_TCP.
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[int] = loop.create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await loop.create_server(Probe, sock=_listening_socket("127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await asyncio.wait_for(accepted, 5) != 0
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


def test_limit_flags_and_environment() -> None:
    config = parse_serve_args(
        ["--max-new-tokens", "512", "--max-request-bytes", "1048576"],
        {"RWKVD_HTTP_MAX_CONCURRENCY": "64", "RWKVD_GRPC_MAX_CONCURRENT_RPCS": "128"},
    )
    assert config.engine.max_new_tokens == 512
    assert (config.max_request_bytes, config.http_max_concurrency, config.grpc_max_concurrent_rpcs) == (
        1 << 20,
        64,
        128,
    )
    with pytest.raises(ValueError, match="max_request_bytes"):
        parse_serve_args(["--max-request-bytes", "10"], {})
