"""The RWKV-Server Task API (/v1/tasks/...), as the rwkv-api SDK calls it: request and response shapes only.

Translates RWKV-Server's JSON (TaskCreate, FIMRequest, TaskUpdate; TaskResponseModel, TaskInfo) and its SSE
framing to and from service.domain.tasks; every decision about tasks is the TaskManager's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from service.domain.sampling import SamplingOverrides
from service.domain.task_state import RoundDelta, RoundEnded, RoundStarted, Task, TaskKind
from service.domain.tasks import TaskInput, TaskManager
from service.engine.tokenizer import VOCAB_SIZE
from service.errors import RwkvdError

from .errors import headers_of, status_of
from .sse import event, sse_response

PREFIX = "/v1/tasks"
LISTED_STORED_IDS = 100  # RWKV-Server truncates db_tasks to this many ids

# RWKV-Server's bounds (schemas.py); ids are checked here so a bad one is a 422 naming `prompt`, as a
# mistyped field would be (every model rwkvd loads has the World vocabulary).
TokenId = Annotated[int, Field(ge=0, lt=VOCAB_SIZE)]
Prompt = str | list[TokenId]
MaxTokens = Annotated[int, Field(ge=0, le=40960)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopK = Annotated[int, Field(ge=-1, le=100)]
TopP = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=0, le=10)]
Decay = Annotated[float, Field(ge=0, le=1)]
Seed = Annotated[int, Field(ge=0, lt=2**64)]  # what the engine's random streams take

SAMPLING_FIELDS = frozenset(
    {"max_tokens", "temperature", "top_k", "top_p", "presence_penalty", "repetition_penalty", "penalty_decay", "seed"}
)


class _Body(BaseModel):
    # strict: "1" for a number is a 422 (JSON ints still pass for floats); unknown keys too.
    model_config = ConfigDict(extra="forbid", strict=True)

    # Absent or null = the server's default (create) or the task's current value (fork, continue).
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: Penalty | None = None
    penalty_decay: Decay | None = None
    seed: Seed | None = None
    stream: bool = False

    def overrides(self) -> SamplingOverrides:
        """Only the fields the client gave."""
        return SamplingOverrides(**self.model_dump(include=set(SAMPLING_FIELDS), exclude_unset=True))


class TaskCreate(_Body):
    prompt: Prompt


class FIMRequest(_Body):
    prefix: str
    suffix: str = ""
    max_tokens: Annotated[int, Field(ge=1, le=40960)] | None = None  # a middle of nothing is refused


class TaskUpdate(_Body):
    prompt: Prompt | None = None  # None: generation resumes where the task stopped


class TaskResponseModel(BaseModel):
    task_id: str
    result: str
    prefill_time: float
    gen_time: float
    speed: float
    finished: bool


class TaskInfo(BaseModel):
    task_id: str
    generated_buf: int
    status: int  # TaskStatus as RWKV-Server numbers it: the SDK parses an IntEnum


class TaskList(BaseModel):
    cpu_cache_count: int
    database_count: int
    total_count: int
    cpu_tasks: list[str]
    db_tasks: list[str]


class _DomainErrorsRoute(APIRoute):
    """A domain error answers its table status with RWKV-Server's body, {"detail": message}; a malformed request
    FastAPI's 422, {"detail": [{loc, msg, input, ...}]}."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RwkvdError as exc:
                return JSONResponse({"detail": exc.message}, status_code=status_of(exc), headers=headers_of(exc))
            except RequestValidationError as exc:
                # FastAPI's own answer echoes each bad input, and JSON cannot hold the NaN or Infinity a body
                # may carry (Python's parser takes them): rendering those failed with a 500. Named as written.
                return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

        return handle


def _json_safe(value: Any) -> Any:
    """The value with every non-finite float as the text a client wrote for it ("NaN", "Infinity", "-Infinity")."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def create_router(tasks: TaskManager) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=_DomainErrorsRoute, tags=["tasks"])

    def reply(task: Task, stream: bool, from_token: int = 0) -> TaskResponseModel | StreamingResponse:
        return sse_response(_create_stream(tasks, task, from_token)) if stream else _result(task)

    @router.post("/tmp", response_model=None)
    async def create_tmp(body: TaskCreate) -> TaskResponseModel | StreamingResponse:
        task = await tasks.create(TaskKind.TEMPORARY, _prompt(body.prompt), body.overrides())
        return reply(task, body.stream)

    @router.post("/create", response_model=None)
    async def create_persistent(body: TaskCreate) -> TaskResponseModel | StreamingResponse:
        task = await tasks.create(TaskKind.PERSISTENT, _prompt(body.prompt), body.overrides())
        return reply(task, body.stream)

    @router.post("/fim", response_model=None)
    async def fim(body: FIMRequest) -> TaskResponseModel | StreamingResponse:
        task = await tasks.create(TaskKind.TEMPORARY, TaskInput(fim=(body.prefix, body.suffix)), body.overrides())
        return reply(task, body.stream)

    @router.get("/list")
    async def list_tasks() -> TaskList:
        listing = await tasks.list_tasks()
        return TaskList(
            cpu_cache_count=len(listing.memory_ids),
            database_count=len(listing.stored_ids),
            total_count=listing.total,
            cpu_tasks=listing.memory_ids,
            db_tasks=listing.stored_ids[:LISTED_STORED_IDS],
        )

    @router.get("/{task_id}/get_result")
    async def get_result(task_id: str) -> TaskResponseModel:
        return _result(await tasks.get(task_id))

    @router.get("/{task_id}/status")
    async def status(task_id: str) -> TaskInfo:
        return _info(await tasks.get(task_id))

    # No body parameter: the SDK sends "{}" with this GET, and it is ignored.
    @router.get("/{task_id}/stream", response_model=None)
    async def subscribe(task_id: str, pos: Annotated[int, Query(ge=0)] = 0) -> StreamingResponse:
        task = await tasks.get(task_id)
        return sse_response(_subscribe_stream(tasks, task, pos))

    @router.post("/{task_id}/fork", response_model=None)
    async def fork(task_id: str, body: TaskUpdate, tmp: bool = False) -> TaskResponseModel | StreamingResponse:
        kind = TaskKind.TEMPORARY if tmp else TaskKind.PERSISTENT
        task = await tasks.fork(task_id, _maybe_prompt(body.prompt), body.overrides(), kind)
        # A stream shows what this call generates; a fork without prompt starts with its source's text.
        return reply(task, body.stream, task.request_base)

    @router.post("/{task_id}/continue", response_model=None)
    async def continue_(task_id: str, body: TaskUpdate) -> TaskResponseModel | StreamingResponse:
        task = await tasks.continue_(task_id, _maybe_prompt(body.prompt), body.overrides())
        return reply(task, body.stream, task.request_base)

    @router.post("/{task_id}/stop")
    async def stop(task_id: str) -> TaskInfo:
        return _info(await tasks.stop(task_id))

    @router.post("/{task_id}/as_template")
    async def as_template(task_id: str) -> TaskResponseModel:
        return _result(await tasks.as_template(task_id))

    @router.post("/{task_id}/delete")
    async def delete(task_id: str, force: bool = False) -> TaskInfo:
        task = await tasks.get(task_id)
        await tasks.delete(task_id, force=force)
        return _info(task)

    return router


def _result(task: Task) -> TaskResponseModel:
    """The current round: its text so far; timings once it has finished (RWKV-Server reports 0 before)."""
    r = task.round
    gen_time = r.timings.generation_seconds if r.finished else 0.0
    return TaskResponseModel(
        task_id=task.id,
        result=r.text,
        prefill_time=r.prefill_seconds,
        gen_time=gen_time,
        speed=_speed(task) if r.finished else 0.0,
        finished=r.finished,
    )


def _info(task: Task) -> TaskInfo:
    return TaskInfo(task_id=task.id, generated_buf=len(task.round.tokens), status=int(task.status))


def _speed(task: Task) -> float:
    """This task's tokens per second in its last generation.

    The first token comes out of the prefill step, so the decode rate counts the tokens after it; a
    single token is rated over the step that made it.
    """
    r = task.round
    n, t = r.usage.completion_tokens, r.timings
    if n > 1 and t.generation_seconds > 0:
        return t.tokens_per_second(n)
    if n >= 1 and t.prefill_seconds > 0:
        return n / (t.prefill_seconds + t.generation_seconds)
    return 0.0


def _prompt(prompt: Prompt) -> TaskInput:
    return TaskInput(text=prompt) if isinstance(prompt, str) else TaskInput(tokens=tuple(prompt))


def _maybe_prompt(prompt: Prompt | None) -> TaskInput | None:
    return None if prompt is None else _prompt(prompt)


def _json(payload: dict[str, Any]) -> bytes:
    # ASCII escapes keep the wire independent of any charset a client might assume.
    return event(json.dumps(payload))


DONE = event("[DONE]")


async def _create_stream(tasks: TaskManager, task: Task, from_token: int) -> AsyncIterator[bytes]:
    """A create/fim/fork/continue reply: the id and prefill time, then text with per-chunk timing.

    Only this subscription ends if the client goes away: the task runs on and stays pollable.
    """
    last = time.monotonic()
    async for ev in tasks.follow(task, from_token):
        if isinstance(ev, RoundStarted):
            last = time.monotonic()
            yield _json({"task_id": task.id, "prefill_time": ev.prefill_seconds})
        elif isinstance(ev, RoundDelta) and ev.text:
            now = time.monotonic()
            elapsed, last = now - last, now
            speed = len(ev.token_ids) / elapsed if elapsed > 0 else 0.0
            yield _json({"data": ev.text, "task_id": task.id, "gen_time": elapsed, "speed": speed})
        elif isinstance(ev, RoundEnded) and ev.error is not None:
            yield _error(task, ev)
    yield DONE


async def _subscribe_stream(tasks: TaskManager, task: Task, pos: int) -> AsyncIterator[bytes]:
    """GET .../stream: the current round from token `pos`, then live, as RWKV-Server's {"data": text}."""
    async for ev in tasks.follow(task, pos):
        if isinstance(ev, RoundStarted):
            yield _json({"task_id": task.id, "prefill_time": ev.prefill_seconds})
        elif isinstance(ev, RoundDelta) and ev.text:
            yield _json({"data": ev.text})
        elif isinstance(ev, RoundEnded) and ev.error is not None:
            yield _error(task, ev)
    yield DONE


def _error(task: Task, ev: RoundEnded) -> bytes:
    # The SDK skips it (the stream just ends); raw clients see why.
    return _json({"error": {"message": ev.error, "finish_reason": ev.finish_reason.value, "task_id": task.id}})
