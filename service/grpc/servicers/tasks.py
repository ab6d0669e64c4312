"""TaskService: RWKV-Server's task model over gRPC (create, follow, stop, delete, fork, continue, template).

A task runs in the domain whatever its callers do: streams only follow it, so a client that goes away
(CreateTaskStream included) stops reading, never the task. StopTask is how a task is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from rwkvd.v1 import tasks_pb2, tasks_pb2_grpc

from service.domain.task_state import Task, TaskKind
from service.domain.tasks import TaskManager
from service.grpc import convert
from service.grpc.calls import Context

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# How long StopTask waits for the round to record its end (the engine ends it within a step).
STOP_SETTLE_SECONDS = 5.0

StreamResponse = TypeVar("StreamResponse", tasks_pb2.CreateTaskStreamResponse, tasks_pb2.SubscribeTaskResponse)


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self, tasks: TaskManager) -> None:
        self._tasks = tasks

    async def CreateTask(self, request: tasks_pb2.CreateTaskRequest, context: Context) -> tasks_pb2.CreateTaskResponse:
        task = await self._create(request)
        return tasks_pb2.CreateTaskResponse(task=self._task(task))

    async def CreateTaskStream(
        self, request: tasks_pb2.CreateTaskStreamRequest, context: Context
    ) -> AsyncIterator[tasks_pb2.CreateTaskStreamResponse]:
        task = await self._create(request)
        async for message in self._follow(task, 0, tasks_pb2.CreateTaskStreamResponse):
            yield message

    async def GetTask(self, request: tasks_pb2.GetTaskRequest, context: Context) -> tasks_pb2.GetTaskResponse:
        return tasks_pb2.GetTaskResponse(task=self._task(await self._tasks.get(request.task_id)))

    async def GetTaskStatus(
        self, request: tasks_pb2.GetTaskStatusRequest, context: Context
    ) -> tasks_pb2.GetTaskStatusResponse:
        return tasks_pb2.GetTaskStatusResponse(task=convert.task_info(await self._tasks.get(request.task_id)))

    async def ListTasks(self, request: tasks_pb2.ListTasksRequest, context: Context) -> tasks_pb2.ListTasksResponse:
        kind = convert.task_kind(request.kind, TaskKind.TEMPORARY) if request.kind else None
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        # One more than the page, to know whether another page follows.
        listing = await self._tasks.list_page(kind, convert.after_page_token(request.page_token), size + 1)
        page = listing.tasks[:size]
        more = len(listing.tasks) > size
        return tasks_pb2.ListTasksResponse(
            tasks=[convert.task_info(t) for t in page],
            next_page_token=convert.page_token(page[-1].id) if more else "",
            memory_count=len(listing.memory_ids),
            stored_count=len(listing.stored_ids),
            total_count=listing.total,
        )

    async def SubscribeTask(
        self, request: tasks_pb2.SubscribeTaskRequest, context: Context
    ) -> AsyncIterator[tasks_pb2.SubscribeTaskResponse]:
        task = await self._tasks.get(request.task_id)
        async for message in self._follow(task, request.from_token, tasks_pb2.SubscribeTaskResponse):
            yield message

    async def StopTask(self, request: tasks_pb2.StopTaskRequest, context: Context) -> tasks_pb2.StopTaskResponse:
        task = await self._tasks.stop(request.task_id)
        # Answer with the round ended, as the caller expects after a stop; the abort lands within a step.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_SETTLE_SECONDS):
                async for _ in self._tasks.follow(task, len(task.round.tokens)):
                    pass
        return tasks_pb2.StopTaskResponse(task=convert.task_info(task))

    async def DeleteTask(self, request: tasks_pb2.DeleteTaskRequest, context: Context) -> tasks_pb2.DeleteTaskResponse:
        await self._tasks.delete(request.task_id, force=request.force)
        return tasks_pb2.DeleteTaskResponse(task_id=request.task_id)

    async def ForkTask(self, request: tasks_pb2.ForkTaskRequest, context: Context) -> tasks_pb2.ForkTaskResponse:
        task = await self._tasks.fork(
            request.task_id,
            convert.optional_task_input(request.prompt, request.HasField("prompt")),
            convert.sampling_overrides(request.sampling),
            convert.task_kind(request.kind, TaskKind.PERSISTENT),
        )
        return tasks_pb2.ForkTaskResponse(task=self._task(task))

    async def ContinueTask(
        self, request: tasks_pb2.ContinueTaskRequest, context: Context
    ) -> tasks_pb2.ContinueTaskResponse:
        task = await self._tasks.continue_(
            request.task_id,
            convert.optional_task_input(request.prompt, request.HasField("prompt")),
            convert.sampling_overrides(request.sampling),
        )
        return tasks_pb2.ContinueTaskResponse(task=self._task(task))

    async def SaveTaskAsTemplate(
        self, request: tasks_pb2.SaveTaskAsTemplateRequest, context: Context
    ) -> tasks_pb2.SaveTaskAsTemplateResponse:
        return tasks_pb2.SaveTaskAsTemplateResponse(task=self._task(await self._tasks.as_template(request.task_id)))

    async def _create(self, request: tasks_pb2.CreateTaskRequest | tasks_pb2.CreateTaskStreamRequest) -> Task:
        kind = convert.task_kind(request.kind, TaskKind.TEMPORARY)
        return await self._tasks.create(kind, convert.task_input(request), convert.sampling_overrides(request.sampling))

    def _task(self, task: Task) -> tasks_pb2.Task:
        return convert.task(task, self._tasks.sampling(task))

    async def _follow(
        self, task: Task, from_token: int, response: type[StreamResponse]
    ) -> AsyncIterator[StreamResponse]:
        """The task's round as stream messages. A cancelled call ends here and the task goes on (following
        holds nothing but a wait on the round, so the abandoned iterator needs no closing)."""
        async for event in self._tasks.follow(task, from_token):
            yield response(**convert.task_event(event))
