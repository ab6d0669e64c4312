"""Load on the real server (CPU, demo model): 500 concurrent streams mixed over gRPC and HTTP.

Over 300 of them follow tasks (gRPC CreateTaskStream and SubscribeTask, HTTP /v1/tasks create streams and
GET .../stream), and each one's text must equal its task's final result; the others are gRPC completion and
chat streams, OpenAI chat SSE and Replicate prediction streams. Every gRPC stream's deltas must be contiguous
from offset 0 (no token lost or repeated) and count exactly usage.completion_tokens. After the tasks are
deleted, a second identical burst leaves memory where it found it (object census, Python heap), as
tests/test_load.py measures it.
"""

from __future__ import annotations

import asyncio
import gc
import random
import tracemalloc
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import openai
from rwkvd.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    common_pb2,
    completions_pb2,
    completions_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)

from service.app import App
from service.domain.task_state import Round, Task
from tests.reliability_support import contiguous_tokens, engine_idle, over_sse, parse_sse
from tests.support import grpc_target, http_base, running_app
from tests.test_load import census

if TYPE_CHECKING:  # the async stub classes exist in the .pyi only
    from rwkvd.v1.chat_pb2_grpc import ChatServiceAsyncStub
    from rwkvd.v1.completions_pb2_grpc import CompletionServiceAsyncStub
    from rwkvd.v1.tasks_pb2_grpc import TaskServiceAsyncStub

MAX_TOKENS = 6
PROMPTS = [f"Load {i}: what comes after {i}?" for i in range(10)]
# How many streams of each kind one burst opens (500 in all; the first four, 300, follow tasks).
MIX = {
    "grpc_task_stream": 100,
    "grpc_task_subscribe": 75,
    "http_task_stream": 100,
    "http_task_subscribe": 25,
    "grpc_completion_stream": 50,
    "grpc_chat_stream": 50,
    "openai_chat_sse": 50,
    "replicate_stream": 50,
}
TASK_KINDS = {"grpc_task_stream", "grpc_task_subscribe", "http_task_stream", "http_task_subscribe"}
GREEDY_TASK: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0, "top_k": -1, "top_p": 1}


def greedy() -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@dataclass
class Outcome:
    kind: str
    text: str
    task_id: str | None = None
    tokens: int | None = None  # generated tokens the stream showed (gRPC streams)


@dataclass
class Clients:
    app: App
    tasks: TaskServiceAsyncStub
    completions: CompletionServiceAsyncStub
    chat: ChatServiceAsyncStub
    http: httpx.AsyncClient
    sdk: openai.AsyncOpenAI


# ---- one stream of each kind ----------------------------------------------------------------------------


async def grpc_task_events(
    events: Any,
) -> Outcome:
    """A TaskService stream (create or subscribe): started, contiguous deltas, finished."""
    started: tasks_pb2.TaskStarted | None = None
    finished: tasks_pb2.TaskFinished | None = None
    deltas: list[common_pb2.GenerationDelta] = []
    async for event in events:
        which = event.WhichOneof("event")
        assert finished is None, "an event after finished"
        if which == "started":
            assert started is None, "started twice"
            assert not deltas, "started after a delta"
            started = event.started
        elif which == "delta":
            deltas.append(event.delta)
        else:
            finished = event.finished
    assert started is not None
    assert finished is not None
    tokens = contiguous_tokens(deltas)
    assert len(tokens) == finished.usage.completion_tokens
    assert finished.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP_SEQUENCE)
    assert finished.task_id == started.task_id
    return Outcome("", "".join(d.text for d in deltas), started.task_id, len(tokens))


async def grpc_task_stream(c: Clients, prompt: str) -> Outcome:
    request = tasks_pb2.CreateTaskStreamRequest(prompt=common_pb2.Prompt(text=prompt), sampling=greedy())
    return await grpc_task_events(c.tasks.CreateTaskStream(request))


async def grpc_task_subscribe(c: Clients, prompt: str) -> Outcome:
    created = await c.tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(prompt=common_pb2.Prompt(text=prompt), sampling=greedy())
    )
    subscribe = tasks_pb2.SubscribeTaskRequest(task_id=created.task.task_id)
    outcome = await grpc_task_events(c.tasks.SubscribeTask(subscribe))
    assert outcome.task_id == created.task.task_id
    return outcome


async def http_task_events(response: httpx.Response) -> tuple[str | None, str]:
    """An HTTP task stream: the id event, text events, [DONE]; (task id, text)."""
    assert response.status_code == 200, await response.aread()
    events = parse_sse(await response.aread())
    assert events[-1].data == "[DONE]"
    task_id: str | None = None
    text: list[str] = []
    for event in events[:-1]:
        body = event.json()
        assert "error" not in body, body
        if "prefill_time" in body:
            task_id = body["task_id"]
        else:
            text.append(body["data"])
    return task_id, "".join(text)


async def http_task_stream(c: Clients, prompt: str) -> Outcome:
    body = {"prompt": prompt, "stream": True, **GREEDY_TASK}
    async with c.http.stream("POST", "/v1/tasks/tmp", json=body) as response:
        task_id, text = await http_task_events(response)
    assert task_id is not None
    return Outcome("", text, task_id)


async def http_task_subscribe(c: Clients, prompt: str) -> Outcome:
    created = (await c.http.post("/v1/tasks/tmp", json={"prompt": prompt, **GREEDY_TASK})).json()
    async with c.http.stream("GET", f"/v1/tasks/{created['task_id']}/stream") as response:
        task_id, text = await http_task_events(response)
    assert task_id == created["task_id"]
    return Outcome("", text, task_id)


async def grpc_completion_stream(c: Clients, prompt: str) -> Outcome:
    request = completions_pb2.CreateCompletionStreamRequest(prompt=common_pb2.Prompt(text=prompt), sampling=greedy())
    kinds: list[str] = []
    deltas: list[common_pb2.GenerationDelta] = []
    finished: completions_pb2.CompletionFinished | None = None
    async for event in c.completions.CreateCompletionStream(request):
        which = event.WhichOneof("event")
        kinds.append(which)
        if which == "delta":
            deltas.append(event.delta)
        elif which == "finished":
            finished = event.finished
    assert kinds[0] == "started"
    assert kinds[-1] == "finished"
    assert kinds.count("finished") == 1
    assert finished is not None
    tokens = contiguous_tokens(deltas)
    assert len(tokens) == finished.usage.completion_tokens == MAX_TOKENS  # ignore_eos, no stop strings
    assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    return Outcome("", "".join(d.text for d in deltas), tokens=len(tokens))


async def grpc_chat_stream(c: Clients, prompt: str) -> Outcome:
    request = chat_pb2.CompleteStreamRequest(
        messages=[chat_pb2.ChatMessage(role=chat_pb2.CHAT_ROLE_USER, content=prompt)], sampling=greedy()
    )
    deltas: list[common_pb2.GenerationDelta] = []
    usage: common_pb2.Usage | None = None
    ends = 0
    async for message in c.chat.CompleteStream(request):
        assert usage is None, "a message after the one with usage"
        for choice in message.choices:
            assert choice.index == 0
            if choice.finish_reason:
                ends += 1
                assert choice.delta.offset == len(contiguous_tokens(deltas))
                assert not choice.delta.token_ids
            else:
                deltas.append(choice.delta)
        if message.HasField("usage"):
            usage = message.usage
    assert usage is not None
    assert ends == 1
    tokens = contiguous_tokens(deltas)
    assert len(tokens) == usage.completion_tokens
    return Outcome("", "".join(d.text for d in deltas), tokens=len(tokens))


async def openai_chat_sse(c: Clients, prompt: str) -> Outcome:
    stream = await c.sdk.chat.completions.create(
        model="local/rwkv7-demo",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text: list[str] = []
    finish: list[str] = []
    usage = None
    async for chunk in stream:
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            if choice.finish_reason:
                finish.append(choice.finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(finish) == 1
    assert finish[0] in ("length", "stop")
    assert usage is not None
    assert 0 < usage.completion_tokens <= MAX_TOKENS
    return Outcome("", "".join(text))


async def replicate_stream(c: Clients, prompt: str) -> Outcome:
    created = await c.http.post(
        "/v1/predictions",
        json={"model": "local/rwkv7-demo", "input": {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}},
    )
    assert created.status_code == 201, created.text
    prediction = created.json()
    async with c.http.stream("GET", prediction["urls"]["stream"]) as response:
        assert response.status_code == 200
        events = parse_sse(await response.aread())
    names = [e.name for e in events]
    assert names[-1] == "done", names
    assert names.count("done") == 1, names
    assert set(names) == {"output", "done"}, names
    ids = [int(e.id or 0) for e in events]
    assert ids == sorted(set(ids)), "event ids repeat or go back"
    text = "".join(e.data for e in events if e.name == "output")
    final = (await c.http.get(f"/v1/predictions/{prediction['id']}")).json()
    assert final["status"] == "succeeded"
    assert text == over_sse("".join(final["output"]))
    return Outcome("", text)


KINDS: dict[str, Callable[[Clients, str], Awaitable[Outcome]]] = {
    "grpc_task_stream": grpc_task_stream,
    "grpc_task_subscribe": grpc_task_subscribe,
    "http_task_stream": http_task_stream,
    "http_task_subscribe": http_task_subscribe,
    "grpc_completion_stream": grpc_completion_stream,
    "grpc_chat_stream": grpc_chat_stream,
    "openai_chat_sse": openai_chat_sse,
    "replicate_stream": replicate_stream,
}


# ---- the burst ------------------------------------------------------------------------------------------


async def burst(c: Clients, seed: int) -> list[Outcome]:
    """Every stream of MIX at once, in a shuffled order (the same order for the same seed)."""
    jobs = [kind for kind, count in MIX.items() for _ in range(count)]
    random.Random(seed).shuffle(jobs)

    async def one(i: int, kind: str) -> Outcome:
        outcome = await KINDS[kind](c, PROMPTS[i % len(PROMPTS)])
        outcome.kind = kind
        return outcome

    return list(await asyncio.gather(*(one(i, kind) for i, kind in enumerate(jobs))))


async def check_tasks(c: Clients, outcomes: list[Outcome]) -> None:
    """Every task stream's text is its task's final result, read back over both APIs."""
    task_outcomes = [o for o in outcomes if o.kind in TASK_KINDS]
    assert len(task_outcomes) >= len(outcomes) // 2
    assert len({o.task_id for o in task_outcomes}) == len(task_outcomes), "two streams showed the same task"

    async def check(o: Outcome) -> None:
        assert o.task_id is not None
        task = (await c.tasks.GetTask(tasks_pb2.GetTaskRequest(task_id=o.task_id))).task
        assert task.finished
        assert o.text == task.result, (o.kind, o.task_id)
        assert task.generated_tokens == task.usage.completion_tokens
        if o.tokens is not None:
            assert o.tokens == task.generated_tokens
        result = (await c.http.get(f"/v1/tasks/{o.task_id}/get_result")).json()
        assert result["finished"]
        assert result["result"] == o.text

    await asyncio.gather(*(check(o) for o in task_outcomes))


async def delete_tasks(c: Clients, outcomes: list[Outcome]) -> None:
    """Tasks keep their state by design: deleting them is what gives the memory back."""
    ids = [o.task_id for o in outcomes if o.task_id is not None]
    await asyncio.gather(*(c.tasks.DeleteTask(tasks_pb2.DeleteTaskRequest(task_id=i)) for i in ids))


def task_census() -> dict[str, int]:
    """Engine objects (tests/test_load.py's census) plus the domain's tasks and rounds."""
    with warnings.catch_warnings():  # isinstance() on some torch objects warns about deprecated aliases
        warnings.simplefilter("ignore", FutureWarning)
        counts = census()
        counts.update(Task=0, Round=0)
        for obj in gc.get_objects():
            if isinstance(obj, Task):
                counts["Task"] += 1
            elif isinstance(obj, Round):
                counts["Round"] += 1
    return counts


async def checked_burst(app: App, channel: grpc.aio.Channel, seed: int) -> Counter[str]:
    """One burst on HTTP clients of its own, checked, its tasks deleted and the clients closed: what it leaves
    behind is the server's alone. The kinds of stream it ran."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with (
        httpx.AsyncClient(base_url=http_base(app), timeout=120, limits=limits) as http,
        openai.AsyncOpenAI(base_url=http_base(app) + "/v1", api_key="x", max_retries=0, timeout=120) as sdk,
    ):
        c = Clients(
            app,
            tasks_pb2_grpc.TaskServiceStub(channel),
            completions_pb2_grpc.CompletionServiceStub(channel),
            chat_pb2_grpc.ChatServiceStub(channel),
            http,
            sdk,
        )
        outcomes = await burst(c, seed)
        await check_tasks(c, outcomes)
        await delete_tasks(c, outcomes)
    # The server drops a closed connection's objects when it reads the end of its socket, a few loop turns
    # after the close: there is nothing to wait on from here, so give it a moment.
    await asyncio.sleep(0.5)
    assert await engine_idle(app)
    return Counter(o.kind for o in outcomes)


async def test_500_mixed_concurrent_streams_match_their_results_and_memory_returns() -> None:
    settings = {
        "engine.max_batch_size": 64,
        "engine.max_queued": 1024,
        "engine.threads": 1,
        "max_temporary_tasks": 4096,  # no task of the test is evicted before it is checked
    }
    async with running_app(**settings) as app, grpc.aio.insecure_channel(grpc_target(app)) as channel:
        # The first burst is checked too, and warms pools and caches to their working size.
        assert await checked_burst(app, channel, seed=1) == Counter(MIX)

        gc.collect()
        census_before = task_census()
        tracemalloc.start()
        heap_before = tracemalloc.get_traced_memory()[0]

        assert await checked_burst(app, channel, seed=2) == Counter(MIX)
        assert sum(MIX.values()) == 500

        gc.collect()
        heap_grown = tracemalloc.get_traced_memory()[0] - heap_before
        tracemalloc.stop()
        # Nothing of the second burst is alive: as many engine sequences, event streams, saved states, RNN
        # states, tasks and rounds as before it.
        assert task_census() == census_before
        print("HEAP", heap_grown / 2**20)
        # Predictions stay in memory by design (the manager keeps the last 1000, ~3 KiB each here); nothing
        # else of the burst may stay.
        assert heap_grown < 1 * 2**20, f"Python heap grew by {heap_grown / 2**20:.2f} MiB"
