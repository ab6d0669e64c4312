"""TaskManager on the real engine and store: lifecycle, follow from an offset, fork, continue, templates,
eviction, and what a new manager on the same store finds (a restart)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from service.domain.sampling import SamplingOverrides
from service.domain.task_state import RoundDelta, RoundEnded, RoundStarted, Task, TaskKind, TaskStatus
from service.domain.tasks import TaskInput, TaskLimits, TaskManager
from service.engine.config import EngineConfig
from service.engine.local import LocalEngineClient, build_engine
from service.engine.protocol import FinishReason, GenerationRequest, SamplingParams
from service.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from service.store.sqlite import Store

GREEDY = SamplingOverrides(max_tokens=10, temperature=0.0, stop=(), ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> Iterator[LocalEngineClient]:
    client = build_engine(EngineConfig(max_batch_size=4, max_queued=64))
    yield client
    client.shutdown()


@pytest.fixture
async def manager(engine: LocalEngineClient, tmp_path: Path) -> AsyncIterator[TaskManager]:
    store = await Store.open(tmp_path)
    tasks = TaskManager(engine, store, TaskLimits(max_temporary=3))
    await tasks.start()
    yield tasks
    await tasks.close()
    await store.close()


async def finished(task: Task) -> Task:
    async for _ in task.round.follow():
        pass
    return task


async def test_create_runs_to_the_end_and_keeps_its_state(manager: TaskManager) -> None:
    task = await manager.create(TaskKind.TEMPORARY, TaskInput(text="Hello 你好 🌍"), GREEDY)
    assert task.id.startswith("TMP_")
    assert task.status is TaskStatus.PREFILL
    await finished(task)
    assert task.status is TaskStatus.FINISHED
    assert task.round.finish_reason is FinishReason.LENGTH
    assert len(task.round.tokens) == 10
    assert task.state is not None
    assert task.state_tokens == task.round.usage.prompt_tokens + 10 - 1  # the last token is pending
    assert task.round.text == manager._engine.tokenizer.decode(task.round.tokens)


async def test_follow_replays_from_an_offset_then_ends(manager: TaskManager) -> None:
    task = await finished(await manager.create(TaskKind.TEMPORARY, TaskInput(text="abc"), GREEDY))
    events = [e async for e in manager.follow(task, 4)]
    assert isinstance(events[0], RoundStarted)
    assert isinstance(events[-1], RoundEnded)
    deltas = [e for e in events if isinstance(e, RoundDelta)]
    assert deltas[0].offset == 4
    assert [t for d in deltas for t in d.token_ids] == task.round.tokens[4:]
    everything = [e async for e in manager.follow(task, 0) if isinstance(e, RoundDelta)]
    assert "".join(d.text for d in everything) == task.round.text


async def test_resuming_continues_exactly_like_one_generation(manager: TaskManager) -> None:
    prompt = TaskInput(text="Once upon a time")
    task = await finished(await manager.create(TaskKind.TEMPORARY, prompt, GREEDY))
    resumed = await finished(await manager.continue_(task.id, None, SamplingOverrides(max_tokens=6)))
    assert resumed is task
    whole = await finished(
        await manager.create(TaskKind.TEMPORARY, prompt, SamplingOverrides(max_tokens=16).over(GREEDY))
    )
    assert task.round.tokens == whole.round.tokens
    assert task.round.text == whole.round.text


async def test_continue_with_a_prompt_starts_a_new_round_on_the_state(manager: TaskManager) -> None:
    task = await finished(await manager.create(TaskKind.TEMPORARY, TaskInput(text="User: hi"), GREEDY))
    first = task.round
    await finished(await manager.continue_(task.id, TaskInput(text="\n\nAssistant:"), SamplingOverrides(max_tokens=5)))
    assert task.round is not first
    assert len(task.round.tokens) == 5
    assert task.state_tokens > first.usage.prompt_tokens + 10


async def test_fork_is_a_deep_copy_and_never_touches_the_source(manager: TaskManager) -> None:
    source = await finished(await manager.create(TaskKind.PERSISTENT, TaskInput(text="A story:"), GREEDY))
    before = (list(source.round.tokens), source.round.text, source.state_tokens)
    fork = await finished(await manager.fork(source.id, TaskInput(text=" then"), SamplingOverrides(max_tokens=4)))
    assert fork.id.startswith("TASK_")
    assert fork.parent_id == source.id
    assert len(fork.round.tokens) == 4
    assert (source.round.tokens, source.round.text, source.state_tokens) == before
    # Without a prompt the fork goes on from the copied state: its result starts with the source's.
    resumed = await finished(await manager.fork(source.id, None, SamplingOverrides(max_tokens=3), TaskKind.TEMPORARY))
    assert resumed.round.tokens[: len(before[0])] == before[0]
    assert len(resumed.round.tokens) == len(before[0]) + 3


async def test_fork_of_a_running_task_copies_it_at_its_latest_step(manager: TaskManager) -> None:
    long = SamplingOverrides(max_tokens=400, temperature=0.0, stop=(), ignore_eos=True)
    source = await manager.create(TaskKind.TEMPORARY, TaskInput(text="x"), long)
    await source.round.wait_for_tokens(5)
    fork = await manager.fork(source.id, None, SamplingOverrides(max_tokens=5), TaskKind.TEMPORARY)
    copied = len(fork.round.tokens)
    await finished(fork)
    await manager.stop(source.id)
    await finished(source)
    assert source.round.finish_reason is FinishReason.CANCELLED
    assert copied >= 5
    # Greedy from the same state: the fork's continuation is what the source generated next.
    assert fork.round.tokens == source.round.tokens[: len(fork.round.tokens)]


@pytest.mark.parametrize("overlap", ["off", "on"])
async def test_fork_of_a_task_ending_this_step_copies_its_final_state(tmp_path: Path, overlap: str) -> None:
    """A fork asked for just as the source ends, when the engine is a step ahead of the events (overlap, or
    another request keeping it busy): the engine no longer runs the source, its end is on the way; the fork
    waits for it and copies the final result and state instead of failing."""
    engine = build_engine(EngineConfig(max_batch_size=4, max_queued=64, overlap=overlap))
    store = await Store.open(tmp_path)
    tasks = TaskManager(engine, store, TaskLimits(max_temporary=50))
    await tasks.start()
    busy = engine.generate(GenerationRequest("busy", (1, 2, 3), SamplingParams(max_tokens=100_000, ignore_eos=True)))
    background = asyncio.create_task(drain(busy))
    try:
        for _ in range(6):
            source = await tasks.create(TaskKind.TEMPORARY, TaskInput(text="x"), GREEDY)
            await source.round.wait_for_tokens(9)  # one token short of the end
            forked = await tasks.fork(source.id, None, SamplingOverrides(max_tokens=2), TaskKind.TEMPORARY)
            fork = await finished(forked)
            await finished(source)
            copied = len(fork.round.tokens) - 2
            assert 9 <= copied <= 10
            assert fork.round.tokens[:copied] == source.round.tokens[:copied]
    finally:
        await engine.abort("busy")
        await background
        await tasks.close()
        await store.close()
        engine.shutdown()


async def drain(events: AsyncIterator[Any]) -> None:
    async for _ in events:
        pass


async def test_templates_are_read_only_and_forkable(manager: TaskManager) -> None:
    source = await finished(
        await manager.create(TaskKind.TEMPORARY, TaskInput(text="System prompt"), SamplingOverrides(max_tokens=0))
    )
    assert source.round.tokens == []
    template = await manager.as_template(source.id)
    assert template.id.startswith("_TMPL_")
    with pytest.raises(PermissionDenied):
        await manager.continue_(template.id, None, SamplingOverrides())
    with pytest.raises(InvalidArgument):
        await manager.as_template(template.id)
    a = await finished(await manager.fork(template.id, TaskInput(text=" one"), GREEDY, TaskKind.TEMPORARY))
    b = await finished(await manager.fork(template.id, TaskInput(text=" one"), GREEDY, TaskKind.TEMPORARY))
    assert a.round.tokens == b.round.tokens  # same state, same prompt, greedy
    with pytest.raises(PermissionDenied):
        await manager.delete(template.id)
    await manager.delete(template.id, force=True)
    with pytest.raises(NotFound):
        await manager.get(template.id)


async def test_continue_while_running_is_refused_and_stop_ends_the_round(manager: TaskManager) -> None:
    task = await manager.create(TaskKind.TEMPORARY, TaskInput(text="x"), SamplingOverrides(max_tokens=500).over(GREEDY))
    with pytest.raises(FailedPrecondition) as err:
        await manager.continue_(task.id, None, SamplingOverrides())
    assert err.value.reason == "TASK_RUNNING"
    await task.round.wait_for_tokens(2)
    await manager.stop(task.id)
    await finished(task)
    assert task.round.finish_reason is FinishReason.CANCELLED
    assert task.state is not None  # a stopped task keeps its state and can go on
    await finished(await manager.continue_(task.id, None, SamplingOverrides(max_tokens=2)))
    # Stopped before its prompt was read, a task has no state to go on from, and says so.
    early = await manager.create(TaskKind.TEMPORARY, TaskInput(text="y"), GREEDY)
    await manager.stop(early.id)
    await finished(early)
    if early.state is None:
        with pytest.raises(FailedPrecondition) as no_state:
            await manager.continue_(early.id, None, SamplingOverrides())
        assert no_state.value.reason == "NO_STATE"


async def test_temporary_tasks_are_an_lru_and_evicted_ids_say_so(manager: TaskManager) -> None:
    ids = [
        (await finished(await manager.create(TaskKind.TEMPORARY, TaskInput(text=str(i)), GREEDY))).id for i in range(4)
    ]
    with pytest.raises(NotFound) as err:
        await manager.get(ids[0])
    assert err.value.reason == "TASK_EVICTED"
    assert (await manager.get(ids[3])).id == ids[3]
    with pytest.raises(NotFound) as unknown:
        await manager.get("TMP_" + "0" * 32)
    assert unknown.value.reason == "TASK_NOT_FOUND"


async def test_a_refused_start_changes_nothing(manager: TaskManager) -> None:
    task = await finished(await manager.create(TaskKind.TEMPORARY, TaskInput(text="x"), GREEDY))
    before = (task.round, task.overrides)
    with pytest.raises(InvalidArgument):
        await manager.continue_(task.id, None, SamplingOverrides(temperature=99.0))
    assert (task.round, task.overrides) == before
    with pytest.raises(InvalidArgument):
        await manager.create(TaskKind.TEMPORARY, TaskInput(tokens=(70_000,)), GREEDY)


async def test_queue_full_is_resource_exhausted(tmp_path: Path) -> None:
    small = build_engine(EngineConfig(max_batch_size=1, max_queued=1))
    store = await Store.open(tmp_path)
    manager = TaskManager(small, store)
    try:
        long = SamplingOverrides(max_tokens=300).over(GREEDY)
        first = await manager.create(TaskKind.TEMPORARY, TaskInput(text="x"), long)
        await first.round.wait_for_tokens(1)  # holds the only slot
        running = [first, await manager.create(TaskKind.TEMPORARY, TaskInput(text="x"), long)]  # waits
        with pytest.raises(ResourceExhausted):
            await manager.create(TaskKind.TEMPORARY, TaskInput(text="x"), long)
        for task in running:
            await manager.stop(task.id)
            await finished(task)
    finally:
        await store.close()
        small.shutdown()


async def test_stored_tasks_and_templates_survive_a_new_manager(engine: LocalEngineClient, tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    first = TaskManager(engine, store)
    task = await finished(await first.create(TaskKind.PERSISTENT, TaskInput(text="Remember me"), GREEDY))
    template = await first.as_template(task.id)
    temporary = await finished(await first.create(TaskKind.TEMPORARY, TaskInput(text="gone"), GREEDY))
    again_prompt = TaskInput(text=" again")
    # What continuing it will give: a greedy fork on the same prompt from the same (in-memory) state.
    expected = await finished(
        await first.fork(task.id, again_prompt, SamplingOverrides(max_tokens=4), TaskKind.TEMPORARY)
    )
    await first.close()
    await store.close()

    store = await Store.open(tmp_path)
    second = TaskManager(engine, store)
    await second.start()
    try:
        loaded = await second.get(task.id)
        assert loaded is not task
        assert (loaded.round.tokens, loaded.round.text) == (task.round.tokens, task.round.text)
        assert loaded.round.finish_reason is FinishReason.LENGTH
        assert template.id in {t.id for t in (await second.list_tasks(TaskKind.TEMPLATE)).tasks}
        with pytest.raises(NotFound):
            await second.get(temporary.id)  # temporary tasks are documented not to survive
        # The state came back from its file: continuing matches what the first process would have done.
        resumed = await finished(await second.continue_(task.id, again_prompt, SamplingOverrides(max_tokens=4)))
        assert resumed.round.tokens == expected.round.tokens
    finally:
        await second.close()
        await store.close()


async def test_a_task_stored_under_an_fp16_state_loads_under_fp32(engine: LocalEngineClient, tmp_path: Path) -> None:
    # --state-dtype changed across a restart: the state file holds fp16, the new engine keeps fp32 (converted,
    # exactly); the other way round rounds it (tests/engine/test_state_dtype.py covers both directions).
    half = build_engine(EngineConfig(max_batch_size=1, state_dtype="float16"))
    store = await Store.open(tmp_path)
    try:
        first = TaskManager(half, store)
        task = await finished(await first.create(TaskKind.PERSISTENT, TaskInput(text="Saved in fp16"), GREEDY))
        assert task.state is not None
        assert task.state.rnn.wkv.dtype == torch.float16  # type: ignore[attr-defined]
        await first.close()  # waits for the round's final save
    finally:
        await store.close()
        half.shutdown()

    store = await Store.open(tmp_path)
    second = TaskManager(engine, store)
    await second.start()
    try:
        resumed = await finished(await second.continue_(task.id, None, SamplingOverrides(max_tokens=4)))
        assert resumed.round.finish_reason is FinishReason.LENGTH
        assert len(resumed.round.tokens) > len(task.round.tokens)
        # The first continuation read the stored state: after it the task holds the fp32 engine's snapshot.
        assert resumed.state is not None
        assert resumed.state.rnn.wkv.dtype == torch.float32  # type: ignore[attr-defined]
    finally:
        await second.close()
        await store.close()


async def test_close_waits_for_the_save_of_a_round_that_just_ended(
    engine: LocalEngineClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A round's end is announced, then saved: a shutdown right between the two must still wait for the save.
    store = await Store.open(tmp_path)
    slow = asyncio.Event()
    save_task = store.save_task

    async def slow_save_task(*args: Any, **kwargs: Any) -> None:  # the fault: a store that takes its time
        if slow.is_set():
            await asyncio.sleep(0.3)
        await save_task(*args, **kwargs)

    monkeypatch.setattr(store, "save_task", slow_save_task)
    manager = TaskManager(engine, store)
    try:
        task = await manager.create(TaskKind.PERSISTENT, TaskInput(text="Saved before the end"), GREEDY)
        slow.set()  # the creation's own save is done; the round's end is saved slowly
        await finished(task)
        assert await store.load_state(task.id) is None  # announced, not yet saved
        await manager.close()
        assert await store.load_state(task.id) is not None
    finally:
        await store.close()
