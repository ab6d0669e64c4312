"""The Task API through the unmodified rwkv-api SDK (sync Client in a worker thread, and AsyncClient).

One server for the module (demo model: random weights, so greedy decoding and short budgets).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
import pytest_asyncio
import rwkv_api  # type: ignore[import-untyped]
from rwkv_api import AsyncClient, Client, RWKVError, RWKVValidationError, Status, TaskNotFoundError

from service.app import App
from tests.support import http_base, running_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

T = TypeVar("T")
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 16}
POLL = 0.02  # the SDK's default poll interval is 0.5 s


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[App]:
    async with running_app(**{"engine.threads": 1}) as running:  # torch's spinning workers slow a busy CPU
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def aclient(app: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(base_url=http_base(app)) as client:
        yield client


async def in_thread(app: App, fn: Callable[[Client], T]) -> T:
    """Runs a sync-SDK call off the event loop (the server runs in this test's loop)."""

    def run() -> T:
        with Client(base_url=http_base(app)) as client:
            return fn(client)

    return await asyncio.to_thread(run)


async def collect(chunks: AsyncIterator[str]) -> str:
    return "".join([chunk async for chunk in chunks])


# Create and wait


async def test_sync_create_tmp_and_persistent(app: App) -> None:
    def run(client: Client) -> tuple[rwkv_api.Task, rwkv_api.Task]:
        tmp = client.create("Hello", **GREEDY)
        persistent = client.create("Hello", persistent=True, seed=42, **GREEDY)
        assert isinstance(tmp, rwkv_api.Task)
        assert isinstance(persistent, rwkv_api.Task)
        return tmp.wait(poll_interval=POLL, timeout=30), persistent.wait(poll_interval=POLL, timeout=30)

    tmp, persistent = await in_thread(app, run)
    assert tmp.task_id.startswith("TMP_")
    assert persistent.task_id.startswith("TASK_")
    for task in (tmp, persistent):
        assert task.finished
        assert task.result
        assert task.speed > 0
        assert task.gen_time >= 0
        assert task.prefill_time > 0
    assert tmp.result == persistent.result  # greedy: the seed does not matter


async def test_async_create_returns_an_acknowledgement_then_wait_polls(aclient: AsyncClient) -> None:
    task = await aclient.create("Hello", **GREEDY)
    assert isinstance(task, rwkv_api.AsyncTask)
    assert task.task_id.startswith("TMP_")
    done = await task.wait(poll_interval=POLL, timeout=30)
    assert done.finished
    assert done.result
    assert done.speed > 0


async def test_create_persistent_async(aclient: AsyncClient) -> None:
    task = await aclient.create_persistent("Hello", **GREEDY)
    assert isinstance(task, rwkv_api.AsyncTask)
    assert task.task_id.startswith("TASK_")


async def test_max_tokens_zero_finishes_with_no_text(aclient: AsyncClient) -> None:
    task = await aclient.create("A template prompt", max_tokens=0)
    assert isinstance(task, rwkv_api.AsyncTask)
    await task.wait(poll_interval=POLL, timeout=30)
    assert task.finished
    assert task.result == ""
    info = await aclient.get_task_status(task.task_id)
    assert info.status == Status.FINISHED
    assert info.generated_buf == 0


# Streams


@pytest.mark.parametrize("prompt", ["The quick brown fox", "你好，世界！今天天气很好。", "🙂🚀✨ emoji 🎉"])
async def test_create_stream_matches_the_greedy_result(aclient: AsyncClient, prompt: str) -> None:
    streamed = await collect(aclient.create_stream(prompt, **GREEDY))
    task = await aclient.create(prompt, **GREEDY)
    assert isinstance(task, rwkv_api.AsyncTask)
    await task.wait(poll_interval=POLL, timeout=30)
    assert streamed == task.result
    assert streamed


async def test_sync_create_stream_yields_chunks(app: App) -> None:
    chunks = await in_thread(app, lambda c: list(c.create_stream("def hello():\n    ", max_tokens=10, temperature=0)))
    assert any(chunk.strip() for chunk in chunks)


async def test_sync_create_with_stream_true_is_an_iterator(app: App) -> None:
    def run(client: Client) -> str:
        stream = client.create("Hello", stream=True, persistent=True, **GREEDY)
        assert not isinstance(stream, rwkv_api.Task)
        return "".join(stream)

    assert await in_thread(app, run)


async def test_sync_task_stream_replays_a_finished_task(app: App) -> None:
    def run(client: Client) -> tuple[str, str]:
        task = client.create("Hello", **GREEDY)
        assert isinstance(task, rwkv_api.Task)
        task.wait(poll_interval=POLL, timeout=30)
        return task.result, "".join(task.stream())

    result, streamed = await in_thread(app, run)
    assert streamed == result


async def test_stream_task_from_a_token_offset(app: App, aclient: AsyncClient) -> None:
    task = await aclient.create("Hello", **GREEDY)
    assert isinstance(task, rwkv_api.AsyncTask)
    await task.wait(poll_interval=POLL, timeout=30)
    assert app.tasks is not None
    chunks = (await app.tasks.get(task.task_id)).round.chunks
    for pos in (0, 1, 5, chunks[-1][0]):
        expected = "".join(text for end, text in chunks if end > pos)
        assert await collect(aclient.stream_task(task.task_id, pos=pos)) == expected
        assert await collect(task.stream(pos=pos)) == expected
    sync = await in_thread(app, lambda c: "".join(c.stream_task(task.task_id, pos=3)))
    assert sync == "".join(text for end, text in chunks if end > 3)


async def test_live_subscribers_all_get_the_whole_result(aclient: AsyncClient) -> None:
    task = await aclient.create("Hello", temperature=0, max_tokens=64)
    assert isinstance(task, rwkv_api.AsyncTask)
    streams = await asyncio.gather(*(collect(aclient.stream_task(task.task_id)) for _ in range(3)))
    await task.wait(poll_interval=POLL, timeout=30)
    assert streams == [task.result] * 3


async def test_fim_and_fim_stream(app: App, aclient: AsyncClient) -> None:
    task = await aclient.fim("def add(a, b):\n    ", "\n    return c\n", **GREEDY)
    assert isinstance(task, rwkv_api.AsyncTask)
    assert task.task_id.startswith("TMP_")
    await task.wait(poll_interval=POLL, timeout=30)
    assert isinstance(task.result, str)
    assert "✿" not in task.result
    streamed = await collect(aclient.fim_stream("def add(a, b):\n    ", "\n    return c\n", **GREEDY))
    assert streamed == task.result
    sync = await in_thread(app, lambda c: "".join(c.fim_stream("x = ", "", max_tokens=8, temperature=0)))
    assert "✿" not in sync


async def test_sync_fim_wait(app: App) -> None:
    def run(client: Client) -> rwkv_api.Task:
        task = client.fim("Once upon", " happily ever after.", max_tokens=8, temperature=0)
        assert isinstance(task, rwkv_api.Task)
        return task.wait(poll_interval=POLL, timeout=30)

    task = await in_thread(app, run)
    assert task.finished
    assert "✿" not in task.result


# Fork, continue, templates


async def test_fork_right_after_create_while_it_runs(aclient: AsyncClient) -> None:
    task = await aclient.create("Hello", temperature=0, max_tokens=64)
    assert isinstance(task, rwkv_api.AsyncTask)
    forked = await task.fork(max_tokens=8)
    assert forked.task_id != task.task_id
    assert forked.task_id.startswith("TASK_")
    await forked.wait(poll_interval=POLL, timeout=30)
    await task.wait(poll_interval=POLL, timeout=30)
    assert forked.finished


async def test_fork_with_a_prompt_leaves_the_source_alone(app: App) -> None:
    def run(client: Client) -> tuple[str, str, str, str]:
        task = client.create("Hello", **GREEDY)
        assert isinstance(task, rwkv_api.Task)
        before = task.wait(poll_interval=POLL, timeout=30).result
        forked = task.fork(prompt=" World", seed=1, max_tokens=5).wait(poll_interval=POLL, timeout=30)
        after = client.get_task_result(task.task_id).result
        return before, after, forked.result, forked.task_id

    before, after, forked_result, forked_id = await in_thread(app, run)
    assert after == before
    assert forked_id.startswith("TASK_")
    assert forked_result != before


async def test_continue_with_a_prompt_starts_a_new_round(aclient: AsyncClient) -> None:
    task = await aclient.create("Hello", **GREEDY)
    assert isinstance(task, rwkv_api.AsyncTask)
    await task.wait(poll_interval=POLL, timeout=30)
    assert (await task.async_status()).generated_buf == 16
    again = await task.continue_(prompt="\n\nUser: more\n\nAssistant:", max_tokens=4)
    assert again.task_id == task.task_id
    await again.wait(poll_interval=POLL, timeout=30)
    info = await again.async_status()
    assert info.status == Status.FINISHED
    assert 1 <= info.generated_buf <= 4  # this round only
    assert again.result != task.result


async def test_continue_without_a_prompt_resumes_and_the_result_grows(app: App) -> None:
    def run(client: Client) -> tuple[str, str, str]:
        task = client.create("Hello", **GREEDY)
        assert isinstance(task, rwkv_api.Task)
        first = task.wait(poll_interval=POLL, timeout=30).result
        same = task.continue_(max_tokens=8)
        return first, same.task_id, same.wait(poll_interval=POLL, timeout=30).result

    first, same_id, grown = await in_thread(app, run)
    assert same_id.startswith("TMP_")
    assert grown.startswith(first)
    assert len(grown) > len(first)


async def test_continue_of_a_running_task_is_a_conflict(aclient: AsyncClient) -> None:
    task = await aclient.create("Hello", temperature=0, max_tokens=4000)
    assert isinstance(task, rwkv_api.AsyncTask)
    with pytest.raises(RWKVError) as caught:
        await task.continue_(max_tokens=4)
    assert caught.value.status_code == 409
    await task.stop()


async def test_templates(app: App) -> None:
    def run(client: Client) -> None:
        task = client.create("System: be brief.", **GREEDY)
        assert isinstance(task, rwkv_api.Task)
        forked = task.fork().wait(poll_interval=POLL, timeout=30)
        assert forked.task_id.startswith("TASK_")
        template = forked.as_template()
        assert template.task_id.startswith("_TMPL_")
        assert template.result == ""
        child = template.fork(prompt="\n\nUser: hi\n\nAssistant:", max_tokens=4)
        assert child.task_id.startswith("TASK_")
        assert child.wait(poll_interval=POLL, timeout=30).finished
        with pytest.raises(RWKVError) as caught:
            template.continue_(max_tokens=4)
        assert caught.value.status_code == 403
        with pytest.raises(RWKVError) as caught:
            template.as_template()
        assert caught.value.status_code == 400
        with pytest.raises(RWKVError) as caught:
            template.delete()
        assert caught.value.status_code == 403
        template.delete(force=True)
        with pytest.raises(TaskNotFoundError):
            client.get_task_status(template.task_id)

    await in_thread(app, run)


# Stop, delete, list, status, errors


async def test_stop_then_delete(app: App) -> None:
    def run(client: Client) -> None:
        task = client.create("Hello", temperature=0, max_tokens=4000)
        assert isinstance(task, rwkv_api.Task)
        task.stop()
        assert task.wait(poll_interval=POLL, timeout=30).finished
        assert client.get_task_status(task.task_id).generated_buf < 4000
        task.delete()
        with pytest.raises(TaskNotFoundError):
            client.get_task_result(task.task_id)

    await in_thread(app, run)


async def test_delete_of_a_running_task(aclient: AsyncClient) -> None:
    task = await aclient.create("Hello", temperature=0, max_tokens=4000)
    assert isinstance(task, rwkv_api.AsyncTask)
    await task.delete()
    with pytest.raises(TaskNotFoundError):
        await task.async_status()


async def test_list_tasks(aclient: AsyncClient) -> None:
    tmp = await aclient.create("Hello", max_tokens=0)
    stored = await aclient.create_persistent("Hello", max_tokens=0)
    assert isinstance(tmp, rwkv_api.AsyncTask)
    assert isinstance(stored, rwkv_api.AsyncTask)
    listing = await aclient.list_tasks()
    assert set(listing) == {"cpu_cache_count", "database_count", "total_count", "cpu_tasks", "db_tasks"}
    assert isinstance(listing["total_count"], int)
    assert {tmp.task_id, stored.task_id} <= set(listing["cpu_tasks"])
    assert stored.task_id in listing["db_tasks"]
    assert not any(i.startswith("TMP_") for i in listing["db_tasks"])
    assert listing["cpu_cache_count"] == len(listing["cpu_tasks"])
    assert listing["total_count"] >= listing["cpu_cache_count"]


async def test_get_task_status(app: App) -> None:
    def run(client: Client) -> None:
        task = client.create("Hello", **GREEDY)
        assert isinstance(task, rwkv_api.Task)
        assert task.status in set(Status)
        task.wait(poll_interval=POLL, timeout=30)
        info = client.get_task_status(task.task_id)
        assert info.task_id == task.task_id
        assert info.status is Status.FINISHED
        assert info.generated_buf == 16

    await in_thread(app, run)


async def test_typed_exceptions(app: App, aclient: AsyncClient) -> None:
    missing = "TMP_" + "0" * 32
    for call in (
        aclient.get_task_result(missing),
        aclient.get_task_status(missing),
        aclient.stop_task(missing),
        aclient.delete_task(missing),
        aclient.fork_task("TASK_" + "0" * 32),
        aclient.continue_task(missing),
        aclient.as_template(missing),
        collect(aclient.stream_task(missing)),
    ):
        with pytest.raises(TaskNotFoundError):
            await call
    with pytest.raises(RWKVValidationError):
        await aclient.create("Hello", max_tokens=-1)
    with pytest.raises(RWKVValidationError):
        await collect(aclient.create_stream("Hello", temperature=3))

    def sync_errors(client: Client) -> None:
        with pytest.raises(RWKVValidationError):
            client.create("Hello", max_tokens=-1)
        with pytest.raises(TaskNotFoundError):
            client.get_task_result("nonsense")

    await in_thread(app, sync_errors)
