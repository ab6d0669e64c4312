"""The task API of the typed client against a real server: AsyncTask through AsyncClient, Task through Client."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from datetime import UTC, datetime
from typing import TypedDict

import pytest
import rwkvd

from tests.clients.conftest import Server

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Greedy(TypedDict):
    """Sampling options that make a task's length and text predictable (its own keys, so mypy lets tests
    pass max_tokens and seed beside it)."""

    temperature: float
    ignore_eos: bool
    stop: list[str]


GREEDY: Greedy = {"temperature": 0.0, "ignore_eos": True, "stop": []}


async def test_lifecycle(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        task = await client.create_task("Once upon a time", max_tokens=8, seed=2, **GREEDY)
        assert isinstance(task, rwkvd.AsyncTask)
        assert task.task_id.startswith("TMP_")
        assert task.kind == "temporary"
        assert task.status in ("prefill", "running", "finished")
        assert await task.wait() is task
        assert (task.status, task.finished, task.finish_reason) == ("finished", True, "length")
        assert task.generated_tokens == task.usage.completion_tokens == 8
        assert (task.seed, task.sampling.max_tokens, task.parent_task_id) == (2, 8, None)
        assert task.state_tokens > 8
        assert task.timings.prefill_seconds > 0
        assert task.created <= task.updated <= datetime.now(UTC)
        assert task.result == "".join([t async for t in task.stream()])
        tail = "".join([t async for t in task.stream(from_token=4)])
        assert tail
        assert task.result.endswith(tail)
        events = [e async for e in task.events()]
        assert events[0].HasField("started")
        assert events[-1].finished.usage == task.usage
        assert repr(task) == f"<AsyncTask {task.task_id} finished 8 tokens>"

        same = await client.get_task(task.task_id)
        assert same.message == task.message

        before = task.result
        assert await task.continue_(max_tokens=4) is task  # resumes: the result grows
        await task.wait()
        assert task.generated_tokens == 12
        assert task.result.startswith(before)
        await task.continue_("\n\nUser: and?", max_tokens=3)
        await task.wait()
        assert task.generated_tokens == 3

        fork = await task.fork(" More", max_tokens=5)
        assert fork.task_id.startswith("TASK_")
        assert fork.kind == "persistent"
        assert fork.parent_task_id == task.task_id
        assert (await fork.wait()).generated_tokens == 5
        temporary = await task.fork(persistent=False)
        assert temporary.kind == "temporary"
        await temporary.stop()

        template = await fork.as_template()
        assert template.task_id.startswith("_TMPL_")
        assert template.kind == "template"
        with pytest.raises(rwkvd.PermissionDenied) as read_only:
            await template.continue_("x")
        assert read_only.value.reason == "TEMPLATE_READ_ONLY"
        with pytest.raises(rwkvd.PermissionDenied):
            await template.delete()
        listing = await client.list_tasks(kind="template")
        assert template.task_id in [t.task_id for t in listing.tasks]

        for handle in (template, fork, task):
            await handle.delete(force=True)
        with pytest.raises(rwkvd.NotFound) as gone:
            await client.get_task(task.task_id)
        assert gone.value.reason == "TASK_NOT_FOUND"
        assert gone.value.resource == ("task", task.task_id)


async def test_fim_stop_and_waiting_with_a_deadline(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        fim = await (await client.create_task(prefix="a = 1\n", suffix="\nprint(c)", max_tokens=4)).wait()
        assert fim.finished
        assert "✿" not in fim.result
        with pytest.raises(TypeError):
            await client.create_task("x", prefix="y")

        long = await client.create_task("Count:", persistent=True, max_tokens=5000, **GREEDY)
        with pytest.raises(rwkvd.DeadlineExceeded):
            await long.wait(timeout=0.2)
        async with aclosing(long.stream()) as texts:
            async for _ in texts:
                break  # leaving a stream does not stop the task
        assert (await long.refresh()).status == "running"
        await long.stop()
        assert (long.status, long.finish_reason) == ("finished", "cancelled")
        await long.delete()
        assert await server.engine_idle()

        with pytest.raises(rwkvd.InvalidArgument) as bad:
            await client.create_task("x", temperature=9)
        assert [v.field for v in bad.value.field_violations] == ["sampling.temperature"]


async def test_create_task_stream(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        events = [e async for e in client.create_task_stream("Hello 你好 🌍", max_tokens=10, **GREEDY)]
        assert [e.WhichOneof("event") for e in (events[0], events[-1])] == ["started", "finished"]
        task = await client.get_task(events[0].started.task_id)
        assert "".join(e.delta.text for e in events if e.HasField("delta")) == task.result


async def test_sync_client(server: Server) -> None:
    def run() -> None:
        with rwkvd.Client(server.target) as client:
            task = client.create_task("The sky is", max_tokens=6, **GREEDY)
            assert isinstance(task, rwkvd.Task)
            assert task.wait() is task
            assert task.finished
            assert "".join(task.stream()) == task.result
            assert [e.WhichOneof("event") for e in task.events()][-1] == "finished"
            assert client.get_task(task.task_id).result == task.result
            assert task.continue_(max_tokens=2).wait().generated_tokens == 8
            fork = task.fork(persistent=False, max_tokens=3)
            assert isinstance(fork, rwkvd.Task)
            assert fork.wait().generated_tokens == 11
            template = task.as_template()
            assert isinstance(template, rwkvd.Task)
            assert template.kind == "template"
            events = list(client.create_task_stream("Hi", max_tokens=2, **GREEDY))
            assert events[-1].finished.usage.completion_tokens == 2
            listing = client.list_tasks(page_size=1)
            assert len(listing.tasks) == 1
            assert listing.next_page_token
            long = client.create_task("Count:", max_tokens=5000, **GREEDY)
            for _ in long.stream():
                break
            assert long.stop().finish_reason == "cancelled"
            template.delete(force=True)
            task.delete()
            with pytest.raises(rwkvd.NotFound):
                task.refresh()

    await asyncio.to_thread(run)
    assert await server.engine_idle()
