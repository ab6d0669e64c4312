"""Tasks (RWKV-Server's model): create, follow from a token offset, stop, delete, fork, continue, template.

Temporary tasks live in memory under an LRU (an evicted id answers NOT_FOUND with reason
TASK_EVICTED); persistent tasks and templates are stored with their state and reloaded on access
(templates are pinned in memory). Every generation keeps its final state in the task, so a task can
be continued, forked or turned into a template; a fork is a deep copy and never touches its source.
Shared by gRPC TaskService and the /v1/tasks HTTP API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from service.engine.protocol import (
    Delta,
    EngineClient,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Started,
    StateRef,
    TokenStream,
)
from service.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from service.store.sqlite import Store

from .prompts import CHAT_STOPS, FIM_MARK, fim_prompt
from .sampling import SamplingOverrides
from .task_state import Round, RoundEvent, RoundStarted, Task, TaskKind, TaskStatus

log = logging.getLogger("rwkvd.tasks")

# RWKV-Server's defaults; it also ends a generation when the model starts a user turn.
TASK_DEFAULTS = SamplingParams(
    max_tokens=4096,
    temperature=1.0,
    top_k=50,
    top_p=0.3,
    presence_penalty=2.0,
    repetition_penalty=0.0,
    penalty_decay=1.0,
    stop=CHAT_STOPS,
)


@dataclass(frozen=True)
class TaskLimits:
    max_temporary: int = 256  # temporary tasks kept in memory (LRU beyond)
    max_stored_in_memory: int = 256  # persistent tasks kept loaded (they stay in the store)
    remember_evicted: int = 10_000  # evicted ids that still answer "evicted" rather than "not found"


@dataclass(frozen=True)
class TaskInput:
    """A prompt: text, token ids, or fill-in-the-middle (prefix, suffix)."""

    text: str | None = None
    tokens: tuple[int, ...] | None = None
    fim: tuple[str, str] | None = None


@dataclass(frozen=True)
class TaskListing:
    memory_ids: list[str]
    stored_ids: list[str]
    tasks: list[Task] = field(default_factory=list)  # the requested page, memory first

    @property
    def total(self) -> int:
        return len(set(self.memory_ids) | set(self.stored_ids))


class TaskManager:
    def __init__(
        self,
        engine: EngineClient,
        store: Store,
        limits: TaskLimits = TaskLimits(),
        defaults: SamplingParams = TASK_DEFAULTS,
    ) -> None:
        self._engine = engine
        self._store = store
        self._limits = limits
        self._defaults = defaults
        self._temporary: OrderedDict[str, Task] = OrderedDict()
        self._stored: OrderedDict[str, Task] = OrderedDict()  # persistent tasks loaded from the store
        self._templates: dict[str, Task] = {}
        self._evicted: OrderedDict[str, None] = OrderedDict()
        # Every round's consumer until it has returned, its final save included (a task's `runner` is
        # cleared before that save, so that the round reads as ended at once).
        self._consumers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Loads the stored templates (pinned, with their states)."""
        for record in await self._store.tasks(TaskKind.TEMPLATE.value):
            task = Task.from_record(record)
            await self._load_state(task)
            self._templates[task.id] = task
        log.info("%d templates loaded", len(self._templates))

    async def close(self) -> None:
        """Waits for running rounds to record their end and be saved (the engine cancels them when it stops)."""
        if self._consumers:
            await asyncio.wait(set(self._consumers), timeout=10)

    # Operations

    async def create(self, kind: TaskKind, prompt: TaskInput, overrides: SamplingOverrides) -> Task:
        if kind is TaskKind.TEMPLATE:
            raise InvalidArgument.for_field("kind", "templates are made from tasks (save as template)")
        tokens, fim = self._encode(prompt)
        if fim and overrides.stop is None:  # the middle ends where the model would open another section
            overrides = dataclasses.replace(overrides, stop=(FIM_MARK, *self._defaults.stop))
        task_id = _new_id(kind)
        task = Task(id=task_id, kind=kind, overrides=overrides, seed=overrides.seed, round=Round(task_id))
        self._launch(task, tokens, start=None, new_round=True)
        await self._remember(task)
        return task

    async def get(self, task_id: str) -> Task:
        task = self._temporary.get(task_id) or self._templates.get(task_id) or self._stored.get(task_id)
        if task is not None:
            self._touch(task)
            return task
        if task_id.startswith(TaskKind.TEMPORARY.prefix):
            if task_id in self._evicted:
                raise NotFound.resource_missing(
                    "task", task_id, reason="TASK_EVICTED", detail="evicted from memory (temporary tasks are an LRU)"
                )
            raise NotFound.resource_missing("task", task_id, reason="TASK_NOT_FOUND")
        record = await self._store.load_task(task_id) if _well_formed(task_id) else None
        if record is None:
            raise NotFound.resource_missing("task", task_id, reason="TASK_NOT_FOUND")
        task = Task.from_record(record)
        self._stored[task.id] = task
        self._trim()
        return task

    def follow(self, task: Task, from_token: int = 0) -> AsyncIterator[RoundEvent]:
        """The task's current round from a token offset, until it ends."""
        return task.round.follow(from_token)

    async def stop(self, task_id: str) -> Task:
        task = await self.get(task_id)
        if task.request_id is not None:
            await self._engine.abort(task.request_id)
        return task

    async def delete(self, task_id: str, force: bool = False) -> None:
        task = await self.get(task_id)
        if task.kind is TaskKind.TEMPLATE and not force:
            raise PermissionDenied("templates are deleted only with force=true", reason="TEMPLATE_READ_ONLY")
        if task.request_id is not None:
            await self._engine.abort(task.request_id)
        for table in (self._temporary, self._stored, self._templates):
            table.pop(task_id, None)
        if task.stored:
            await self._store.delete_task(task_id)

    async def fork(
        self, task_id: str, prompt: TaskInput | None, overrides: SamplingOverrides, kind: TaskKind = TaskKind.PERSISTENT
    ) -> Task:
        """A deep copy (state, sampler state, result) that then runs: on `prompt` if given, else on from there."""
        if kind is TaskKind.TEMPLATE:
            raise InvalidArgument.for_field("kind", "a fork is a temporary or persistent task")
        source = await self.get(task_id)
        tokens = self._encode(prompt)[0] if prompt is not None else None
        new_id = _new_id(kind)
        state, round_ = await self._snapshot(source, new_id)
        task = Task(
            id=new_id,
            kind=kind,
            overrides=overrides.over(source.overrides),
            seed=overrides.seed if overrides.seed is not None else source.seed,
            round=round_,
            parent_id=source.id,
        )
        task.state = state
        self._launch(task, tokens or [], start=state, new_round=tokens is not None)
        await self._remember(task)
        return task

    async def continue_(self, task_id: str, prompt: TaskInput | None, overrides: SamplingOverrides) -> Task:
        """With a prompt: a new round reading it on top of the state; without: generation resumes."""
        task = await self.get(task_id)
        if task.kind is TaskKind.TEMPLATE:
            raise PermissionDenied("templates are read-only; fork them", reason="TEMPLATE_READ_ONLY")
        if task.running:
            raise FailedPrecondition("the task is still running; stop it or wait", reason="TASK_RUNNING")
        tokens = self._encode(prompt)[0] if prompt is not None else None
        state = await self._load_state(task)
        previous = (task.overrides, task.seed)
        task.overrides = overrides.over(task.overrides)
        if overrides.seed is not None:
            task.seed = overrides.seed
        try:
            self._launch(task, tokens or [], start=state, new_round=tokens is not None)
        except Exception:
            task.overrides, task.seed = previous  # refused: the task is as it was
            raise
        return task

    async def as_template(self, task_id: str) -> Task:
        source = await self.get(task_id)
        if source.kind is TaskKind.TEMPLATE:
            raise InvalidArgument.for_field("task_id", "the task is already a template", reason="ALREADY_TEMPLATE")
        template_id = _new_id(TaskKind.TEMPLATE)
        state, _ = await self._snapshot(source, template_id)
        template = Task(
            id=template_id,
            kind=TaskKind.TEMPLATE,
            overrides=source.overrides,
            seed=source.seed,
            round=Round(template_id, status=TaskStatus.FINISHED, finish_reason=FinishReason.LENGTH),
            parent_id=source.id,
        )
        self._set_state(template, state)
        await self._save(template)
        self._templates[template.id] = template
        return template

    async def template_state(self, template_id: str) -> StateRef:
        """A template's state, for something that starts from it (a chat session); the template is unchanged."""
        template = await self.get(template_id)
        if template.kind is not TaskKind.TEMPLATE:
            raise InvalidArgument.for_field("template_id", "not a template (a _TMPL_ task)", reason="NOT_A_TEMPLATE")
        return await self._load_state(template)

    async def list_tasks(self, kind: TaskKind | None = None) -> TaskListing:
        """Tasks in memory (oldest first) and the ids of stored ones."""
        memory = [t for t in self._all_in_memory() if kind is None or t.kind is kind]
        stored = [] if kind is TaskKind.TEMPORARY else await self._store.task_ids(kind.value if kind else None)
        return TaskListing(memory_ids=[t.id for t in memory], stored_ids=stored, tasks=memory)

    async def list_page(self, kind: TaskKind | None, after: str = "", limit: int = 100) -> TaskListing:
        """list_tasks() with `tasks` one page: up to `limit` tasks, memory and store, whose ids sort after `after`.

        Ids order the pages because they do not move when a task is loaded or evicted; stored tasks on
        the page are read from the store, not loaded into memory.
        """
        listing = await self.list_tasks(kind)
        in_memory = {t.id: t for t in listing.tasks}
        page: list[Task] = []
        for task_id in sorted(i for i in set(listing.memory_ids) | set(listing.stored_ids) if i > after):
            if len(page) == limit:
                break
            task = in_memory.get(task_id)
            if task is None:
                record = await self._store.load_task(task_id)
                if record is None:  # deleted meanwhile
                    continue
                task = Task.from_record(record)
            page.append(task)
        return dataclasses.replace(listing, tasks=page)

    def sampling(self, task: Task) -> SamplingParams:
        """The parameters the task's generations run with: its overrides over the defaults, and its seed."""
        params = task.overrides.resolve(self._defaults)
        return params if task.seed is None else dataclasses.replace(params, seed=task.seed)

    # Running rounds

    def _launch(self, task: Task, prompt: list[int], start: StateRef | None, new_round: bool) -> None:
        """Starts a generation from `start`: a new round on `prompt`, or (new_round False) the round resumed."""
        request = GenerationRequest(
            request_id=f"{task.id}#{task.requests + 1}",
            prompt=tuple(prompt),
            sampling=self.sampling(task),
            start_state=start,
            inherit_sampler=start is not None,  # forks and continues carry penalties and the random stream
            keep_state=True,
        )
        stream = self._engine.generate(request)  # raises (queue full, bad input) before anything changes
        task.requests += 1
        if new_round:
            task.round = Round(task.id)
        else:
            task.round.status = TaskStatus.PREFILL
            task.round.finish_reason = task.round.error = None
        task.request_id = request.request_id
        task.request_base = len(task.round.tokens)
        task.runner = asyncio.create_task(self._consume(task, task.round, stream, base=task.request_base))
        self._consumers.add(task.runner)
        task.runner.add_done_callback(self._consumers.discard)
        task.round.notify()

    async def _consume(self, task: Task, round_: Round, stream: TokenStream, base: int) -> None:
        try:
            async with aclosing(stream):
                async for event in stream:
                    if isinstance(event, Started):
                        if task.seed is None:
                            task.seed = event.seed  # the one the engine chose, reported from the start
                        round_.on_started(
                            RoundStarted(task.id, event.prefill_seconds, event.prompt_tokens, event.cached_tokens)
                        )
                    elif isinstance(event, Delta):
                        round_.on_tokens(base + event.offset, event.token_ids, event.text)
                    elif isinstance(event, Finished):
                        if event.state is not None:
                            self._set_state(task, event.state)
                        # Not running any more before anyone hears of the end: a woken waiter may continue.
                        task.request_id = None
                        round_.on_end(event.reason, event.usage, event.timings, event.error)
        except Exception as exc:  # the engine failed this request: the task keeps its previous state
            log.exception("task %s: generation failed", task.id)
            round_.on_end(FinishReason.ERROR, round_.usage, round_.timings, f"{type(exc).__name__}: {exc}")
        finally:
            task.request_id = None
            task.runner = None
            task.updated = time.time()
            if not round_.finished:
                round_.on_end(FinishReason.CANCELLED, round_.usage, round_.timings)
            if task.stored and task.id in (self._stored.keys() | self._templates.keys()):
                await self._save(task)

    # State

    async def _snapshot(self, source: Task, copy_id: str) -> tuple[StateRef, Round]:
        """The source's state and a copy of its round that matches it (a running source at its latest step)."""
        request_id = source.request_id
        while request_id is not None:
            try:
                state = await self._engine.snapshot(request_id)
            except FailedPrecondition as exc:
                if exc.reason == "NOT_RUNNING":
                    # It ended in the engine and its end is on the way (with overlap or --stream-interval the
                    # events trail the engine by a step or more): wait for the end, then take the final state.
                    await source.round.wait_for_tokens(1 << 62)
                elif exc.reason == "NOT_STARTED":
                    await asyncio.sleep(0.01)  # still queued for a slot: wait for its first step
                else:
                    raise
                request_id = source.request_id
                continue
            # The round's events may trail the engine (a step with overlap, up to --stream-interval tokens):
            # wait for them, and cut at the snapshot.
            upto = source.request_base + state.generated_tokens
            await source.round.wait_for_tokens(upto)
            return state, source.round.copy(copy_id, upto)
        return await self._load_state(source), source.round.copy(copy_id)

    async def _load_state(self, task: Task) -> StateRef:
        if task.state is not None:
            return task.state
        if task.has_state and task.stored:
            data = await self._store.load_state(task.id)
            if data is not None:
                task.state = await self._engine.import_state(data)
                return task.state
        raise FailedPrecondition(f"task {task.id} has no state to continue from", reason="NO_STATE")

    def _set_state(self, task: Task, state: StateRef) -> None:
        task.state = state
        task.has_state = True
        task.state_tokens = state.token_count

    async def _save(self, task: Task) -> None:
        data = await self._engine.export_state(task.state) if task.state is not None else None
        await self._store.save_task(task.to_record(), data)

    # Memory

    async def _remember(self, task: Task) -> None:
        if task.kind is TaskKind.TEMPORARY:
            self._temporary[task.id] = task
        else:
            self._stored[task.id] = task
            await self._save(task)  # the id exists from now on, across restarts
        self._trim()

    def _touch(self, task: Task) -> None:
        for table in (self._temporary, self._stored):
            if task.id in table:
                table.move_to_end(task.id)

    def _trim(self) -> None:
        """Drops the least recently used finished tasks beyond the limits (running ones stay)."""
        for table, limit, evicts in (
            (self._temporary, self._limits.max_temporary, True),
            (self._stored, self._limits.max_stored_in_memory, False),
        ):
            for task_id in [i for i, t in table.items() if not t.running][: max(0, len(table) - limit)]:
                del table[task_id]
                if evicts:
                    self._evicted[task_id] = None
        while len(self._evicted) > self._limits.remember_evicted:
            self._evicted.popitem(last=False)

    def _all_in_memory(self) -> list[Task]:
        return [*self._templates.values(), *self._stored.values(), *self._temporary.values()]

    def _encode(self, prompt: TaskInput) -> tuple[list[int], bool]:
        """Token ids of a prompt, and whether it is fill-in-the-middle."""
        given = [x for x in (prompt.text, prompt.tokens, prompt.fim) if x is not None]
        if len(given) != 1:
            raise InvalidArgument.for_field("prompt", "give exactly one of text, token ids, or prefix/suffix")
        if prompt.fim is not None:
            return self._engine.tokenizer.encode(fim_prompt(*prompt.fim)), True
        if prompt.tokens is not None:
            return list(prompt.tokens), False
        return self._engine.tokenizer.encode(prompt.text or ""), False


def _new_id(kind: TaskKind) -> str:
    return kind.prefix + uuid.uuid4().hex


def _well_formed(task_id: str) -> bool:
    return task_id.replace("_", "").isalnum() and len(task_id) <= 64
