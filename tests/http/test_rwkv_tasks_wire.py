"""The Task API on the wire (raw httpx): validation, error bodies, query parameters and SSE bytes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.app import App
from service.domain.sampling import SamplingOverrides
from service.domain.task_state import Round, RoundStarted, Task, TaskKind, TaskStatus
from service.engine.protocol import FinishReason, Timings, Usage
from service.http.rwkv_tasks import _create_stream
from tests.support import http_base, running_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 16}
# torch's worker threads spin: on a small, busy machine one engine thread is much faster.
ONE_THREAD: dict[str, Any] = {"engine.threads": 1}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[App]:
    async with running_app(**ONE_THREAD) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def client(app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=http_base(app), timeout=30) as c:
        yield c


async def finished(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    while True:
        reply: dict[str, Any] = (await client.get(f"/v1/tasks/{task_id}/get_result")).json()
        if reply["finished"]:
            return reply
        await asyncio.sleep(0.02)


async def sse_events(response: httpx.Response) -> list[bytes]:
    """The raw events of a whole stream (keep-alive comments dropped)."""
    raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert raw.endswith(b"\n\n")
    lines = [line for line in raw.split(b"\n") if not line.startswith(b":")]
    return [e for e in b"\n".join(lines).split(b"\n\n") if e]


def payloads(events: list[bytes]) -> list[Any]:
    out: list[Any] = []
    for e in events:
        assert e.startswith(b"data: ")
        assert not e.startswith(b"data:  ")  # exactly one space
        assert b"\n" not in e  # one data line per event
        body = e[len(b"data: ") :].decode()
        out.append(body if body == "[DONE]" else json.loads(body))
    return out


# SSE format


@pytest.mark.parametrize("prompt", ["Hello there", "中文的提示词", "emoji 🙂🚀"])
async def test_create_stream_wire_format_and_text_equals_result(client: httpx.AsyncClient, prompt: str) -> None:
    async with client.stream("POST", "/v1/tasks/tmp", json={"prompt": prompt, "stream": True, **GREEDY}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].split(";")[0] == "text/event-stream"
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        events = payloads(await sse_events(r))
    first, *middle, done = events
    assert done == "[DONE]"
    assert set(first) == {"task_id", "prefill_time"}
    assert first["task_id"].startswith("TMP_")
    assert first["prefill_time"] > 0
    assert middle
    for e in middle:
        assert set(e) == {"data", "task_id", "gen_time", "speed"}
        assert e["task_id"] == first["task_id"]
        assert e["data"]
    streamed = "".join(e["data"] for e in middle)
    result = await finished(client, first["task_id"])
    assert streamed == result["result"]


async def test_persistent_and_fim_streams_announce_their_ids(client: httpx.AsyncClient) -> None:
    for path, body, prefix in (
        ("/v1/tasks/create", {"prompt": "Hi", "stream": True, **GREEDY}, "TASK_"),
        ("/v1/tasks/fim", {"prefix": "a = ", "suffix": "\nb = a", "stream": True, **GREEDY}, "TMP_"),
    ):
        async with client.stream("POST", path, json=body) as r:
            events = payloads(await sse_events(r))
        assert events[0]["task_id"].startswith(prefix)
        assert events[-1] == "[DONE]"
        text = "".join(e["data"] for e in events[1:-1])
        assert "✿" not in text
        assert text == (await finished(client, events[0]["task_id"]))["result"]


async def test_subscribe_with_a_json_body_on_get(client: httpx.AsyncClient) -> None:
    task_id = (await client.post("/v1/tasks/tmp", json={"prompt": "Hello", **GREEDY})).json()["task_id"]
    result = (await finished(client, task_id))["result"]
    # What the SDK sends: GET with body "{}" and a JSON content type.
    async with client.stream("GET", f"/v1/tasks/{task_id}/stream", json={}) as r:
        assert r.status_code == 200
        events = payloads(await sse_events(r))
    assert set(events[0]) == {"task_id", "prefill_time"}
    assert events[-1] == "[DONE]"
    assert all(set(e) == {"data"} for e in events[1:-1])
    assert "".join(e["data"] for e in events[1:-1]) == result
    async with client.stream("GET", f"/v1/tasks/{task_id}/stream", params={"pos": "16"}, json={}) as r:
        events = payloads(await sse_events(r))
    assert events[-1] == "[DONE]"
    assert [e for e in events[1:-1] if e.get("data")] == []
    r = await client.get(f"/v1/tasks/{task_id}/stream", params={"pos": "-1"})
    assert r.status_code == 422


async def test_create_stream_disconnect_does_not_stop_the_task(client: httpx.AsyncClient) -> None:
    body = {"prompt": "Hello", "stream": True, "temperature": 0, "max_tokens": 100}
    async with client.stream("POST", "/v1/tasks/tmp", json=body) as r:
        lines = r.aiter_lines()
        first = json.loads((await anext(lines)).removeprefix("data: "))
        task_id = first["task_id"]
    # The connection is closed now; the task runs to its budget.
    result = await finished(client, task_id)
    info = (await client.get(f"/v1/tasks/{task_id}/status")).json()
    assert info == {"task_id": task_id, "generated_buf": 100, "status": 3}
    assert result["speed"] > 0


async def test_a_failed_round_ends_with_an_error_event_then_done(app: App) -> None:
    assert app.tasks is not None
    round_ = Round("TMP_failed")
    task = Task(id="TMP_failed", kind=TaskKind.TEMPORARY, overrides=SamplingOverrides(), seed=None, round=round_)
    round_.on_started(RoundStarted("TMP_failed", 0.5, 3, 0))
    round_.on_tokens(0, (11,), "\n")
    round_.on_end(FinishReason.ERROR, Usage(3, 1, 0), Timings(0, 0.5, 0.5, 0), "engine step failed: boom")
    events = payloads([e.rstrip(b"\n") async for e in _create_stream(app.tasks, task, 0)])
    assert events[0] == {"task_id": "TMP_failed", "prefill_time": 0.5}
    assert events[1]["data"] == "\n"
    assert events[2] == {
        "error": {"message": "engine step failed: boom", "finish_reason": "error", "task_id": "TMP_failed"}
    }
    assert events[3] == "[DONE]"


# Validation (422, FastAPI's body naming the field)


def loc_of(reply: httpx.Response) -> list[list[Any]]:
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert isinstance(detail, list)
    return [d["loc"] for d in detail]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),
        ({"prompt": "x", "top_k": 1.5}, "top_k"),
        ({"prompt": "x", "seed": "7"}, "seed"),
        ({"prompt": "x", "stream": "true"}, "stream"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 40961}, "max_tokens"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "top_k": -2}, "top_k"),
        ({"prompt": "x", "top_k": 101}, "top_k"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "presence_penalty": 11}, "presence_penalty"),
        ({"prompt": "x", "repetition_penalty": -1}, "repetition_penalty"),
        ({"prompt": "x", "penalty_decay": 1.1}, "penalty_decay"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, "2"]}, "prompt"),
        ({"prompt": [10**30]}, "prompt"),
        ({"prompt": [65536]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({}, "prompt"),
    ],
)
async def test_create_validation(client: httpx.AsyncClient, body: dict[str, Any], field: str) -> None:
    for path in ("/v1/tasks/tmp", "/v1/tasks/create"):
        locs = loc_of(await client.post(path, json=body))
        assert all(loc[0] == "body" for loc in locs)
        assert any(field in loc for loc in locs)


async def test_json_numbers_and_token_ids_are_accepted(client: httpx.AsyncClient) -> None:
    body = {
        "prompt": [33155, 11],
        "max_tokens": 2,
        "temperature": 1,  # a JSON int for a float field
        "top_k": -1,
        "top_p": 1,
        "presence_penalty": 0,
        "repetition_penalty": 0,
        "penalty_decay": 1,
        "seed": 2**63,
        "stream": False,
    }
    reply = await client.post("/v1/tasks/tmp", json=body)
    assert reply.status_code == 200, reply.text
    assert set(reply.json()) == {"task_id", "result", "prefill_time", "gen_time", "speed", "finished"}
    assert (await finished(client, reply.json()["task_id"]))["result"]


async def test_malformed_json_is_422(client: httpx.AsyncClient) -> None:
    reply = await client.post("/v1/tasks/tmp", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert reply.status_code == 422
    assert reply.json()["detail"][0]["type"] == "json_invalid"


async def test_fim_validation(client: httpx.AsyncClient) -> None:
    assert "max_tokens" in loc_of(await client.post("/v1/tasks/fim", json={"prefix": "a", "max_tokens": 0}))[0]
    assert (
        "frequency_penalty"
        in loc_of(await client.post("/v1/tasks/fim", json={"prefix": "a", "frequency_penalty": 0.1}))[0]
    )
    assert "prefix" in loc_of(await client.post("/v1/tasks/fim", json={"suffix": "a"}))[0]
    ok = await client.post("/v1/tasks/fim", json={"prefix": "a", "max_tokens": 1})
    assert ok.status_code == 200


async def test_update_validation_and_seed(client: httpx.AsyncClient) -> None:
    task_id = (await client.post("/v1/tasks/create", json={"prompt": "Hello", **GREEDY})).json()["task_id"]
    await finished(client, task_id)
    for body, field in (
        ({"max_tokens": "5"}, "max_tokens"),
        ({"top_k": 101}, "top_k"),
        ({"tmp": True}, "tmp"),
        ({"prompt": [70000]}, "prompt"),
    ):
        assert field in loc_of(await client.post(f"/v1/tasks/{task_id}/fork", json=body))[0]
        assert field in loc_of(await client.post(f"/v1/tasks/{task_id}/continue", json=body))[0]
    # The SDK's fork body, seed included (RWKV-Server's TaskUpdate refuses seed; we accept it).
    fork_body = {"stream": False, "prompt": " World", "seed": 1, "max_tokens": 5, "temperature": 1, "top_k": -1}
    forks = [(await client.post(f"/v1/tasks/{task_id}/fork", json=fork_body)).json() for _ in range(2)]
    assert all(f["task_id"].startswith("TASK_") for f in forks)
    texts = [(await finished(client, f["task_id"]))["result"] for f in forks]
    assert texts[0] == texts[1]  # same seed, same state: same sample
    again = await client.post(f"/v1/tasks/{task_id}/continue", json={"stream": False, "max_tokens": 5, "seed": 3})
    assert again.status_code == 200
    assert again.json()["task_id"] == task_id


async def test_fork_tmp_query_and_stream(client: httpx.AsyncClient) -> None:
    task_id = (await client.post("/v1/tasks/tmp", json={"prompt": "Hello", **GREEDY})).json()["task_id"]
    source = (await finished(client, task_id))["result"]
    reply = await client.post(f"/v1/tasks/{task_id}/fork", params={"tmp": "true"}, json={"stream": False})
    assert reply.json()["task_id"].startswith("TMP_")
    body = {"stream": True, "max_tokens": 4}
    async with client.stream("POST", f"/v1/tasks/{task_id}/fork", json=body) as r:
        events = payloads(await sse_events(r))
    fork_id = events[0]["task_id"]
    assert fork_id.startswith("TASK_")
    assert events[-1] == "[DONE]"
    new_text = "".join(e["data"] for e in events[1:-1])
    # The fork resumes after its source's text; the stream carries only what this call made.
    assert (await finished(client, fork_id))["result"] == source + new_text
    async with client.stream("POST", f"/v1/tasks/{fork_id}/continue", json={"stream": True, "prompt": "!"}) as r:
        events = payloads(await sse_events(r))
    assert events[0]["task_id"] == fork_id
    assert "".join(e["data"] for e in events[1:-1]) == (await finished(client, fork_id))["result"]


# Domain errors: {"detail": message} with the table's status


async def test_not_found_body(client: httpx.AsyncClient) -> None:
    for method, path in (
        ("GET", "/v1/tasks/TMP_nope/get_result"),
        ("GET", "/v1/tasks/TASK_nope/status"),
        ("GET", "/v1/tasks/TASK_nope/stream"),
        ("POST", "/v1/tasks/_TMPL_nope/fork"),
        ("POST", "/v1/tasks/TMP_nope/stop"),
        ("POST", "/v1/tasks/TMP_nope/delete?force=false"),
    ):
        reply = await client.request(method, path, json={})
        assert reply.status_code == 404, path
        assert isinstance(reply.json()["detail"], str)


async def test_delete_force_and_template_errors(client: httpx.AsyncClient) -> None:
    task_id = (await client.post("/v1/tasks/tmp", json={"prompt": "Hello", **GREEDY})).json()["task_id"]
    await finished(client, task_id)
    template = (await client.post(f"/v1/tasks/{task_id}/as_template", json={})).json()
    template_id = template["task_id"]
    assert template_id.startswith("_TMPL_")
    assert template["result"] == ""
    reply = await client.post(f"/v1/tasks/{template_id}/as_template", json={})
    assert reply.status_code == 400
    assert "template" in reply.json()["detail"]
    reply = await client.post(f"/v1/tasks/{template_id}/continue", json={"stream": False})
    assert reply.status_code == 403
    reply = await client.post(f"/v1/tasks/{template_id}/delete", params={"force": "false"}, json={})
    assert reply.status_code == 403
    assert isinstance(reply.json()["detail"], str)
    reply = await client.post(f"/v1/tasks/{template_id}/delete", params={"force": "true"}, json={})
    assert reply.status_code == 200
    assert reply.json()["task_id"] == template_id
    reply = await client.post(f"/v1/tasks/{task_id}/delete", params={"force": "false"}, json={})
    assert reply.status_code == 200
    assert reply.json() == {"task_id": task_id, "generated_buf": 16, "status": 3}
    assert (await client.get(f"/v1/tasks/{task_id}/status")).status_code == 404


async def test_stop_returns_task_info(client: httpx.AsyncClient) -> None:
    task_id = (await client.post("/v1/tasks/tmp", json={"prompt": "Hello", "max_tokens": 4000})).json()["task_id"]
    # Generating: a task stopped while still queued has no state to continue from (409 NO_STATE).
    while (await client.get(f"/v1/tasks/{task_id}/status")).json()["generated_buf"] == 0:  # noqa: ASYNC110 (polls HTTP)
        await asyncio.sleep(0.01)
    reply = await client.post(f"/v1/tasks/{task_id}/stop", json={})
    assert reply.status_code == 200
    assert set(reply.json()) == {"task_id", "generated_buf", "status"}
    assert (await finished(client, task_id))["finished"]
    status = (await client.get(f"/v1/tasks/{task_id}/status")).json()
    assert status["status"] == TaskStatus.FINISHED
    reply = await client.post(f"/v1/tasks/{task_id}/continue", json={"stream": False, "max_tokens": 4000})
    assert reply.status_code == 200, reply.text
    conflict = await client.post(f"/v1/tasks/{task_id}/continue", json={"stream": False})
    assert conflict.status_code == 409
    assert isinstance(conflict.json()["detail"], str)
    await client.post(f"/v1/tasks/{task_id}/stop", json={})


async def test_queue_full_is_429_with_retry_after() -> None:
    settings = {**ONE_THREAD, "engine.max_batch_size": 1, "engine.max_queued": 0}
    async with running_app(**settings) as full, httpx.AsyncClient(base_url=http_base(full)) as c:
        busy = await c.post("/v1/tasks/tmp", json={"prompt": "Hello", "max_tokens": 40000})  # holds the only slot
        assert busy.status_code == 200
        reply = await c.post("/v1/tasks/tmp", json={"prompt": "Hello"})
        streamed = await c.post("/v1/tasks/tmp", json={"prompt": "Hello", "stream": True})
        await c.post(f"/v1/tasks/{busy.json()['task_id']}/stop", json={})
    for r in (reply, streamed):
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert isinstance(r.json()["detail"], str)
