"""The OpenAI API on the wire (raw HTTP): SSE bytes, request checking, error bodies, and disconnects."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.app import App
from service.domain.chat import ChoiceEvent, PreparedChat
from service.engine.protocol import Delta, Finished, FinishReason, SamplingParams, Started, Timings, Usage
from service.http.openai import _chat_chunks
from tests.support import eventually, http_base, running_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
LONG: dict[str, Any] = {"max_tokens": 100_000, "ignore_eos": True}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[App]:
    async with running_app() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def http(app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=http_base(app), timeout=30) as client:
        yield client


def events(body: str) -> list[str]:
    """The data of each SSE event, checking the framing: data-only events, keep-alive comments between them."""
    data = []
    for block in body.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1, block
        assert lines[0].startswith("data: "), block  # never "event:" or "id:" (openai 1.x would mis-parse)
        data.append(lines[0].removeprefix("data: "))
    return data


async def chat(http: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await http.post("/v1/chat/completions", json={"messages": HELLO, **GREEDY, **body})


async def test_chat_stream_bytes(http: httpx.AsyncClient) -> None:
    response = await chat(http, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    data = events(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    for chunk in chunks:
        assert chunk.keys() == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
        assert (chunk["id"], chunk["created"], chunk["model"]) == (
            chunks[0]["id"],
            chunks[0]["created"],
            "local/rwkv7-demo",
        )
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["usage"] is None
        assert chunk["choices"]  # the empty-choices usage chunk only comes when asked for
    whole = (await chat(http)).json()
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        == whole["choices"][0]["message"]["content"]
    )


async def test_usage_chunk_only_with_include_usage(http: httpx.AsyncClient) -> None:
    with_usage = [
        json.loads(d) for d in events((await chat(http, stream=True, stream_options={"include_usage": True})).text)[:-1]
    ]
    usage_chunk = with_usage[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 8
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 8
    assert "cached_tokens" in usage_chunk["usage"]["prompt_tokens_details"]
    assert all(c["usage"] is None for c in with_usage[:-1])
    assert with_usage[-2]["choices"][0]["finish_reason"] == "length"
    off = [
        json.loads(d)
        for d in events((await chat(http, stream=True, stream_options={"include_usage": False})).text)[:-1]
    ]
    assert all(c["choices"] and c["usage"] is None for c in off)


async def test_completions_stream_bytes(http: httpx.AsyncClient) -> None:
    body = {"prompt": "The sky is", "stream": True, "echo": True, **GREEDY}
    response = await http.post("/v1/completions", json=body)
    data = events(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[0]["choices"][0]["text"] == "The sky is"  # the echo comes first
    assert chunks[-1]["choices"] == [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]
    whole = (await http.post("/v1/completions", json={**body, "stream": False})).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]


async def test_content_parts_are_joined_text(http: httpx.AsyncClient) -> None:
    parts = [{"type": "text", "text": "Hello there,"}, {"type": "text", "text": "how are you today?"}]
    with_parts = await chat(http, messages=[{"role": "developer", "content": None}, {"role": "user", "content": parts}])
    as_text = await chat(
        http,
        messages=[{"role": "system", "content": ""}, {"role": "user", "content": "Hello there,\nhow are you today?"}],
    )
    assert with_parts.status_code == 200
    assert with_parts.json()["choices"] == as_text.json()["choices"]


async def test_unknown_fields_are_ignored(http: httpx.AsyncClient) -> None:
    response = await chat(
        http, frobnicate=True, parallel_tool_calls=False, response_format={"type": "text"}, tool_choice="none"
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]},
            "messages[0].content[1].type",
            "unsupported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            "messages[0].content[0].text",
            "invalid_argument",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "invalid_argument"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_argument"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role", "invalid_argument"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, "messages[0].tool_calls", "unsupported"),
        ({"messages": []}, "messages", "invalid_argument"),
        ({"tools": [{"type": "function"}]}, "tools", "unsupported"),
        ({"tool_choice": "auto"}, "tool_choice", "unsupported"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported"),
        ({"stream": "yes"}, "stream", "invalid_argument"),
        ({"max_tokens": 1.5}, "max_tokens", "invalid_argument"),
        ({"stop": 3}, "stop", "invalid_argument"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage", "invalid_argument"),
        ({"stream": True, "top_p": 2}, "top_p", "invalid_argument"),  # refused before the stream starts
    ],
)
async def test_bad_chat_requests_are_400_naming_the_param(
    http: httpx.AsyncClient, body: dict[str, Any], param: str, code: str
) -> None:
    response = await chat(http, **body)
    assert response.status_code == 400
    assert response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert error.keys() == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"].startswith(param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ["a", 3]}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": "a", "n": 9}, "n"),
        ({"prompt": ["a"] * 5, "n": 2}, "prompt"),
        ({"prompt": "a", "echo": True, "logprobs": 1}, "echo"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
        ({"prompt": [1, 2], "suffix": "b"}, "suffix"),
        ({"prompt": [70000]}, "prompt"),
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ],
)
async def test_bad_completion_requests_are_400_naming_the_param(
    http: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    response = await http.post("/v1/completions", json={**GREEDY, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"temperature": NaN}', b'"text"'])
async def test_malformed_bodies_are_400_in_openai_shape(http: httpx.AsyncClient, raw: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = await http.post(path, content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert response.headers["x-should-retry"] == "false"
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] in ("invalid_json", "invalid_argument")


async def test_a_body_without_content_type_is_read_as_json(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", content=json.dumps({"messages": HELLO, **GREEDY}))
    assert response.status_code == 200


async def test_unknown_model_is_404(http: httpx.AsyncClient) -> None:
    response = await chat(http, model="gpt-4", stream=True)
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert (await http.get("/v1/models/gpt-4")).status_code == 404


async def wait_idle(app: App) -> None:
    assert app.engine is not None
    engine = app.engine

    def idle() -> bool:
        stats = engine.stats()
        return stats.slots_in_use == stats.running == stats.waiting == 0

    assert await eventually(idle), engine.stats()


@pytest.mark.parametrize(
    ("path", "n"), [("/v1/chat/completions", 1), ("/v1/chat/completions", 3), ("/v1/completions", 2)]
)
async def test_a_client_that_hangs_up_mid_stream_frees_its_slots(
    app: App, http: httpx.AsyncClient, path: str, n: int
) -> None:
    assert app.engine is not None
    body = {"messages": HELLO, "prompt": "Count:", "stream": True, "n": n, **LONG}
    async with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        received = 0
        async for line in response.aiter_lines():
            received += line.startswith("data: ")
            if received > 4 * n:
                break
        assert app.engine.stats().slots_in_use == n  # every choice is generating
    await wait_idle(app)


async def test_a_client_that_hangs_up_on_a_whole_response_frees_its_slot(app: App, http: httpx.AsyncClient) -> None:
    assert app.engine is not None
    with pytest.raises(httpx.ReadTimeout):
        await http.post("/v1/chat/completions", json={"messages": HELLO, **LONG}, timeout=0.5)
    await wait_idle(app)


async def test_a_failure_mid_stream_is_an_error_event_then_the_end() -> None:
    chat = PreparedChat(
        id="chatcmpl-x",
        model="m",
        created=1.0,
        prompt=(1,),
        cache_points=(),
        params=SamplingParams(),
        n=1,
        deadline=None,
    )
    timings = Timings(0, 0, 0, 0)

    async def failing() -> AsyncGenerator[ChoiceEvent, None]:
        yield ChoiceEvent(0, Delta("r", 0, (5,), "Hi"))
        yield ChoiceEvent(0, Finished("r", FinishReason.ERROR, Usage(1, 1, 0), timings, 0, error="engine step failed"))

    started = ChoiceEvent(0, Started("r", 1, 0, 0.0, 0))
    body = b"".join([chunk async for chunk in _chat_chunks(chat, started, failing(), include_usage=True)]).decode()
    data = events(body)
    assert json.loads(data[1])["choices"][0]["delta"] == {"content": "Hi"}
    assert json.loads(data[-1]) == {
        "error": {"message": "engine step failed", "type": "server_error", "param": None, "code": "generation_failed"}
    }
    assert "[DONE]" not in data
