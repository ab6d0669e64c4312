"""TaskService over the raw stubs against a real server: every RPC, the lifecycle, fork, continue,
templates, subscribers, bad input, and what cancelling a stream does (and does not) stop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import pytest
from rwkvd.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc

from service.app import App
from tests.grpc.conftest import MAX_PROMPT_TOKENS, error_of, slots_free
from tests.support import grpc_target, running_app

if TYPE_CHECKING:  # the async stub class exists in the .pyi only
    from rwkvd.v1.tasks_pb2_grpc import TaskServiceAsyncStub

pytestmark = pytest.mark.asyncio(loop_scope="module")

FINISHED = tasks_pb2.TASK_STATUS_FINISHED


def greedy(max_tokens: int, **more: object) -> common_pb2.SamplingParams:
    """Deterministic and of a known length: greedy, no stop strings, end of text ignored."""
    values: dict[str, object] = {"temperature": 0.0, "ignore_eos": True, **more}
    return common_pb2.SamplingParams(max_tokens=max_tokens, **values)  # type: ignore[arg-type]


def text(value: str) -> common_pb2.Prompt:
    return common_pb2.Prompt(text=value)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> TaskServiceAsyncStub:
    return tasks_pb2_grpc.TaskServiceStub(channel)


async def create(
    stub: TaskServiceAsyncStub,
    prompt: str,
    sampling: common_pb2.SamplingParams,
    kind: tasks_pb2.TaskKind.ValueType = tasks_pb2.TASK_KIND_UNSPECIFIED,
) -> tasks_pb2.Task:
    response = await stub.CreateTask(tasks_pb2.CreateTaskRequest(kind=kind, prompt=text(prompt), sampling=sampling))
    return response.task


async def finished(stub: TaskServiceAsyncStub, task_id: str) -> tasks_pb2.Task:
    """The task once its round has ended (following it to the end)."""
    async for _ in stub.SubscribeTask(tasks_pb2.SubscribeTaskRequest(task_id=task_id)):
        pass
    return (await stub.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task


async def subscribe(
    stub: TaskServiceAsyncStub, task_id: str, from_token: int = 0
) -> list[tasks_pb2.SubscribeTaskResponse]:
    request = tasks_pb2.SubscribeTaskRequest(task_id=task_id, from_token=from_token)
    return [event async for event in stub.SubscribeTask(request)]


def deltas(events: Sequence[tasks_pb2.SubscribeTaskResponse | tasks_pb2.CreateTaskStreamResponse]) -> list[int]:
    return [t for e in events if e.HasField("delta") for t in e.delta.token_ids]


async def test_create_get_status_list(stub: TaskServiceAsyncStub) -> None:
    created = await create(stub, "The quick brown fox", greedy(8, seed=5))
    assert created.task_id.startswith("TMP_")
    assert created.kind == tasks_pb2.TASK_KIND_TEMPORARY
    assert created.status in (tasks_pb2.TASK_STATUS_PREFILL, tasks_pb2.TASK_STATUS_RUNNING, FINISHED)
    task = await finished(stub, created.task_id)
    assert (task.status, task.finished, task.finish_reason) == (FINISHED, True, common_pb2.FINISH_REASON_LENGTH)
    assert task.generated_tokens == task.usage.completion_tokens == 8
    assert task.result
    assert task.usage.total_tokens == task.usage.prompt_tokens + 8
    assert task.timings.prefill_seconds > 0
    assert task.timings.tokens_per_second > 0
    assert (task.sampling.max_tokens, task.sampling.temperature, task.sampling.ignore_eos) == (8, 0.0, True)
    assert task.sampling.top_k == 50  # the task API's (RWKV-Server's) default
    assert task.seed == task.sampling.seed == 5
    assert task.state_tokens == task.usage.prompt_tokens + 8 - 1  # the last token is pending
    assert task.parent_task_id == ""
    assert task.create_time.ToNanoseconds() <= task.update_time.ToNanoseconds()

    status = (await stub.GetTaskStatus(tasks_pb2.GetTaskStatusRequest(task_id=task.task_id))).task
    assert (status.task_id, status.status, status.generated_tokens) == (task.task_id, FINISHED, 8)
    assert status.create_time == task.create_time

    stored = await create(stub, "Hi", greedy(2), kind=tasks_pb2.TASK_KIND_PERSISTENT)
    assert stored.task_id.startswith("TASK_")
    await finished(stub, stored.task_id)
    listing = await stub.ListTasks(tasks_pb2.ListTasksRequest())
    ids = [t.task_id for t in listing.tasks]
    assert {task.task_id, stored.task_id} <= set(ids)
    assert ids == sorted(ids)
    assert listing.total_count == len(ids)
    assert not listing.next_page_token
    assert listing.stored_count >= 1
    assert listing.memory_count >= 2
    only_stored = await stub.ListTasks(tasks_pb2.ListTasksRequest(kind=tasks_pb2.TASK_KIND_PERSISTENT))
    assert stored.task_id in [t.task_id for t in only_stored.tasks]
    assert {t.kind for t in only_stored.tasks} == {tasks_pb2.TASK_KIND_PERSISTENT}

    paged: list[str] = []
    token = ""
    while True:
        page = await stub.ListTasks(tasks_pb2.ListTasksRequest(page_size=1, page_token=token))
        paged += [t.task_id for t in page.tasks]
        token = page.next_page_token
        if not token:
            break
    assert paged == ids


@pytest.mark.parametrize("prompt", ["The weather today is", "今天的天气", "🌍🚀 emoji ✨ and more 🎉"])
async def test_stream_text_is_the_result(stub: TaskServiceAsyncStub, prompt: str) -> None:
    request = tasks_pb2.CreateTaskStreamRequest(prompt=text(prompt), sampling=greedy(16))
    events = [e async for e in stub.CreateTaskStream(request)]
    kinds = [e.WhichOneof("event") for e in events]
    assert (kinds[0], kinds[-1]) == ("started", "finished")
    assert set(kinds[1:-1]) <= {"delta"}
    task_id = events[0].started.task_id
    assert task_id.startswith("TMP_")
    assert events[-1].finished.task_id == task_id
    assert events[0].started.prompt_tokens > 0
    offsets = [e.delta.offset for e in events if e.HasField("delta")]
    sizes = [len(e.delta.token_ids) for e in events if e.HasField("delta")]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
    task = (await stub.GetTask(tasks_pb2.GetTaskRequest(task_id=task_id))).task
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == task.result
    assert len(deltas(events)) == task.generated_tokens == events[-1].finished.usage.completion_tokens == 16
    # The same prompt, greedy, gives the same text again (the stream is the task, not a copy).
    again = await finished(stub, (await create(stub, prompt, greedy(16))).task_id)
    assert again.result == task.result


async def test_fim_task(stub: TaskServiceAsyncStub) -> None:
    request = tasks_pb2.CreateTaskRequest(
        fim=tasks_pb2.FillInTheMiddle(prefix="def add(a, b):\n", suffix="\n    return c\n"), sampling=greedy(6)
    )
    task = await finished(stub, (await stub.CreateTask(request)).task.task_id)
    assert task.finished
    assert "✿" not in task.result
    assert "✿" in task.sampling.stop  # the middle ends where the model would open another section


async def test_two_subscribers_from_an_offset(stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "Once upon a time", greedy(24))
    first, second = await asyncio.gather(subscribe(stub, task.task_id, 5), subscribe(stub, task.task_id, 5))
    whole = await subscribe(stub, task.task_id)  # after the end: a replay from the start
    for events in (first, second):
        assert events[0].HasField("started")
        assert events[-1].HasField("finished")
        assert next(e for e in events if e.HasField("delta")).delta.offset == 5
        assert deltas(events) == deltas(whole)[5:]
        assert events[-1].finished.usage.completion_tokens == 24
    assert len(deltas(whole)) == 24
    assert "".join(e.delta.text for e in whole if e.HasField("delta")) == (await finished(stub, task.task_id)).result


async def test_stop_and_delete(app: App, stub: TaskServiceAsyncStub) -> None:
    task = await create(stub, "Count:", greedy(5000))
    async for event in stub.SubscribeTask(tasks_pb2.SubscribeTaskRequest(task_id=task.task_id)):
        if event.HasField("delta"):
            break
    stopped = (await stub.StopTask(tasks_pb2.StopTaskRequest(task_id=task.task_id))).task
    assert stopped.status == FINISHED
    after = (await stub.GetTask(tasks_pb2.GetTaskRequest(task_id=task.task_id))).task
    assert after.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert 0 < after.generated_tokens < 5000
    assert await slots_free(app)
    # A stopped task keeps its state: it can go on.
    resumed = (await stub.ContinueTask(tasks_pb2.ContinueTaskRequest(task_id=task.task_id, sampling=greedy(3)))).task
    assert resumed.task_id == task.task_id
    assert (await finished(stub, task.task_id)).generated_tokens == after.generated_tokens + 3

    deleted = await stub.DeleteTask(tasks_pb2.DeleteTaskRequest(task_id=task.task_id))
    assert deleted.task_id == task.task_id
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stub.GetTask(tasks_pb2.GetTaskRequest(task_id=task.task_id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_of(gone.value)[0] == "TASK_NOT_FOUND"

    running = await create(stub, "More:", greedy(5000), kind=tasks_pb2.TASK_KIND_PERSISTENT)
    await stub.DeleteTask(tasks_pb2.DeleteTaskRequest(task_id=running.task_id))  # a running task is stopped
    assert await slots_free(app)


async def test_fork_a_running_task_and_a_template(app: App, stub: TaskServiceAsyncStub) -> None:
    source = await create(stub, "Long ago", greedy(5000))
    fork = (await stub.ForkTask(tasks_pb2.ForkTaskRequest(task_id=source.task_id, sampling=greedy(4)))).task
    assert fork.task_id.startswith("TASK_")
    assert fork.kind == tasks_pb2.TASK_KIND_PERSISTENT
    assert fork.parent_task_id == source.task_id
    forked = await finished(stub, fork.task_id)
    assert forked.usage.completion_tokens == 4  # 4 more after the tokens copied with the state
    fork_tokens = deltas(await subscribe(stub, fork.task_id))
    assert len(fork_tokens) == forked.generated_tokens > 4
    source_tokens: list[int] = []
    async for event in stub.SubscribeTask(tasks_pb2.SubscribeTaskRequest(task_id=source.task_id)):
        source_tokens += event.delta.token_ids
        if len(source_tokens) >= len(fork_tokens):
            break
    assert fork_tokens == source_tokens[: len(fork_tokens)]  # greedy: the copy goes on as its source does
    source_now = (await stub.GetTask(tasks_pb2.GetTaskRequest(task_id=source.task_id))).task
    assert source_now.status != FINISHED  # the source runs on, untouched
    await stub.StopTask(tasks_pb2.StopTaskRequest(task_id=source.task_id))

    base = await finished(stub, (await create(stub, "System: be brief.\n\n", greedy(0))).task_id)
    assert (base.generated_tokens, base.finish_reason) == (0, common_pb2.FINISH_REASON_LENGTH)  # prefill only
    template = (await stub.SaveTaskAsTemplate(tasks_pb2.SaveTaskAsTemplateRequest(task_id=base.task_id))).task
    assert template.task_id.startswith("_TMPL_")
    assert template.kind == tasks_pb2.TASK_KIND_TEMPLATE
    assert (template.parent_task_id, template.state_tokens) == (base.task_id, base.state_tokens)

    results = []
    for _ in range(2):  # prefill once, fork forever: the same state gives the same text
        request = tasks_pb2.ForkTaskRequest(
            task_id=template.task_id,
            prompt=text("User: hi\n\nAssistant:"),
            sampling=greedy(6),
            kind=tasks_pb2.TASK_KIND_TEMPORARY,
        )
        child = (await stub.ForkTask(request)).task
        assert child.task_id.startswith("TMP_")
        assert child.parent_task_id == template.task_id
        results.append((await finished(stub, child.task_id)).result)
    assert results[0] == results[1]
    assert results[0]

    # Templates are read-only.
    for call, code in (
        (stub.ContinueTask(tasks_pb2.ContinueTaskRequest(task_id=template.task_id)), "PERMISSION_DENIED"),
        (stub.DeleteTask(tasks_pb2.DeleteTaskRequest(task_id=template.task_id)), "PERMISSION_DENIED"),
        (stub.SaveTaskAsTemplate(tasks_pb2.SaveTaskAsTemplateRequest(task_id=template.task_id)), "INVALID_ARGUMENT"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code().name == code
    untouched = (await stub.GetTask(tasks_pb2.GetTaskRequest(task_id=template.task_id))).task
    assert (untouched.generated_tokens, untouched.state_tokens) == (0, template.state_tokens)
    await stub.DeleteTask(tasks_pb2.DeleteTaskRequest(task_id=template.task_id, force=True))
    assert await slots_free(app)


async def test_continue_with_and_without_prompt(stub: TaskServiceAsyncStub) -> None:
    task = await finished(stub, (await create(stub, "In the beginning", greedy(6))).task_id)
    request = tasks_pb2.ContinueTaskRequest(task_id=task.task_id, sampling=common_pb2.SamplingParams(max_tokens=5))
    await stub.ContinueTask(request)
    resumed = await finished(stub, task.task_id)
    assert resumed.generated_tokens == 11
    assert resumed.result.startswith(task.result)
    assert len(resumed.result) > len(task.result)
    whole = await finished(stub, (await create(stub, "In the beginning", greedy(11))).task_id)
    assert resumed.result == whole.result  # resuming is exactly one longer generation

    request = tasks_pb2.ContinueTaskRequest(task_id=task.task_id, prompt=text("\n\nUser: and then?"))
    new_round = (await stub.ContinueTask(request)).task
    assert new_round.task_id == task.task_id
    assert new_round.generated_tokens == 0
    with pytest.raises(grpc.aio.AioRpcError) as busy:  # still running (5 tokens from the sampling in effect)
        await stub.ContinueTask(tasks_pb2.ContinueTaskRequest(task_id=task.task_id))
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_of(busy.value)[0] == "TASK_RUNNING"
    ended = await finished(stub, task.task_id)
    assert ended.generated_tokens == 5
    assert not ended.result.startswith(resumed.result)


async def test_cancelling_a_stream_does_not_stop_the_task(app: App, stub: TaskServiceAsyncStub) -> None:
    call = stub.CreateTaskStream(tasks_pb2.CreateTaskStreamRequest(prompt=text("Go on:"), sampling=greedy(64)))
    task_id = ""
    async for event in call:
        if event.HasField("started"):
            task_id = event.started.task_id
        if event.HasField("delta"):
            break
    call.cancel()
    watcher = stub.SubscribeTask(tasks_pb2.SubscribeTaskRequest(task_id=task_id))
    async for update in watcher:
        if update.HasField("delta"):
            break
    watcher.cancel()
    task = await finished(stub, task_id)
    # Ran to its length: neither cancelled stream stopped it (that would read FINISH_REASON_CANCELLED).
    assert (task.finish_reason, task.generated_tokens) == (common_pb2.FINISH_REASON_LENGTH, 64)
    assert await slots_free(app)


async def test_bad_input(stub: TaskServiceAsyncStub) -> None:
    cases: list[tuple[object, grpc.StatusCode, str, list[str]]] = [
        (stub.GetTask(tasks_pb2.GetTaskRequest(task_id="TMP_0123")), grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND", []),
        (stub.GetTask(tasks_pb2.GetTaskRequest(task_id="TASK_nope")), grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND", []),
        (stub.CreateTask(tasks_pb2.CreateTaskRequest()), grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD", ["prompt"]),
        (
            stub.CreateTask(tasks_pb2.CreateTaskRequest(prompt=text("x"), sampling=greedy(4, temperature=9.0))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            ["sampling.temperature"],
        ),
        (
            stub.CreateTask(tasks_pb2.CreateTaskRequest(prompt=text("x"), kind=tasks_pb2.TASK_KIND_TEMPLATE)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            ["kind"],
        ),
        (
            stub.CreateTask(tasks_pb2.CreateTaskRequest(prompt=text("x " * MAX_PROMPT_TOKENS))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PROMPT_TOO_LONG",
            ["prompt"],
        ),
        (
            stub.CreateTask(
                tasks_pb2.CreateTaskRequest(prompt=common_pb2.Prompt(tokens=common_pb2.TokenIds(ids=[1 << 20])))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_TOKEN",
            ["prompt"],
        ),
        (
            stub.ListTasks(tasks_pb2.ListTasksRequest(page_token="%%%")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            ["page_token"],
        ),
        (stub.StopTask(tasks_pb2.StopTaskRequest(task_id="TMP_x")), grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND", []),
        (stub.ForkTask(tasks_pb2.ForkTaskRequest(task_id="TMP_x")), grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND", []),
    ]
    for call, code, reason, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call  # type: ignore[misc]
        assert err.value.code() == code, err.value.details()
        got_reason, got_fields, resource = error_of(err.value)
        assert (got_reason, got_fields) == (reason, fields), err.value.details()
        if code == grpc.StatusCode.NOT_FOUND:
            assert resource is not None
            assert resource[0] == "task"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.SubscribeTask(tasks_pb2.SubscribeTaskRequest(task_id="TMP_x")):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    source = await create(stub, "x", greedy(1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ForkTask(tasks_pb2.ForkTaskRequest(task_id=source.task_id, kind=tasks_pb2.TASK_KIND_TEMPLATE))
    assert error_of(err.value)[1] == ["kind"]


async def test_an_evicted_temporary_task_says_so() -> None:
    async with running_app(max_temporary_tasks=1) as app, grpc.aio.insecure_channel(grpc_target(app)) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        first = await finished(stub, (await create(stub, "a", greedy(1))).task_id)
        await finished(stub, (await create(stub, "b", greedy(1))).task_id)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetTask(tasks_pb2.GetTaskRequest(task_id=first.task_id))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_of(err.value)[0] == "TASK_EVICTED"
