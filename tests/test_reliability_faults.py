"""Faults on the real server (CPU, demo model), over gRPC and HTTP.

* Clients that vanish mid-stream (a cancelled gRPC call, a closed HTTP connection, a closed OpenAI SDK
  stream): the request's engine slot is free again within one engine step of the client leaving. A task's
  stream is the exception by design: the task runs on to its end and stays readable.
* A full queue: a burst beyond max_batch_size + max_queued. The surplus gets clean rejections (gRPC
  RESOURCE_EXHAUSTED with RetryInfo, HTTP 429 with Retry-After in each dialect's body shape); everything that
  was admitted finishes with its whole output; nothing stays queued.
* Slow readers: a gRPC stream and an SSE stream that stop reading for seconds do not slow the others down
  (compared with a run where they read promptly), and get all their output once they read again.
* A failure inside one request (a fault injected into one row's post-processing): that request alone ends
  with FINISH_REASON_ERROR or its dialect's error, the others in the same steps complete.

Engine steps are paced (each takes at least PACE seconds; see reliability_support.paced_steps) where a test
counts steps or needs requests to still be running while others arrive: the engine computes the same, but
the outcome no longer depends on this machine's speed. Nothing asserts an absolute time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import openai
import pytest
import pytest_asyncio
from rwkvd.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    common_pb2,
    completions_pb2,
    completions_pb2_grpc,
    predictions_pb2,
    predictions_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)

from service.app import App
from service.engine.sequence import Sequence as EngineSequence
from tests.reliability_support import (
    SseEvent,
    SseParser,
    contiguous_tokens,
    engine_idle,
    engine_of,
    failing_rows,
    paced_steps,
    parse_sse,
    rpc_details,
    steps,
    wait_until,
)
from tests.support import grpc_target, http_base, running_app

if TYPE_CHECKING:  # the async stub classes exist in the .pyi only
    from rwkvd.v1.chat_pb2_grpc import ChatServiceAsyncStub
    from rwkvd.v1.completions_pb2_grpc import CompletionServiceAsyncStub
    from rwkvd.v1.predictions_pb2_grpc import PredictionServiceAsyncStub
    from rwkvd.v1.tasks_pb2_grpc import TaskServiceAsyncStub

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "local/rwkv7-demo"
PACE = 0.1  # seconds per engine step where steps are counted: far above a loopback round trip
LONG = 100_000  # tokens: a generation that is still running whenever the test acts
SETTINGS: dict[str, Any] = {"engine.threads": 1, "engine.max_batch_size": 32, "max_temporary_tasks": 1024}


@dataclass
class Clients:
    app: App
    tasks: TaskServiceAsyncStub
    completions: CompletionServiceAsyncStub
    chat: ChatServiceAsyncStub
    predictions: PredictionServiceAsyncStub
    http: httpx.AsyncClient
    sdk: openai.AsyncOpenAI


@asynccontextmanager
async def clients_of(app: App) -> AsyncIterator[Clients]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with (
        grpc.aio.insecure_channel(grpc_target(app)) as channel,
        httpx.AsyncClient(base_url=http_base(app), timeout=60, limits=limits) as http,
        openai.AsyncOpenAI(base_url=http_base(app) + "/v1", api_key="x", max_retries=0, timeout=60) as sdk,
    ):
        yield Clients(
            app,
            tasks_pb2_grpc.TaskServiceStub(channel),
            completions_pb2_grpc.CompletionServiceStub(channel),
            chat_pb2_grpc.ChatServiceStub(channel),
            predictions_pb2_grpc.PredictionServiceStub(channel),
            http,
            sdk,
        )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[App]:
    async with running_app(**SETTINGS) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def c(app: App) -> AsyncIterator[Clients]:
    async with clients_of(app) as opened:
        yield opened


def sampling(max_tokens: int, **more: Any) -> common_pb2.SamplingParams:
    """Greedy, end of text ignored: a known number of tokens (chat and tasks may still stop at a new turn)."""
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **more)


def text_prompt(text: str) -> common_pb2.Prompt:
    return common_pb2.Prompt(text=text)


def user(content: str) -> list[chat_pb2.ChatMessage]:
    return [chat_pb2.ChatMessage(role=chat_pb2.CHAT_ROLE_USER, content=content)]


def struct(values: dict[str, Any]) -> Any:
    from google.protobuf import struct_pb2

    s = struct_pb2.Struct()
    s.update(values)
    return s


async def read_until(call: Any, wanted: Callable[[Any], bool]) -> Any:
    """Reads a gRPC stream until a message satisfies `wanted` (and returns it)."""
    while True:
        message = await call.read()
        assert message is not grpc.aio.EOF, "the stream ended first"
        if wanted(message):
            return message


async def open_sse(c: Clients, method: str, url: str, body: dict[str, Any] | None = None) -> httpx.Response:
    request = c.http.build_request(method, url, json=body)
    response = await c.http.send(request, stream=True)
    assert response.status_code == 200, (await response.aread()).decode()
    return response


class SseReader:
    """Reads an SSE response in pieces: up to an event, then (later) the rest."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.parser = SseParser()
        self.events: list[SseEvent] = []
        self._chunks = response.aiter_raw()

    async def until(self, wanted: Callable[[SseEvent], bool]) -> SseEvent:
        async for chunk in self._chunks:
            for event in self.parser.feed(chunk):
                self.events.append(event)
                if wanted(event):
                    return event
        raise AssertionError("the stream ended first")

    async def rest(self) -> list[SseEvent]:
        """Every event of the stream, read to its end."""
        async for chunk in self._chunks:
            self.events.extend(self.parser.feed(chunk))
        await self.response.aclose()
        assert not self.parser.pending, "the stream ended inside an event"
        return self.events


def has_text(event: SseEvent) -> bool:
    """An OpenAI chunk with generated text."""
    if event.data == "[DONE]":
        return False
    choices = event.json().get("choices") or [{}]
    return bool(choices[0].get("text") or (choices[0].get("delta") or {}).get("content"))


# ---- (a) clients that vanish mid-stream ---------------------------------------------------------------

Vanish = Callable[[], Awaitable[None]]


async def vanishing_grpc_completion(c: Clients) -> Vanish:
    call = c.completions.CreateCompletionStream(
        completions_pb2.CreateCompletionStreamRequest(
            prompt=text_prompt("A vanishing completion"), sampling=sampling(LONG)
        )
    )
    await read_until(call, lambda m: m.WhichOneof("event") == "delta")

    async def vanish() -> None:
        call.cancel()

    return vanish


async def vanishing_grpc_chat(c: Clients) -> Vanish:
    call = c.chat.CompleteStream(
        chat_pb2.CompleteStreamRequest(messages=user("A vanishing chat"), sampling=sampling(LONG))
    )
    await read_until(call, lambda m: any(ch.delta.token_ids for ch in m.choices))

    async def vanish() -> None:
        call.cancel()

    return vanish


async def vanishing_grpc_converse(c: Clients) -> Vanish:
    call = c.chat.Converse()
    await call.write(chat_pb2.ConverseRequest(open=chat_pb2.OpenSession()))
    await read_until(call, lambda m: m.WhichOneof("event") == "opened")
    await call.write(chat_pb2.ConverseRequest(turn=chat_pb2.UserTurn(content="Talk forever", sampling=sampling(LONG))))
    await read_until(call, lambda m: m.WhichOneof("event") == "delta")

    async def vanish() -> None:
        call.cancel()

    return vanish


async def vanishing_grpc_run_prediction(c: Clients) -> Vanish:
    """A unary call: cancelled while it waits for its prediction, which nobody else knows of."""
    engine = engine_of(c.app)
    before = steps(c.app)
    request = predictions_pb2.RunPredictionRequest(
        model=MODEL, input=struct({"prompt": "A vanishing prediction", "max_tokens": LONG})
    )
    call = c.predictions.RunPrediction(request)
    assert await wait_until(lambda: engine.stats().slots_in_use == 1 and steps(c.app) >= before + 3)

    async def vanish() -> None:
        call.cancel()

    return vanish


async def vanishing_http_completion_sse(c: Clients) -> Vanish:
    body = {"model": MODEL, "prompt": "A vanishing SSE reader", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    response = await open_sse(c, "POST", "/v1/completions", body)
    await SseReader(response).until(has_text)
    return response.aclose  # closes the connection: the body was not read to its end


async def vanishing_openai_sdk_chat(c: Clients) -> Vanish:
    stream = await c.sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A vanishing SDK user"}],
        max_tokens=LONG,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if any(choice.delta.content for choice in chunk.choices):
            break
    return stream.close


async def vanishing_replicate_run_sse(c: Clients) -> Vanish:
    body = {"model": MODEL, "input": {"prompt": "A vanishing run_sse reader", "max_tokens": LONG}}
    response = await open_sse(c, "POST", "/v1/run_sse", body)
    await SseReader(response).until(lambda e: e.name == "output")
    return response.aclose


VANISHING: dict[str, Callable[[Clients], Awaitable[Vanish]]] = {
    "grpc CreateCompletionStream cancelled": vanishing_grpc_completion,
    "grpc CompleteStream cancelled": vanishing_grpc_chat,
    "grpc Converse cancelled mid-turn": vanishing_grpc_converse,
    "grpc RunPrediction cancelled": vanishing_grpc_run_prediction,
    "http /v1/completions SSE connection closed": vanishing_http_completion_sse,
    "openai SDK chat stream closed": vanishing_openai_sdk_chat,
    "http /v1/run_sse connection closed": vanishing_replicate_run_sse,
}


@pytest.mark.parametrize("kind", VANISHING)
async def test_a_vanished_client_frees_its_slot_within_one_step(
    app: App, c: Clients, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    engine = engine_of(app)
    assert await engine_idle(app)
    with paced_steps(monkeypatch, PACE):
        vanish = await VANISHING[kind](c)
        assert engine.stats().slots_in_use == 1  # generating, far from its end
        at_vanish = steps(app)
        await vanish()
        assert await wait_until(lambda: engine.stats().slots_in_use == 0, within=10)
        taken = steps(app) - at_vanish
    # The step in flight when the client left may complete (it cannot be interrupted), and the server hears
    # of the leaving a loopback round trip later, which can fall just after the next step began: at most two.
    assert taken <= 2, f"the slot was held for {taken} more steps"
    assert await engine_idle(app)


@dataclass
class Kept:
    """A stream whose client left while the work it followed must go on: how to check it went on."""

    vanish: Vanish
    outcome: Callable[[], Awaitable[tuple[bool, int]]]  # (ended normally, generated tokens) once it has ended


KEPT_TOKENS = 8


async def kept_grpc_task_stream(c: Clients) -> Kept:
    call = c.tasks.CreateTaskStream(
        tasks_pb2.CreateTaskStreamRequest(
            prompt=text_prompt("A task outlives its stream"), sampling=sampling(KEPT_TOKENS)
        )
    )
    started = await read_until(call, lambda m: m.WhichOneof("event") == "started")
    await read_until(call, lambda m: m.WhichOneof("event") == "delta")
    task_id = started.started.task_id

    async def vanish() -> None:
        call.cancel()

    async def outcome() -> tuple[bool, int]:
        task = (await c.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task
        assert task.finished
        normal = task.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP_SEQUENCE)
        return normal, task.generated_tokens

    return Kept(vanish, outcome)


async def kept_http_task_stream(c: Clients) -> Kept:
    body = {"prompt": "An HTTP task outlives its stream", "stream": True, "max_tokens": KEPT_TOKENS, "temperature": 0}
    response = await open_sse(c, "POST", "/v1/tasks/tmp", body)
    reader = SseReader(response)
    await reader.until(lambda e: "data" in e.json())
    task_id = reader.events[0].json()["task_id"]

    async def outcome() -> tuple[bool, int]:
        result = (await c.http.get(f"/v1/tasks/{task_id}/get_result")).json()
        assert result["finished"]
        task = (await c.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task
        assert task.result == result["result"]
        normal = task.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP_SEQUENCE)
        return normal, task.generated_tokens

    return Kept(response.aclose, outcome)


async def kept_replicate_stream(c: Clients) -> Kept:
    inputs = {"prompt": "A prediction outlives its stream", "max_tokens": KEPT_TOKENS, "temperature": 0}
    created = (await c.http.post("/v1/predictions", json={"model": MODEL, "input": inputs})).json()
    response = await open_sse(c, "GET", created["urls"]["stream"])
    await SseReader(response).until(lambda e: e.name == "output")

    async def outcome() -> tuple[bool, int]:
        prediction = (await c.http.get(f"/v1/predictions/{created['id']}")).json()
        return prediction["status"] == "succeeded", int(prediction["metrics"]["output_token_count"])

    return Kept(response.aclose, outcome)


KEPT: dict[str, Callable[[Clients], Awaitable[Kept]]] = {
    "grpc CreateTaskStream cancelled": kept_grpc_task_stream,
    "http /v1/tasks stream closed": kept_http_task_stream,
    "http prediction stream closed": kept_replicate_stream,
}


@pytest.mark.parametrize("kind", KEPT)
async def test_a_task_or_prediction_outlives_the_stream_that_followed_it(
    app: App, c: Clients, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    engine = engine_of(app)
    assert await engine_idle(app)
    with paced_steps(monkeypatch, PACE):
        kept = await KEPT[kind](c)
        await kept.vanish()
        at_vanish = steps(app)
        assert await wait_until(lambda: steps(app) >= at_vanish + 3, within=10)
        assert engine.stats().slots_in_use == 1  # still generating: only the stream ended
    assert await engine_idle(app)
    normal, tokens = await kept.outcome()
    assert normal
    assert 0 < tokens <= KEPT_TOKENS


# ---- (b) a full queue ----------------------------------------------------------------------------------

BATCH, QUEUED = 2, 3
FULL_TOKENS = 6


def assert_grpc_refused(err: grpc.RpcError) -> None:
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err  # type: ignore[attr-defined]
    details = rpc_details(err)
    assert details is not None
    assert details.reason == "QUEUE_FULL"
    assert details.retry_delay is not None
    assert details.retry_delay > 0


def assert_status_refused(status: Any) -> None:
    """A google.rpc.Status carried in-band (a Converse TurnError)."""
    from google.rpc import error_details_pb2

    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry, "no RetryInfo"


def assert_http_refused(response: httpx.Response, dialect: str) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    if dialect == "openai":
        error = body["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert error["message"]
    elif dialect == "replicate":
        assert response.headers["content-type"].startswith("application/problem+json")
        assert (body["status"], body["reason"]) == (429, "QUEUE_FULL")
        assert body["detail"]
        assert body["title"]
    else:  # RWKV-Server's task API
        assert set(body) == {"detail"}
        assert body["detail"]


Attempt = Callable[[Clients], Awaitable[str]]  # "admitted" (its whole output checked) or "refused" (checked)


async def grpc_unary_completion(c: Clients) -> str:
    request = completions_pb2.CreateCompletionRequest(
        prompt=text_prompt("Queue, unary"), sampling=sampling(FULL_TOKENS)
    )
    try:
        response = await c.completions.CreateCompletion(request)
    except grpc.RpcError as err:
        assert_grpc_refused(err)
        return "refused"
    assert response.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(response.token_ids) == response.usage.completion_tokens == FULL_TOKENS
    return "admitted"


async def grpc_completion_stream(c: Clients) -> str:
    request = completions_pb2.CreateCompletionStreamRequest(
        prompt=text_prompt("Queue, stream"), sampling=sampling(FULL_TOKENS)
    )
    try:
        events = [e async for e in c.completions.CreateCompletionStream(request)]
    except grpc.RpcError as err:
        assert_grpc_refused(err)
        return "refused"
    tokens = contiguous_tokens(e.delta for e in events if e.WhichOneof("event") == "delta")
    assert len(tokens) == events[-1].finished.usage.completion_tokens == FULL_TOKENS
    return "admitted"


async def grpc_chat_stream(c: Clients) -> str:
    request = chat_pb2.CompleteStreamRequest(messages=user("Queue, chat"), sampling=sampling(FULL_TOKENS))
    try:
        messages = [m async for m in c.chat.CompleteStream(request)]
    except grpc.RpcError as err:
        assert_grpc_refused(err)
        return "refused"
    deltas = [ch.delta for m in messages for ch in m.choices if not ch.finish_reason]
    ends = [ch.finish_reason for m in messages for ch in m.choices if ch.finish_reason]
    assert ends in ([common_pb2.FINISH_REASON_LENGTH], [common_pb2.FINISH_REASON_STOP_SEQUENCE])
    assert len(contiguous_tokens(deltas)) == messages[-1].usage.completion_tokens
    return "admitted"


async def grpc_task_stream(c: Clients) -> str:
    request = tasks_pb2.CreateTaskStreamRequest(prompt=text_prompt("Queue, task"), sampling=sampling(FULL_TOKENS))
    try:
        events = [e async for e in c.tasks.CreateTaskStream(request)]
    except grpc.RpcError as err:
        assert_grpc_refused(err)
        return "refused"
    finished = events[-1].finished
    assert finished.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP_SEQUENCE)
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert len(contiguous_tokens(deltas)) == finished.usage.completion_tokens
    task = (await c.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=finished.task_id))).task
    assert task.result == "".join(d.text for d in deltas)
    return "admitted"


async def openai_chat(c: Clients) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Queue, OpenAI"}], "temperature": 0}
    response = await c.http.post("/v1/chat/completions", json={**body, "max_tokens": FULL_TOKENS, "ignore_eos": True})
    if response.status_code == 429:
        assert_http_refused(response, "openai")
        return "refused"
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["choices"][0]["finish_reason"] in ("length", "stop")
    assert 0 < reply["usage"]["completion_tokens"] <= FULL_TOKENS
    return "admitted"


async def openai_completion_sse(c: Clients) -> str:
    body = {
        "model": MODEL,
        "prompt": "Queue, OpenAI SSE",
        "max_tokens": FULL_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await c.http.post("/v1/completions", json=body)
    if response.status_code == 429:
        assert_http_refused(response, "openai")
        return "refused"
    assert response.status_code == 200, response.text
    events = parse_sse(response.content)
    assert events[-1].data == "[DONE]"
    chunks = [e.json() for e in events[:-1]]
    assert not any("error" in chunk for chunk in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == FULL_TOKENS
    assert [ch["finish_reason"] for chunk in chunks for ch in chunk["choices"] if ch["finish_reason"]] == ["length"]
    return "admitted"


async def replicate_wait(c: Clients) -> str:
    inputs = {"prompt": "Queue, Replicate", "max_tokens": FULL_TOKENS, "temperature": 0}
    response = await c.http.post(
        "/v1/predictions", json={"model": MODEL, "input": inputs}, headers={"Prefer": "wait=60"}
    )
    if response.status_code == 429:
        assert_http_refused(response, "replicate")
        return "refused"
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "succeeded"
    assert response.json()["output"]
    return "admitted"


async def tasks_create(c: Clients) -> str:
    body = {"prompt": "Queue, task API", "max_tokens": FULL_TOKENS, "temperature": 0}
    response = await c.http.post("/v1/tasks/tmp", json=body)
    if response.status_code == 429:
        assert_http_refused(response, "tasks")
        return "refused"
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    async with c.http.stream("GET", f"/v1/tasks/{task_id}/stream") as followed:
        assert parse_sse(await followed.aread())[-1].data == "[DONE]"  # the task has ended
    result = (await c.http.get(f"/v1/tasks/{task_id}/get_result")).json()
    assert result["finished"]
    task = (await c.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task
    assert task.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP_SEQUENCE)
    assert task.result == result["result"]
    return "admitted"


async def tasks_stream(c: Clients) -> str:
    body = {"prompt": "Queue, task API stream", "max_tokens": FULL_TOKENS, "temperature": 0, "stream": True}
    response = await c.http.post("/v1/tasks/tmp", json=body)
    if response.status_code == 429:
        assert_http_refused(response, "tasks")
        return "refused"
    assert response.status_code == 200, response.text
    events = parse_sse(response.content)
    assert events[-1].data == "[DONE]"
    payloads = [e.json() for e in events[:-1]]
    assert not any("error" in p for p in payloads)
    result = (await c.http.get(f"/v1/tasks/{payloads[0]['task_id']}/get_result")).json()
    assert result["finished"]
    assert result["result"] == "".join(p.get("data", "") for p in payloads)
    return "admitted"


ATTEMPTS: list[Attempt] = [
    grpc_unary_completion,
    grpc_completion_stream,
    grpc_chat_stream,
    grpc_task_stream,
    openai_chat,
    openai_completion_sse,
    replicate_wait,
    tasks_create,
    tasks_stream,
]


async def test_a_burst_beyond_the_queue_is_refused_cleanly_and_the_admitted_finish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = {**SETTINGS, "engine.max_batch_size": BATCH, "engine.max_queued": QUEUED}
    async with running_app(**settings) as small, clients_of(small) as c:
        with paced_steps(monkeypatch, PACE):  # every admitted request still runs while the whole burst arrives
            outcomes = await asyncio.gather(*(attempt(c) for attempt in ATTEMPTS * 2))
        admitted, refused = outcomes.count("admitted"), outcomes.count("refused")
        assert admitted + refused == len(outcomes) == 2 * len(ATTEMPTS)
        assert admitted >= BATCH + QUEUED
        assert refused >= 1
        assert await engine_idle(small)
        assert await grpc_unary_completion(c) == "admitted"  # nothing was left counted in the queue


async def test_each_dialect_refuses_a_full_queue_in_its_own_shape() -> None:
    settings = {**SETTINGS, "engine.max_batch_size": BATCH, "engine.max_queued": QUEUED}
    async with running_app(**settings) as small, clients_of(small) as c:
        # Two generations hold the slots and three wait: all long, so the queue stays full meanwhile.
        fill = [
            (
                await c.tasks.CreateTask(
                    tasks_pb2.CreateTaskRequest(prompt=text_prompt(f"fill {i}"), sampling=sampling(LONG))
                )
            ).task.task_id
            for i in range(BATCH + QUEUED)
        ]
        for attempt in ATTEMPTS:
            assert await attempt(c) == "refused", attempt.__name__
        extra_grpc: list[Callable[[], Awaitable[Any]]] = [
            lambda: c.tasks.CreateTask(tasks_pb2.CreateTaskRequest(prompt=text_prompt("x"), sampling=sampling(2))),
            lambda: c.chat.Complete(chat_pb2.CompleteRequest(messages=user("x"), sampling=sampling(2))),
            lambda: c.predictions.CreatePrediction(
                predictions_pb2.CreatePredictionRequest(model=MODEL, input=struct({"prompt": "x"}))
            ),
            lambda: c.predictions.RunPrediction(
                predictions_pb2.RunPredictionRequest(model=MODEL, input=struct({"prompt": "x"}))
            ),
            lambda: c.tasks.ForkTask(tasks_pb2.ForkTaskRequest(task_id=fill[0], kind=tasks_pb2.TASK_KIND_TEMPORARY)),
        ]
        for call in extra_grpc:
            with pytest.raises(grpc.RpcError) as refused:
                await call()
            assert_grpc_refused(refused.value)
        extra_http = [
            ("openai", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}),
            ("openai", "/v1/completions", {"prompt": "x"}),
            ("replicate", "/v1/predictions", {"version": MODEL, "input": {"prompt": "x"}}),
            ("replicate", f"/v1/models/{MODEL}/predictions", {"input": {"prompt": "x"}}),
            ("replicate", "/v1/run", {"model": MODEL, "input": {"prompt": "x"}}),
            ("replicate", "/v1/run_sse", {"model": MODEL, "input": {"prompt": "x"}}),
            ("tasks", "/v1/tasks/create", {"prompt": "x"}),
            ("tasks", "/v1/tasks/fim", {"prefix": "x", "suffix": "y"}),
            ("tasks", f"/v1/tasks/{fill[0]}/fork?tmp=true", {"prompt": "x"}),
        ]
        for dialect, path, body in extra_http:
            assert_http_refused(await c.http.post(path, json=body), dialect)
        # A chat session's turn is refused in-band, and the session goes on.
        call = c.chat.Converse()
        await call.write(chat_pb2.ConverseRequest(open=chat_pb2.OpenSession()))
        await read_until(call, lambda m: m.WhichOneof("event") == "opened")
        await call.write(chat_pb2.ConverseRequest(turn=chat_pb2.UserTurn(turn_id="t1", content="x")))
        error = await read_until(call, lambda m: m.WhichOneof("event") == "error")
        assert error.error.turn_id == "t1"
        assert_status_refused(error.error.status)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF

        # The admitted are untouched by the refusals: still generating, then stopped by their owner.
        assert engine_of(small).stats().slots_in_use == BATCH
        for task_id in fill:
            await c.tasks.StopTask(tasks_pb2.StopTaskRequest(task_id=task_id))
        assert await engine_idle(small)
        for task_id in fill:
            task = (await c.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task
            assert task.finished
            assert task.finish_reason == common_pb2.FINISH_REASON_CANCELLED
        assert await grpc_unary_completion(c) == "admitted"


# ---- (c) slow readers ----------------------------------------------------------------------------------

SLOW_TOKENS = 400  # with 20 alternatives per token: hundreds of KiB, beyond the transports' windows
OTHER_TOKENS = 64
OTHERS = 12
STALL_SECONDS = 3.0


async def other_stream(c: Clients, i: int) -> None:
    """One of the streams that must not notice the slow readers: half gRPC, half SSE, each read to its end."""
    if i % 2:
        request = completions_pb2.CreateCompletionStreamRequest(
            prompt=text_prompt(f"Other {i}"), sampling=sampling(OTHER_TOKENS)
        )
        events = [e async for e in c.completions.CreateCompletionStream(request)]
        tokens = contiguous_tokens(e.delta for e in events if e.WhichOneof("event") == "delta")
        assert len(tokens) == OTHER_TOKENS
    else:
        body = {"prompt": f"Other {i}", "max_tokens": OTHER_TOKENS, "ignore_eos": True, "temperature": 0}
        response = await c.http.post("/v1/completions", json={**body, "stream": True})
        assert parse_sse(response.content)[-1].data == "[DONE]"


async def drain_grpc(call: Any, first: list[Any]) -> None:
    """Reads a heavy gRPC stream to its end and checks every token and its alternatives arrived once."""
    events = list(first)
    while (message := await call.read()) is not grpc.aio.EOF:
        events.append(message)
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert all(len(lp.top_logprobs) == 20 for d in deltas for lp in d.logprobs)
    finished = events[-1].finished
    assert len(contiguous_tokens(deltas)) == finished.usage.completion_tokens == SLOW_TOKENS


async def drain_sse(reader: SseReader) -> None:
    """Reads a heavy SSE stream to its end and checks every token arrived once."""
    events = await reader.rest()
    assert events[-1].data == "[DONE]"
    chunks = [e.json() for e in events[:-1]]
    assert not any("error" in chunk for chunk in chunks)
    tokens = [t for chunk in chunks for ch in chunk["choices"] if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    assert len(tokens) == chunks[-1]["usage"]["completion_tokens"] == SLOW_TOKENS


async def others_while_heavy_streams_run(c: Clients, stall: float) -> float:
    """Seconds the other streams take while a heavy gRPC and a heavy SSE stream run, which stop being read for
    `stall` seconds (or, with 0, are read as fast as they come)."""
    heavy = sampling(SLOW_TOKENS, logprobs=True, top_logprobs=20)
    call = c.completions.CreateCompletionStream(
        completions_pb2.CreateCompletionStreamRequest(prompt=text_prompt("Heavy gRPC"), sampling=heavy)
    )
    first_grpc = [await call.read()]
    first_grpc.append(await read_until(call, lambda m: m.WhichOneof("event") == "delta"))
    body = {
        "prompt": "Heavy SSE",
        "max_tokens": SLOW_TOKENS,
        "logprobs": 20,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sse = SseReader(await open_sse(c, "POST", "/v1/completions", body))
    await sse.until(has_text)

    def readers() -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(drain_grpc(call, first_grpc)),
            asyncio.create_task(drain_sse(sse)),
        ]

    reading = [] if stall else readers()
    stalled_at = time.perf_counter()
    await asyncio.gather(*(other_stream(c, i) for i in range(OTHERS)))
    elapsed = time.perf_counter() - stalled_at
    if stall:
        assert engine_of(c.app).stats().slots_in_use == 2  # the heavy ones are still generating
        await asyncio.sleep(max(0.0, stall - elapsed))
        reading = readers()
    await asyncio.gather(*reading)
    return elapsed


async def test_slow_readers_do_not_slow_the_others_and_still_get_everything(app: App, c: Clients) -> None:
    assert await engine_idle(app)
    prompt = await others_while_heavy_streams_run(c, stall=0)
    assert await engine_idle(app)
    # Stalled long enough that others held up by the stall would take several times the prompt run's time.
    stalled = await others_while_heavy_streams_run(c, stall=max(STALL_SECONDS, 4 * prompt))
    assert await engine_idle(app)
    # The same work in both runs; only the two heavy streams' readers differ. A generous factor: this is
    # about a stalled reader holding the others up (which would take them the whole stall), not about speed.
    assert stalled < 3 * prompt, f"others took {stalled:.2f}s beside stalled readers, {prompt:.2f}s beside prompt ones"


# ---- (d) a failure inside one request --------------------------------------------------------------------

MARK = "FAULT-INJECTED-HERE"
HEALTHY_TOKENS = 8


def marked(app: App) -> Callable[[EngineSequence], bool]:
    """Whether a sequence's prompt carries MARK (the requests the injected fault hits)."""
    tokenizer = engine_of(app).tokenizer

    def doomed(seq: EngineSequence) -> bool:
        # Not cached by request id: a session numbers its turns by those that succeeded, so the turn after a
        # failed one reuses its id.
        return MARK in tokenizer.decode(seq.request.prompt)

    return doomed


def prompt_for(doomed: bool, what: str) -> str:
    return f"{what} {MARK}" if doomed else f"{what}, healthy"


async def fault_grpc_completion_stream(c: Clients, doomed: bool) -> None:
    request = completions_pb2.CreateCompletionStreamRequest(
        prompt=text_prompt(prompt_for(doomed, "gRPC stream")), sampling=sampling(HEALTHY_TOKENS)
    )
    events = [e async for e in c.completions.CreateCompletionStream(request)]
    finished = events[-1].finished
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    assert len(contiguous_tokens(deltas)) == finished.usage.completion_tokens
    if doomed:
        assert finished.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert finished.usage.completion_tokens == 2  # what it had before the fault
    else:
        assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert finished.usage.completion_tokens == HEALTHY_TOKENS


async def fault_grpc_completion(c: Clients, doomed: bool) -> None:
    request = completions_pb2.CreateCompletionRequest(
        prompt=text_prompt(prompt_for(doomed, "gRPC unary")), sampling=sampling(HEALTHY_TOKENS)
    )
    if doomed:
        with pytest.raises(grpc.RpcError) as failed:
            await c.completions.CreateCompletion(request)
        assert failed.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
        details = rpc_details(failed.value)
        assert details is not None
        assert details.reason == "GENERATION_FAILED"
        assert "injected fault" in (failed.value.details() or "")  # type: ignore[attr-defined]
    else:
        response = await c.completions.CreateCompletion(request)
        assert len(response.token_ids) == HEALTHY_TOKENS


async def fault_grpc_chat_stream(c: Clients, doomed: bool) -> None:
    request = chat_pb2.CompleteStreamRequest(
        messages=user(prompt_for(doomed, "gRPC chat")), sampling=sampling(HEALTHY_TOKENS)
    )
    messages = [m async for m in c.chat.CompleteStream(request)]
    ends = [ch.finish_reason for m in messages for ch in m.choices if ch.finish_reason]
    if doomed:
        assert ends == [common_pb2.FINISH_REASON_ERROR]
    else:
        assert ends in ([common_pb2.FINISH_REASON_LENGTH], [common_pb2.FINISH_REASON_STOP_SEQUENCE])


async def fault_grpc_task_stream(c: Clients, doomed: bool) -> None:
    request = tasks_pb2.CreateTaskStreamRequest(
        prompt=text_prompt(prompt_for(doomed, "gRPC task")), sampling=sampling(HEALTHY_TOKENS)
    )
    events = [e async for e in c.tasks.CreateTaskStream(request)]
    finished = events[-1].finished
    task = (await c.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=finished.task_id))).task
    assert task.finished
    assert task.result == "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
    if doomed:
        assert finished.finish_reason == task.finish_reason == common_pb2.FINISH_REASON_ERROR
        assert "injected fault" in finished.error
        assert "injected fault" in task.error
    else:
        assert finished.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP_SEQUENCE)
        assert not task.error


async def fault_grpc_converse(c: Clients, doomed: bool) -> None:
    """A failed turn is answered in-band; the session goes on and its next turn works."""
    call = c.chat.Converse()
    await call.write(chat_pb2.ConverseRequest(open=chat_pb2.OpenSession(sampling=sampling(HEALTHY_TOKENS))))
    await read_until(call, lambda m: m.WhichOneof("event") == "opened")
    await call.write(chat_pb2.ConverseRequest(turn=chat_pb2.UserTurn(turn_id="1", content=prompt_for(doomed, "turn"))))
    end = await read_until(call, lambda m: m.WhichOneof("event") in ("turn_end", "error"))
    if doomed:
        assert end.WhichOneof("event") == "error"
        assert end.error.status.code == grpc.StatusCode.INTERNAL.value[0]
        assert "injected fault" in end.error.status.message
    else:
        assert end.WhichOneof("event") == "turn_end"
    await call.write(chat_pb2.ConverseRequest(turn=chat_pb2.UserTurn(turn_id="2", content="And now?")))
    again = await read_until(call, lambda m: m.WhichOneof("event") in ("turn_end", "error"))
    assert again.WhichOneof("event") == "turn_end", again
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF


async def fault_openai_chat_sse(c: Clients, doomed: bool) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt_for(doomed, "OpenAI")}],
        "max_tokens": HEALTHY_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    response = await c.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200  # the failure comes after the stream began
    events = parse_sse(response.content)
    if doomed:
        error = events[-1].json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "generation_failed")
        assert "injected fault" in error["message"]
    else:
        assert events[-1].data == "[DONE]"
        assert not any("error" in e.json() for e in events[:-1])


async def fault_openai_chat(c: Clients, doomed: bool) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt_for(doomed, "OpenAI whole")}],
        "max_tokens": HEALTHY_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
    }
    response = await c.http.post("/v1/chat/completions", json=body)
    if doomed:
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "generation_failed"
    else:
        assert response.status_code == 200


async def fault_replicate(c: Clients, doomed: bool) -> None:
    inputs = {"prompt": prompt_for(doomed, "Replicate"), "max_tokens": HEALTHY_TOKENS, "temperature": 0}
    created = await c.http.post("/v1/predictions", json={"model": MODEL, "input": inputs}, headers={"Prefer": "wait"})
    prediction = created.json()
    async with c.http.stream("GET", prediction["urls"]["stream"]) as response:
        events = parse_sse(await response.aread())
    if doomed:
        assert prediction["status"] == "failed"
        assert "injected fault" in prediction["error"]
        assert [e.name for e in events][-2:] == ["error", "done"]
        assert json.loads(events[-1].data) == {"reason": "error"}
    else:
        assert prediction["status"] == "succeeded"
        assert [e.name for e in events][-1] == "done"
        assert "error" not in [e.name for e in events]


async def fault_tasks_stream(c: Clients, doomed: bool) -> None:
    body = {"prompt": prompt_for(doomed, "Task API"), "max_tokens": HEALTHY_TOKENS, "temperature": 0, "stream": True}
    response = await c.http.post("/v1/tasks/tmp", json=body)
    events = parse_sse(response.content)
    assert events[-1].data == "[DONE]"
    payloads = [e.json() for e in events[:-1]]
    errors = [p["error"] for p in payloads if "error" in p]
    if doomed:
        assert len(errors) == 1
        assert errors[0]["finish_reason"] == "error"
        assert "injected fault" in errors[0]["message"]
    else:
        assert not errors


FAULTED: list[Callable[[Clients, bool], Awaitable[None]]] = [
    fault_grpc_completion_stream,
    fault_grpc_completion,
    fault_grpc_chat_stream,
    fault_grpc_task_stream,
    fault_grpc_converse,
    fault_openai_chat_sse,
    fault_openai_chat,
    fault_replicate,
    fault_tasks_stream,
]


async def test_a_failure_inside_one_request_fails_it_alone(
    app: App, c: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await engine_idle(app)
    steps_before = steps(app)
    with failing_rows(monkeypatch, marked(app), after_tokens=2) as failed:
        # Every kind twice, one of them hit by the fault, all at once: they share the engine's steps.
        await asyncio.gather(*(run(c, doomed) for run in FAULTED for doomed in (True, False)))
    assert len(failed) == len(FAULTED)  # each hit request failed once, at its third token
    assert steps(app) > steps_before
    assert await engine_idle(app)
    # The engine goes on as before.
    await fault_grpc_completion_stream(c, doomed=False)
