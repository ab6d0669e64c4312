"""The prediction stream on the wire: event names, ids, multi-line data, done, keep-alives, Last-Event-Id."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.app import App
from service.domain.predictions import PredictionManager
from service.http import replicate as replicate_api
from tests.support import http_base, running_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEMO = "local/rwkv7-demo"
LONG = {"prompt": "Count to a million", "max_tokens": 100_000}


@dataclass
class Event:
    name: str | None = None
    id: str | None = None
    data: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.data)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[App]:
    async with running_app() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def http(app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=http_base(app), timeout=30) as c:
        yield c


def manager_of(app: App) -> PredictionManager:
    assert app.predictions is not None
    return app.predictions


async def create(http: httpx.AsyncClient, inputs: dict[str, Any], wait: bool = False) -> dict[str, Any]:
    headers = {"Prefer": "wait"} if wait else {}
    reply = await http.post(f"/v1/models/{DEMO}/predictions", json={"input": inputs}, headers=headers)
    assert reply.status_code == 201, reply.text
    body: dict[str, Any] = reply.json()
    return body


def over_sse(chunks: list[str]) -> str:
    """The text as a stream carries it: a CR ends an SSE line, so CR LF and CR arrive as LF."""
    return "".join(chunks).replace("\r\n", "\n").replace("\r", "\n")


def parse(lines: list[str]) -> list[Event]:
    """A strict reading of the frames: every line is a field, a comment, or the blank line ending an event."""
    events, current = [], Event()
    for line in lines:
        if line == "":
            assert current.name is not None, "a blank line without an event"
            events.append(current)
            current = Event()
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            if name == "event":
                current.name = value
            elif name == "id":
                current.id = value
            else:
                assert name == "data", line
                current.data.append(value)
    assert current == Event(), "the stream ended inside an event"
    return events


async def read_stream(http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None) -> list[str]:
    async with http.stream("GET", url, headers=headers or {}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].split(";")[0] == "text/event-stream"
        return [line async for line in reply.aiter_lines()]


async def test_a_finished_prediction_replays_its_events(http: httpx.AsyncClient) -> None:
    body = await create(http, {"prompt": "Hello", "max_tokens": 16, "temperature": 0}, wait=True)
    assert body["status"] == "succeeded"
    events = parse(await read_stream(http, body["urls"]["stream"]))
    assert {e.name for e in events} <= {"output", "error", "done"}
    assert all(e.id for e in events)
    ids = [int(e.id or 0) for e in events]
    assert ids == sorted(set(ids))
    assert events[-1].name == "done"
    assert events[-1].text == "{}"
    assert "".join(e.text for e in events if e.name == "output") == over_sse(body["output"])


async def test_multi_line_output_and_cancel(app: App, http: httpx.AsyncClient) -> None:
    body = await create(http, LONG)
    live = await manager_of(app).get(body["id"])
    manager_of(app)._output(live, "line one\nline two\r\nline three")  # as the runner adds text
    await http.post(f"/v1/predictions/{body['id']}/cancel")
    lines = await read_stream(http, body["urls"]["stream"])
    assert "data: line one" in lines
    i = lines.index("data: line one")
    assert lines[i : i + 3] == ["data: line one", "data: line two", "data: line three"]
    events = parse(lines)
    assert "line one\nline two\nline three" in [e.text for e in events]
    assert (events[-1].name, json.loads(events[-1].text)) == ("done", {"reason": "canceled"})


async def test_last_event_id_resumes_after_that_event(http: httpx.AsyncClient) -> None:
    body = await create(http, {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}, wait=True)
    url = body["urls"]["stream"]
    everything = parse(await read_stream(http, url))
    assert len(everything) > 4
    cut = everything[2].id or ""
    rest = parse(await read_stream(http, url, {"Last-Event-Id": cut}))
    assert rest == everything[3:]
    for not_ours in ("not-ours", "9999", "-1"):
        assert parse(await read_stream(http, url, {"Last-Event-Id": not_ours})) == everything
    # After the done event there is nothing more: the stream closes at once.
    assert parse(await read_stream(http, url, {"Last-Event-Id": everything[-1].id or ""})) == []


async def test_resume_while_running(http: httpx.AsyncClient) -> None:
    body = await create(http, {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0})
    url = body["urls"]["stream"]
    first: list[str] = []
    async with http.stream("GET", url) as reply:
        async for line in reply.aiter_lines():
            first.append(line)
            if len([x for x in first if x == ""]) == 3:
                break  # hang up mid-run, as aiohttp-sse-client does at its total timeout
    before = parse(first)
    after = parse(await read_stream(http, url, {"Last-Event-Id": before[-1].id or ""}))
    final = (await http.get(body["urls"]["get"])).json()
    assert final["status"] == "succeeded"
    texts = [e.text for e in before + after if e.name == "output"]
    assert "".join(texts) == over_sse(final["output"])
    assert after[-1].name == "done"


async def test_keep_alive_comments_while_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued prediction is silent; keep-alives must come (the RockAI sync client gives up after 5 s)."""
    assert replicate_api.KEEPALIVE_SECONDS < 5
    monkeypatch.setattr(replicate_api, "KEEPALIVE_SECONDS", 0.2)
    async with (
        running_app(**{"engine.max_batch_size": 1}) as app,
        httpx.AsyncClient(base_url=http_base(app), timeout=30) as http,
    ):
        busy = await create(http, LONG)
        queued = await create(http, LONG)
        lines: list[str] = []
        async with http.stream("GET", queued["urls"]["stream"]) as reply:

            async def collect() -> None:
                async for line in reply.aiter_lines():
                    lines.append(line)

            with pytest.raises(TimeoutError):
                await asyncio.wait_for(collect(), 1.0)
        assert lines.count(": keep-alive") >= 3
        assert "" not in lines  # a comment alone, no blank line (httpx-sse would make it an empty event)
        for body in (queued, busy):
            assert (await http.post(body["urls"]["cancel"])).json()["status"] == "canceled"
