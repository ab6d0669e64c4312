"""The RockAI flavour: its HTTP docs (create, get, cancel, /v1/run, /v1/run_sse) and what its SDK does on the wire.

The SDK (PyPI rockai 0.1.74) pins uvicorn < 0.28 and cannot share an environment with the server, so
its calls are reproduced here: create with `model` (and `version: null`), read `data.urls.stream`,
then httpx-sse on a bare httpx.Client (5 s timeout, no Authorization) yielding every event's data.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from httpx_sse import connect_sse

from service.app import App
from tests.support import http_base, running_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEMO = "local/rwkv7-demo"
AUTH = {"Authorization": "Bearer rockai-token"}
# The LLM example of RockAI's "run a model" page, made short and greedy for the demo model.
DOCS_INPUT = {
    "top_k": 50,
    "top_p": 0.9,
    "prompt": "Can you write me a poem about steamed hams?",
    "temperature": 0,
    "max_new_tokens": 16,
    "min_new_tokens": -1,
    "prompt_template": "{prompt}",
    "repetition_penalty": 1.15,
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[App]:
    async with running_app() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def http(app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=http_base(app), timeout=30, headers=AUTH) as c:
        yield c


def version_of(app: App) -> str:
    assert app.engine is not None
    return app.engine.model.version


def over_sse(chunks: list[str]) -> str:
    """The text as a stream carries it: a CR ends an SSE line, so CR LF and CR arrive as LF."""
    return "".join(chunks).replace("\r\n", "\n").replace("\r", "\n")


async def until_done(http: httpx.AsyncClient, prediction_id: str) -> dict[str, Any]:
    """The SDK's run(): GET while starting or processing."""
    for _ in range(300):
        body: dict[str, Any] = (await http.get(f"/v1/predictions/{prediction_id}")).json()
        if body["data"]["status"] not in ("starting", "processing"):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError("prediction did not end")


async def test_create_get_as_in_the_http_docs(app: App, http: httpx.AsyncClient) -> None:
    created = await http.post("/v1/predictions", json={"version": version_of(app), "input": DOCS_INPUT})
    assert created.status_code == 201
    body = created.json()
    assert body["data"]["id"] == body["id"]
    assert body["data"]["urls"]["stream"] == body["urls"]["stream"]
    done = await until_done(http, body["data"]["id"])
    assert done["data"]["status"] == done["status"] == "succeeded"
    assert done["data"]["output"] == done["output"]
    assert done["output"]


@pytest.mark.parametrize("version", [None, "absent"])
async def test_sdk_create_sends_model_and_maybe_null_version(http: httpx.AsyncClient, version: str | None) -> None:
    payload: dict[str, Any] = {"input": {"prompt": "Hi", "max_tokens": 4}, "model": DEMO}
    if version is None:
        payload["version"] = None
    created = await http.post("/v1/predictions", json=payload)
    assert created.status_code == 201
    assert (await until_done(http, created.json()["id"]))["status"] == "succeeded"


async def test_cancel_without_body_or_content_type(http: httpx.AsyncClient) -> None:
    payload = {"model": DEMO, "input": {"prompt": "x", "max_tokens": 100_000}}
    created = await http.post("/v1/predictions", json=payload)
    request = http.build_request("POST", f"/v1/predictions/{created.json()['id']}/cancel")
    assert "content-type" not in request.headers
    canceled = await http.send(request)
    assert canceled.status_code == 200
    assert canceled.json()["data"]["status"] == "canceled"


async def test_run_returns_the_finished_prediction(app: App, http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/run", json={"model": f"{DEMO}:{version_of(app)}", "input": DOCS_INPUT})
    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == body["data"]["status"] == "succeeded"
    assert isinstance(body["output"], list)
    assert body["output"]
    missing = await http.post("/v1/run", json={"model": "someone/else:1", "input": DOCS_INPUT})
    assert (missing.status_code, missing.json()["status"]) == (404, 404)


async def test_run_sse_streams_the_run(http: httpx.AsyncClient) -> None:
    async with http.stream("POST", "/v1/run_sse", json={"model": DEMO, "input": DOCS_INPUT}) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in reply.aiter_lines()]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert names[-1] == "done"
    assert set(names) <= {"output", "done"}
    assert lines.count("") == len(names)
    assert len([line for line in lines if line.startswith("id: ")]) == len(names)
    newest = (await http.get("/v1/predictions")).json()["results"][0]
    same = (await http.post("/v1/run", json={"model": DEMO, "input": DOCS_INPUT})).json()
    assert "".join(newest["output"]) == "".join(same["output"])  # greedy: the streamed run wrote the same text


async def test_run_sse_hang_up_cancels(http: httpx.AsyncClient) -> None:
    body = {"model": DEMO, "input": {"prompt": "Count", "max_tokens": 100_000}}
    async with http.stream("POST", "/v1/run_sse", json=body) as reply:
        async for line in reply.aiter_lines():
            if line.startswith("event: output"):
                break
    newest = (await http.get("/v1/predictions")).json()["results"][0]
    assert newest["input"] == body["input"]
    assert (await until_done(http, newest["id"]))["status"] == "canceled"


@pytest.mark.parametrize("prompt", ["Tell me about the moon.", "给我讲讲月亮。", "🌙✨🚀"])
async def test_sdk_stream_text_equals_the_output(app: App, http: httpx.AsyncClient, prompt: str) -> None:
    payload = {"input": {"prompt": prompt, "max_tokens": 24, "temperature": 0}, "stream": True, "model": DEMO}
    created = await http.post("/v1/predictions", json=payload)
    assert created.status_code in (200, 201)
    stream_url = created.json()["data"]["urls"]["stream"]

    def sdk_stream() -> list[tuple[str, str]]:
        with httpx.Client() as client, connect_sse(client, stream_url) as source:
            assert "authorization" not in source.response.request.headers
            return [(sse.event, sse.data) for sse in source.iter_sse()]

    events = await asyncio.to_thread(sdk_stream)
    assert events[-1] == ("done", "{}")
    assert "" not in [data for _, data in events]  # no empty events from keep-alives
    final = await until_done(http, created.json()["id"])
    assert "".join(data for name, data in events if name == "output") == over_sse(final["output"])
    assert [json.loads(data) for name, data in events if name != "output"] == [{}]
