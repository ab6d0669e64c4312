"""The OpenAI-compatible API: /v1/models, /v1/chat/completions and /v1/completions, as the openai SDK calls them.

Translation only: OpenAI's request JSON becomes ChatRequest / CompletionRequest (service.domain does the
work); results and engine events become OpenAI's JSON and data-only SSE chunks; every domain error becomes
OpenAI's {"error": {...}} body with the table's status (`_error_response`, nowhere else). Request bodies are
read in openai_requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from service.domain.chat import ChatCompletions, ChatResult, ChoiceEvent, PreparedChat, chat_usage
from service.domain.completions import Completions
from service.domain.models import resolve_model
from service.engine.protocol import (
    Delta,
    EngineClient,
    Finished,
    FinishReason,
    GenerationRequest,
    Started,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from service.errors import Cancelled, DeadlineExceeded, ErrorKind, InternalError, RwkvdError, Unavailable

from . import sse
from .errors import headers_of, status_of
from .openai_requests import ChatBody, CompletionBody, parse

log = logging.getLogger("rwkvd.http")

# OpenAI's stand-in for the log-probability of a token that cannot be sampled (JSON has no -Infinity).
IMPOSSIBLE_LOGPROB = -9999.0
FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.STOP_SEQUENCE: "stop", FinishReason.LENGTH: "length"}
# OpenAI's names for some of our reasons; the others go out lower-cased (stable and machine-readable).
_CODES = {
    "MODEL_NOT_FOUND": "model_not_found",
    "PROMPT_TOO_LONG": "context_length_exceeded",
    "QUEUE_FULL": "rate_limit_exceeded",
}
_T = TypeVar("_T")


def create_router(engine: EngineClient, chat: ChatCompletions, completions: Completions) -> APIRouter:
    router = APIRouter(route_class=_OpenAIRoute, tags=["openai"])

    @router.get("/v1/models", summary="The served model and its aliases")
    async def list_models() -> dict[str, object]:
        m = engine.model
        return {"object": "list", "data": [_model_json(engine, name) for name in (m.id, *m.aliases)]}

    # One path segment: "owner/name" ids are Replicate's GET /v1/models/{owner}/{name}; aliases and versions work.
    @router.get("/v1/models/{model_id}", summary="The served model by alias or version")
    async def get_model(model_id: str) -> dict[str, object]:
        resolve_model(engine, model_id)
        return _model_json(engine, model_id)

    @router.post("/v1/chat/completions", summary="Chat completion, whole or streamed", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = parse(ChatBody, await request.body())
        try:
            prepared = chat.prepare(body.to_request())
            if not body.stream:
                result = await _unless_client_leaves(request, chat.complete(prepared))
                return JSONResponse(_chat_json(result, prepared.params.logprobs))
            events = chat.stream(prepared)
            # The first event (the prompt read) before any byte: refusals still get their own status.
            first = await _unless_client_leaves(request, anext(events))
            return sse.sse_response(_chat_chunks(prepared, first, events, body.include_usage))
        except RwkvdError as exc:
            return _error_response(exc, body.param_names())

    @router.post("/v1/completions", summary="Text completion, whole or streamed", response_model=None)
    async def text_completions(request: Request) -> Response:
        body = parse(CompletionBody, await request.body())
        try:
            run = _CompletionRun(completions, engine, body)
            if not body.stream:
                return JSONResponse(await _unless_client_leaves(request, run.complete()))
            events = run.events()
            first = await _unless_client_leaves(request, anext(events))
            return sse.sse_response(run.chunks(first, events, body.include_usage))
        except RwkvdError as exc:
            return _error_response(exc, {"top_logprobs": "logprobs"})

    return router


class _OpenAIRoute(APIRoute):
    """Routes whose every failure comes back in OpenAI's error shape (never FastAPI's 422 or a bare 500)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RwkvdError as exc:
                return _error_response(exc)
            except ClientDisconnect:
                raise  # gone while sending its body: nobody to answer
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return _error_response(InternalError("internal error"))

        return handle


# Errors


def _error_response(error: RwkvdError, names: dict[str, str] | None = None) -> JSONResponse:
    """The one mapping of domain errors to OpenAI's error body; the status comes from the error table."""
    headers = headers_of(error)
    if error.kind not in (ErrorKind.RESOURCE_EXHAUSTED, ErrorKind.UNAVAILABLE):
        # The SDK retries 5xx and 409 twice by default: a bad request or a failed generation would only repeat.
        headers["x-should-retry"] = "false"
    return JSONResponse({"error": _error_json(error, names or {})}, status_code=status_of(error), headers=headers)


def _error_json(error: RwkvdError, names: dict[str, str]) -> dict[str, object]:
    status = status_of(error)
    if error.kind is ErrorKind.RESOURCE_EXHAUSTED:
        kind = "requests"  # what OpenAI calls a requests-per-time limit (its token limits are "tokens")
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    param, message = None, error.message
    if error.violations:
        param = _param(error.violations[0].field, names)
        message = "; ".join(f"{_param(v.field, names)}: {v.description}" for v in error.violations)
    elif error.reason == "MODEL_NOT_FOUND":
        param = "model"
    return {"message": message, "type": kind, "param": param, "code": _CODES.get(error.reason, error.reason.lower())}


def _param(field: str, names: dict[str, str]) -> str:
    """A domain field path in OpenAI's naming (sampling fields are top-level here)."""
    field = field.removeprefix("sampling.")
    return names.get(field, field)


def _failure(reason: FinishReason, error: str | None) -> RwkvdError | None:
    """What a generation that did not end normally is reported as; None when it did."""
    if reason in FINISH_REASONS:
        return None
    if reason is FinishReason.CANCELLED:  # only the engine stopping cancels a request a client still reads
        return Unavailable("the generation was cancelled: the server is stopping", reason="CANCELLED", retry_after=1)
    if reason is FinishReason.DEADLINE:
        return DeadlineExceeded("the deadline passed during generation", reason="DEADLINE_EXCEEDED")
    return InternalError(error or "generation failed", reason="GENERATION_FAILED")


async def _unless_client_leaves(request: Request, work: Awaitable[_T]) -> _T:
    """Awaits `work`, cancelling it if the client hangs up first: an abandoned request frees its engine slots.

    Starlette notices a disconnect only while it streams; this covers the time before a response starts
    (queueing and prefill, or all of a non-streamed generation).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # its finally blocks abort the generation
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise Cancelled("the client closed the connection", reason="CLIENT_CLOSED")
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body has been read: what the server receives next is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# Responses


def _sse(payload: dict[str, Any]) -> bytes:
    return sse.event(json.dumps(payload, separators=(",", ":"), allow_nan=False))


DONE = sse.event("[DONE]")


def _error_event(error: Exception) -> bytes:
    """A failure after the stream began: OpenAI's error object as the last event (the SDK raises APIError)."""
    if not isinstance(error, RwkvdError):
        log.error("an OpenAI stream failed", exc_info=error)
        error = InternalError("internal error")
    return _sse({"error": _error_json(error, {})})


def _usage_json(usage: Usage) -> dict[str, object]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _model_json(engine: EngineClient, name: str) -> dict[str, object]:
    m = engine.model
    return {"id": name, "object": "model", "created": int(m.load_time), "owned_by": m.id.split("/")[0]}


def _token_text(token: bytes) -> str:
    # A token may hold part of a UTF-8 character: `bytes` is exact, the text shows partial bytes escaped.
    return token.decode("utf-8", errors="backslashreplace")


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else IMPOSSIBLE_LOGPROB


def _chat_logprobs(logprobs: Sequence[TokenLogprob]) -> dict[str, object]:
    """OpenAI's choices[].logprobs: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    content = [
        {
            "token": _token_text(lp.token),
            "logprob": _logprob(lp.logprob),
            "bytes": list(lp.token),
            "top_logprobs": [{"token": _token_text(b), "logprob": _logprob(p), "bytes": list(b)} for _, b, p in lp.top],
        }
        for lp in logprobs
    ]
    return {"content": content, "refusal": None}


def _chat_json(result: ChatResult, logprobs: bool) -> dict[str, object]:
    choices = []
    for c in result.choices:
        failure = _failure(c.finish_reason, c.error)
        if failure is not None:
            raise failure  # OpenAI's response has no place for one failed choice among others
        choices.append(
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": _chat_logprobs(c.logprobs) if logprobs else None,
                "finish_reason": FINISH_REASONS[c.finish_reason],
            }
        )
    return {
        "id": result.id,
        "object": "chat.completion",
        "created": int(result.created),
        "model": result.model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": _usage_json(result.usage),
    }


async def _chat_chunks(
    chat: PreparedChat, first: ChoiceEvent, events: AsyncGenerator[ChoiceEvent, None], include_usage: bool
) -> AsyncIterator[bytes]:
    """chat.completion.chunk events: a role chunk per choice, content deltas, finish chunks, usage, [DONE].

    Closing this (a client that hung up) closes the domain stream, which aborts every choice still running.
    """
    head = {
        "id": chat.id,
        "object": "chat.completion.chunk",
        "created": int(chat.created),
        "model": chat.model,
        "system_fingerprint": None,
    }

    def chunk(index: int, delta: dict[str, str], logprobs: object = None, finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**head, "choices": [choice], "usage": None})

    started: Started | None = None
    ends: dict[int, Finished] = {}
    async with aclosing(events):
        item: ChoiceEvent | None = first
        try:
            while item is not None:
                event = item.event
                if isinstance(event, Started):  # one for all choices: they fork from one prefill
                    started = event
                    for index in range(chat.n):
                        yield chunk(index, {"role": "assistant", "content": ""})
                elif isinstance(event, Delta):
                    if event.text or event.logprobs:
                        logprobs = _chat_logprobs(event.logprobs) if chat.params.logprobs else None
                        yield chunk(item.index, {"content": event.text}, logprobs)
                else:
                    failure = _failure(event.reason, event.error)
                    if failure is not None:
                        yield _error_event(failure)
                        return
                    ends[item.index] = event
                    yield chunk(item.index, {}, finish=FINISH_REASONS[event.reason])
                item = await anext(events, None)
        except Exception as exc:  # the status line is sent: the error can only go in the stream
            yield _error_event(exc)
            return
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage_json(chat_usage(chat, started, ends.values()))})
    yield DONE


class _CompletionRun:
    """One /v1/completions request: every prompt n times, run at once, choice index = prompt * n + i."""

    def __init__(self, completions: Completions, engine: EngineClient, body: CompletionBody) -> None:
        self._completions = completions
        self._n = body.n
        self._logprobs = body.logprobs
        run_id = f"cmpl-{uuid.uuid4().hex}"
        self._head = {
            "id": run_id,
            "object": "text_completion",  # chunks too, as OpenAI sends them
            "created": int(time.time()),
            "model": completions.model_id,
            "system_fingerprint": None,
        }
        self._generations: list[GenerationRequest] = []
        self._echoes: list[str] = []
        for p, request in enumerate(body.to_requests()):
            prepared = completions.prepare(request)  # raises before anything runs
            echo = ""
            if body.echo:
                echo = request.text if request.text is not None else engine.tokenizer.decode(request.tokens or ())
            seed = prepared.sampling.seed
            for i in range(body.n):
                sampling = prepared.sampling if seed is None else replace(prepared.sampling, seed=(seed + i) % 2**64)
                self._generations.append(replace(prepared, request_id=f"{run_id}-{p * body.n + i}", sampling=sampling))
                self._echoes.append(echo)

    def events(self) -> AsyncGenerator[tuple[int, TokenEvent], None]:
        return _merge([self._completions.stream(g) for g in self._generations])

    async def complete(self) -> dict[str, object]:
        texts: list[list[str]] = [[] for _ in self._generations]
        logprobs: list[list[TokenLogprob]] = [[] for _ in self._generations]
        ends: dict[int, Finished] = {}
        async with aclosing(self.events()) as events:
            async for k, event in events:
                if isinstance(event, Delta):
                    texts[k].append(event.text)
                    logprobs[k].extend(event.logprobs)
                elif isinstance(event, Finished):
                    failure = _failure(event.reason, event.error)
                    if failure is not None:
                        raise failure
                    ends[k] = event
        choices = [
            {
                "text": echo + "".join(texts[k]),
                "index": k,
                "logprobs": self._logprobs_json(logprobs[k], len(echo)),
                "finish_reason": FINISH_REASONS[ends[k].reason],
            }
            for k, echo in enumerate(self._echoes)
        ]
        return {**self._head, "choices": choices, "usage": _usage_json(self._usage(ends))}

    async def chunks(
        self, first: tuple[int, TokenEvent], events: AsyncGenerator[tuple[int, TokenEvent], None], include_usage: bool
    ) -> AsyncIterator[bytes]:
        """text_completion chunks: echoed prompts, text deltas, a finish chunk per choice, usage, [DONE]."""

        def chunk(k: int, text: str, logprobs: object = None, finish: str | None = None) -> bytes:
            choice = {"text": text, "index": k, "logprobs": logprobs, "finish_reason": finish}
            return _sse({**self._head, "choices": [choice], "usage": None})

        offsets = [len(echo) for echo in self._echoes]
        ends: dict[int, Finished] = {}
        async with aclosing(events):
            item: tuple[int, TokenEvent] | None = first
            try:
                while item is not None:
                    k, event = item
                    if isinstance(event, Started):
                        if self._echoes[k]:
                            yield chunk(k, self._echoes[k])
                    elif isinstance(event, Delta):
                        if event.text or event.logprobs:
                            yield chunk(k, event.text, self._logprobs_json(event.logprobs, offsets[k]))
                            offsets[k] += len(event.text)
                    else:
                        failure = _failure(event.reason, event.error)
                        if failure is not None:
                            yield _error_event(failure)
                            return
                        ends[k] = event
                        yield chunk(k, "", finish=FINISH_REASONS[event.reason])
                    item = await anext(events, None)
            except Exception as exc:  # the status line is sent: the error can only go in the stream
                yield _error_event(exc)
                return
        if include_usage:
            yield _sse({**self._head, "choices": [], "usage": _usage_json(self._usage(ends))})
        yield DONE

    def _usage(self, ends: dict[int, Finished]) -> Usage:
        """Each prompt counted once (n choices share it), every choice's completion summed."""
        firsts = [e.usage for k, e in ends.items() if k % self._n == 0]
        return Usage(
            prompt_tokens=sum(u.prompt_tokens for u in firsts),
            completion_tokens=sum(e.usage.completion_tokens for e in ends.values()),
            cached_tokens=sum(u.cached_tokens for u in firsts),
        )

    def _logprobs_json(self, logprobs: Sequence[TokenLogprob], offset: int) -> dict[str, object] | None:
        """The legacy shape: parallel lists; top_logprobs has the chosen token and up to `logprobs` others."""
        if self._logprobs is None:
            return None
        tokens = [_token_text(lp.token) for lp in logprobs]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [_logprob(lp.logprob) for lp in logprobs],
            "top_logprobs": [
                {_token_text(lp.token): _logprob(lp.logprob)} | {_token_text(b): _logprob(p) for _, b, p in lp.top}
                for lp in logprobs
            ],
            "text_offset": offsets,
        }


async def _merge(streams: Sequence[AsyncGenerator[TokenEvent, None]]) -> AsyncGenerator[tuple[int, TokenEvent], None]:
    """The events of several streams in arrival order, tagged with the stream's index; an error in one ends all.

    Closing it closes every stream (each aborts its generation).
    """
    if len(streams) == 1:  # the usual case, without a task per stream
        async with aclosing(streams[0]) as only:
            async for event in only:
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, TokenEvent] | Exception | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[TokenEvent, None]) -> None:
        try:
            async with aclosing(stream):
                async for event in stream:
                    await queue.put((index, event))
        except Exception as exc:  # handed to the reader, which raises it
            await queue.put(exc)
            return
        await queue.put(None)

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # one whose pump never ran still needs closing
