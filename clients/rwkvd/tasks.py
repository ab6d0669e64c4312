"""Task handles: AsyncTask (coroutines, from AsyncClient) and Task (blocking, from Client).

A handle holds the task as last read from the server (`message`, a rwkvd.v1.tasks_pb2.Task, with
typed views of its fields) and runs the task operations: refresh, wait, stream, fork, continue,
save as template, stop, delete. AsyncTask has the one implementation; Task carries each call to the
Client's loop thread.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, Self, TypeAlias, TypeVar, Unpack

from ._loop import LoopThread
from .params import SamplingOptions, prompt_message, sampling_params
from .v1 import common_pb2, tasks_pb2

if TYPE_CHECKING:
    from .client import AsyncClient

P = ParamSpec("P")
R = TypeVar("R")

TaskKind: TypeAlias = Literal["temporary", "persistent", "template"]
TaskStatus: TypeAlias = Literal["prefill", "ready", "running", "finished"]
FinishReason: TypeAlias = Literal["stop", "stop_sequence", "length", "cancelled", "deadline", "error"]

KINDS: dict[tasks_pb2.TaskKind.ValueType, TaskKind] = {
    tasks_pb2.TASK_KIND_TEMPORARY: "temporary",
    tasks_pb2.TASK_KIND_PERSISTENT: "persistent",
    tasks_pb2.TASK_KIND_TEMPLATE: "template",
}
KIND_VALUES = {name: value for value, name in KINDS.items()}
_STATUSES: dict[tasks_pb2.TaskStatus.ValueType, TaskStatus] = {
    tasks_pb2.TASK_STATUS_PREFILL: "prefill",
    tasks_pb2.TASK_STATUS_READY: "ready",
    tasks_pb2.TASK_STATUS_RUNNING: "running",
    tasks_pb2.TASK_STATUS_FINISHED: "finished",
}
FINISH_REASONS: dict[common_pb2.FinishReason.ValueType, FinishReason] = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_DEADLINE: "deadline",
    common_pb2.FINISH_REASON_ERROR: "error",
}


def optional_prompt(prompt: str | Sequence[int] | None) -> common_pb2.Prompt | None:
    return None if prompt is None else prompt_message(prompt)


class _TaskFields:
    """Typed views of the task message's fields, shared by both handles."""

    message: tasks_pb2.Task

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.task_id} {self.status} {self.generated_tokens} tokens>"

    @property
    def task_id(self) -> str:
        return self.message.task_id

    @property
    def kind(self) -> TaskKind:
        return KINDS[self.message.kind]

    @property
    def status(self) -> TaskStatus:
        return _STATUSES[self.message.status]

    @property
    def result(self) -> str:
        """The text generated in the current round (a new prompt starts a new round)."""
        return self.message.result

    @property
    def generated_tokens(self) -> int:
        return self.message.generated_tokens

    @property
    def finished(self) -> bool:
        return self.message.finished

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why the current round ended; None while it runs."""
        return FINISH_REASONS.get(self.message.finish_reason)

    @property
    def error(self) -> str | None:
        """What went wrong, when the round ended with finish_reason "error"."""
        return self.message.error or None

    @property
    def usage(self) -> common_pb2.Usage:
        return self.message.usage

    @property
    def timings(self) -> common_pb2.Timings:
        return self.message.timings

    @property
    def sampling(self) -> common_pb2.SamplingParams:
        """The parameters in effect (every field set)."""
        return self.message.sampling

    @property
    def seed(self) -> int:
        return self.message.seed

    @property
    def parent_task_id(self) -> str | None:
        """The task this one was forked or saved from."""
        return self.message.parent_task_id or None

    @property
    def state_tokens(self) -> int:
        """Tokens read into the task's state since it was zero."""
        return self.message.state_tokens

    @property
    def created(self) -> datetime:
        return self.message.create_time.ToDatetime(tzinfo=UTC)

    @property
    def updated(self) -> datetime:
        return self.message.update_time.ToDatetime(tzinfo=UTC)


class AsyncTask(_TaskFields):
    """A task on the server as last read; its operations are coroutines of the AsyncClient that made it.

    `timeout=` is each call's gRPC deadline, as everywhere in the client.
    """

    def __init__(self, client: AsyncClient, message: tasks_pb2.Task) -> None:
        self._client = client
        self.message = message

    async def refresh(self, *, timeout: float | None = None) -> Self:  # noqa: ASYNC109
        """Reads the task again."""
        request = tasks_pb2.GetTaskRequest(task_id=self.task_id)
        self.message = (await self._client.call(lambda s: s.tasks.GetTask(request, timeout=timeout))).task
        return self

    async def wait(self, *, timeout: float | None = None) -> Self:  # noqa: ASYNC109
        """Until the current round has ended (followed live, not polled), then refresh(); DeadlineExceeded
        when `timeout` seconds pass first."""
        async with aclosing(self.events(self.generated_tokens, timeout=timeout)) as events:
            async for _ in events:
                pass
        return await self.refresh()

    def stream(self, from_token: int = 0, *, timeout: float | None = None) -> AsyncGenerator[str, None]:
        """The text of the current round from token offset `from_token`: what exists, then live, until it ends.

        Several streams may follow one task; leaving one does not stop the task (stop() does).
        """
        return _texts(self.events(from_token, timeout=timeout))

    def events(
        self, from_token: int = 0, *, timeout: float | None = None
    ) -> AsyncGenerator[tasks_pb2.SubscribeTaskResponse, None]:
        """Like stream(), as the raw messages: `started`, `delta`..., `finished` (with usage and timings)."""
        request = tasks_pb2.SubscribeTaskRequest(task_id=self.task_id, from_token=from_token)
        return self._client.call_stream(lambda s: s.tasks.SubscribeTask(request, timeout=timeout))

    async def fork(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        persistent: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
        **overrides: Unpack[SamplingOptions],
    ) -> AsyncTask:
        """A new task from a deep copy of this one (a running task at its latest step; templates too) that runs:
        on `prompt` read on top of the copied state, or on from there without one. The sampling keyword
        arguments override this task's; the copy is persistent ("TASK_") unless persistent=False ("TMP_")."""
        request = tasks_pb2.ForkTaskRequest(
            task_id=self.task_id,
            prompt=optional_prompt(prompt),
            sampling=sampling_params(**overrides),
            kind=tasks_pb2.TASK_KIND_PERSISTENT if persistent else tasks_pb2.TASK_KIND_TEMPORARY,
        )
        response = await self._client.call(lambda s: s.tasks.ForkTask(request, timeout=timeout))
        return AsyncTask(self._client, response.task)

    async def continue_(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        **overrides: Unpack[SamplingOptions],
    ) -> Self:
        """Runs this finished task again: a new round on `prompt` read on top of its state, or, without one,
        the current round resumed where it stopped (result grows). FailedPrecondition while it runs;
        PermissionDenied for a template (fork it)."""
        request = tasks_pb2.ContinueTaskRequest(
            task_id=self.task_id, prompt=optional_prompt(prompt), sampling=sampling_params(**overrides)
        )
        self.message = (await self._client.call(lambda s: s.tasks.ContinueTask(request, timeout=timeout))).task
        return self

    async def as_template(self, *, timeout: float | None = None) -> AsyncTask:  # noqa: ASYNC109
        """A new read-only template ("_TMPL_") holding this task's current state; fork it to use it."""
        request = tasks_pb2.SaveTaskAsTemplateRequest(task_id=self.task_id)
        response = await self._client.call(lambda s: s.tasks.SaveTaskAsTemplate(request, timeout=timeout))
        return AsyncTask(self._client, response.task)

    async def stop(self, *, timeout: float | None = None) -> Self:  # noqa: ASYNC109
        """Ends the current round (finish reason "cancelled"); the state is kept, so it can be continued."""
        request = tasks_pb2.StopTaskRequest(task_id=self.task_id)
        await self._client.call(lambda s: s.tasks.StopTask(request, timeout=timeout))
        return await self.refresh(timeout=timeout)

    async def delete(self, *, force: bool = False, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Deletes the task from memory and the store (a running one is stopped); a template needs force=True."""
        request = tasks_pb2.DeleteTaskRequest(task_id=self.task_id, force=force)
        await self._client.call(lambda s: s.tasks.DeleteTask(request, timeout=timeout))


async def _texts(events: AsyncGenerator[tasks_pb2.SubscribeTaskResponse, None]) -> AsyncGenerator[str, None]:
    async with aclosing(events):
        async for event in events:
            if event.HasField("delta") and event.delta.text:
                yield event.delta.text


def _returning(
    annotation: str, wrap: Callable[[Task, Any], R]
) -> Callable[[Callable[Concatenate[AsyncTask, P], Coroutine[Any, Any, Any]]], Callable[Concatenate[Task, P], R]]:
    """The blocking form of an AsyncTask coroutine method, its result passed through `wrap`."""

    def decorate(
        method: Callable[Concatenate[AsyncTask, P], Coroutine[Any, Any, Any]],
    ) -> Callable[Concatenate[Task, P], R]:
        @functools.wraps(method)
        def blocking(self: Task, /, *args: P.args, **kwargs: P.kwargs) -> R:
            return wrap(self, self._loop.run(method(self._task, *args, **kwargs)))

        # help() and inspect show the blocking result type, not the coroutine method's
        blocking.__signature__ = inspect.signature(method).replace(return_annotation=annotation)  # type: ignore[attr-defined]
        return blocking

    return decorate


def _same(task: Task, result: Any) -> Task:
    return task


def _new(task: Task, result: AsyncTask) -> Task:
    return Task(task._loop, result)


def _none(task: Task, result: None) -> None:
    return None


class Task(_TaskFields):
    """A task on the server as last read, for synchronous code; made by Client (same operations as AsyncTask,
    blocking). Streams are generators: leaving the loop early cancels the call."""

    def __init__(self, loop: LoopThread, task: AsyncTask) -> None:
        self._loop = loop
        self._task = task

    @property
    def message(self) -> tasks_pb2.Task:  # type: ignore[override]
        return self._task.message

    refresh = _returning("Task", _same)(AsyncTask.refresh)
    wait = _returning("Task", _same)(AsyncTask.wait)
    fork = _returning("Task", _new)(AsyncTask.fork)
    continue_ = _returning("Task", _same)(AsyncTask.continue_)
    as_template = _returning("Task", _new)(AsyncTask.as_template)
    stop = _returning("Task", _same)(AsyncTask.stop)
    delete = _returning("None", _none)(AsyncTask.delete)

    def stream(self, from_token: int = 0, *, timeout: float | None = None) -> Generator[str, None, None]:
        """The text of the current round from token offset `from_token`: what exists, then live, until it ends.

        Several streams may follow one task; leaving one does not stop the task (stop() does).
        """
        return self._loop.iterate(self._task.stream(from_token, timeout=timeout))

    def events(
        self, from_token: int = 0, *, timeout: float | None = None
    ) -> Generator[tasks_pb2.SubscribeTaskResponse, None, None]:
        """Like stream(), as the raw messages: `started`, `delta`..., `finished` (with usage and timings)."""
        return self._loop.iterate(self._task.events(from_token, timeout=timeout))
