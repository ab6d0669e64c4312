"""Chat completions: structured messages in the RWKV chat format, one or several choices, streamed or whole.

Each message is tokenized on its own and the prompt is their concatenation, so a conversation that
repeats an earlier one's messages repeats their tokens exactly: the engine's prefix cache then starts
it from the cached state (snapshots are taken after the system messages and after the last message,
the two prefixes the next request of the usual stateless chat pattern shares). Several choices are
forked from one prefilled state, not prefilled n times. Shared by gRPC ChatService and OpenAI HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import uuid
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field, replace

from service.engine.protocol import (
    Delta,
    EngineClient,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Started,
    StateRef,
    Timings,
    TokenEvent,
    TokenLogprob,
    TokenStream,
    Usage,
)
from service.errors import FieldViolation, InternalError, InvalidArgument

from .models import resolve_model
from .prompts import ASSISTANT_OPEN, CHAT_STOPS, render_turn
from .sampling import SamplingOverrides

# RWKV-friendly defaults (as ChatRWKV): nucleus 0.3, mild decaying penalties against loops.
CHAT_DEFAULTS = SamplingParams(
    max_tokens=1024,
    temperature=1.0,
    top_p=0.3,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    penalty_decay=0.996,
    stop=CHAT_STOPS,
)
MAX_CHOICES = 8


class ChatRole(enum.Enum):
    SYSTEM = "system"
    DEVELOPER = "developer"  # OpenAI's newer name for system instructions
    USER = "user"
    ASSISTANT = "assistant"

    @property
    def speaker(self) -> str:
        """The name the RWKV chat format gives this role."""
        return {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}[self.value]


@dataclass(frozen=True)
class ChatMessage:
    role: ChatRole
    content: str


@dataclass(frozen=True)
class ChatRequest:
    messages: Sequence[ChatMessage]
    model: str = ""
    sampling: SamplingOverrides = field(default_factory=SamplingOverrides)
    n: int = 1
    user: str = ""
    deadline: float | None = None  # time.monotonic()


@dataclass(frozen=True)
class PreparedChat:
    """A checked chat request, ready to run: everything a client could get wrong has been refused."""

    id: str
    model: str
    created: float
    prompt: tuple[int, ...]
    cache_points: tuple[int, ...]
    params: SamplingParams
    n: int
    deadline: float | None


@dataclass(frozen=True)
class ChoiceEvent:
    """An engine event of one choice (Started events are merged into the first one)."""

    index: int
    event: TokenEvent


@dataclass(frozen=True)
class ChatChoice:
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...]
    error: str | None = None


@dataclass(frozen=True)
class ChatResult:
    id: str
    model: str
    created: float
    choices: tuple[ChatChoice, ...]
    usage: Usage
    timings: Timings
    seed: int


class ChatCompletions:
    def __init__(self, engine: EngineClient, defaults: SamplingParams = CHAT_DEFAULTS) -> None:
        self._engine = engine
        self._defaults = defaults

    def prepare(self, request: ChatRequest) -> PreparedChat:
        model = resolve_model(self._engine, request.model)
        if not request.messages:
            raise InvalidArgument.for_field("messages", "at least one message is required")
        if not 1 <= request.n <= MAX_CHOICES:
            raise InvalidArgument.for_field("n", f"must be in [1, {MAX_CHOICES}]")
        params = request.sampling.resolve(self._defaults)
        if request.sampling.stop is not None:  # the client's stops come on top of the turn boundary
            params = replace(params, stop=(*CHAT_STOPS, *request.sampling.stop))
        tokenizer = self._engine.tokenizer
        prompt: list[int] = []
        points: list[int] = []
        for i, message in enumerate(request.messages):
            prompt += tokenizer.encode(render_turn(message.role.speaker, message.content))
            if message.role in (ChatRole.SYSTEM, ChatRole.DEVELOPER) and (
                i + 1 == len(request.messages)
                or request.messages[i + 1].role not in (ChatRole.SYSTEM, ChatRole.DEVELOPER)
            ):
                points.append(len(prompt))  # end of the instructions: shared by every conversation using them
        points.append(len(prompt))  # end of the messages: the next turn of this conversation starts with them
        prompt += tokenizer.encode(ASSISTANT_OPEN)
        try:
            self._engine.check(GenerationRequest("check", tuple(prompt), params))  # refuse now, not mid-stream
        except InvalidArgument as exc:
            raise prompt_as(exc, "messages") from None
        return PreparedChat(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            model=model.id,
            created=time.time(),
            prompt=tuple(prompt),
            cache_points=tuple(sorted(set(points))),
            params=params,
            n=request.n,
            deadline=request.deadline,
        )

    async def stream(self, chat: PreparedChat) -> AsyncGenerator[ChoiceEvent, None]:
        """Events of every choice as they come; closing the iterator aborts whatever still runs."""
        if chat.n == 1:
            stream = self._engine.generate(self._request(chat, f"{chat.id}-0", chat.prompt, chat.params))
            async with contextlib.aclosing(stream):
                async for event in stream:
                    yield ChoiceEvent(0, event)
            return
        # Read the prompt once (max_tokens 0 keeps its last token pending), then fork every choice from it.
        prefill = self._request(chat, f"{chat.id}-prefill", chat.prompt, replace(chat.params, max_tokens=0))
        prefill = replace(prefill, keep_state=True)
        started: Started | None = None
        state: StateRef | None = None
        async with contextlib.aclosing(self._engine.generate(prefill)) as events:
            async for event in events:
                if isinstance(event, Started):
                    started = event
                elif isinstance(event, Finished):
                    if event.state is None:
                        raise InternalError(event.error or "the prompt could not be read", reason="GENERATION_FAILED")
                    state = event.state
        if started is None or state is None:
            raise InternalError("the prompt was not read", reason="GENERATION_FAILED")
        yield ChoiceEvent(0, started)
        streams = [
            self._engine.generate(
                replace(
                    self._request(chat, f"{chat.id}-{i}", (), self._choice_params(chat.params, i)),
                    start_state=state,
                    use_prefix_cache=False,
                )
            )
            for i in range(chat.n)
        ]
        async for item in _merge(streams):
            if not isinstance(item.event, Started):  # one Started (the prefill's) stands for all
                yield item

    async def complete(self, chat: PreparedChat) -> ChatResult:
        texts: list[list[str]] = [[] for _ in range(chat.n)]
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(chat.n)]
        ends: dict[int, Finished] = {}
        started: Started | None = None
        async with contextlib.aclosing(self.stream(chat)) as events:
            async for item in events:
                event = item.event
                if isinstance(event, Started):
                    started = event
                elif isinstance(event, Delta):
                    texts[item.index].append(event.text)
                    logprobs[item.index].extend(event.logprobs)
                else:
                    ends[item.index] = event
        choices = tuple(
            ChatChoice(i, "".join(texts[i]), ends[i].reason, tuple(logprobs[i]), ends[i].error) for i in range(chat.n)
        )
        if all(c.finish_reason is FinishReason.ERROR for c in choices):
            raise InternalError(choices[0].error or "generation failed", reason="GENERATION_FAILED")
        first = ends[0]
        return ChatResult(
            id=chat.id,
            model=chat.model,
            created=chat.created,
            choices=choices,
            usage=chat_usage(chat, started, ends.values()),
            timings=first.timings,
            seed=first.seed,
        )

    def _request(
        self, chat: PreparedChat, request_id: str, prompt: tuple[int, ...], params: SamplingParams
    ) -> GenerationRequest:
        return GenerationRequest(
            request_id=request_id,
            prompt=prompt,
            sampling=params,
            cache_points=chat.cache_points if prompt else (),
            deadline=chat.deadline,
        )

    @staticmethod
    def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
        """A distinct random stream per choice: seed + index when a seed is given, else each its own."""
        return params if params.seed is None else replace(params, seed=(params.seed + index) % 2**64)


def prompt_as(error: InvalidArgument, field: str) -> InvalidArgument:
    """The engine's error about its token prompt ("prompt"), naming instead the request field the prompt was made
    from (a chat's messages, a session's history or turn); other violations are kept as they are."""
    if not any(v.field == "prompt" for v in error.violations):
        return error
    renamed = [FieldViolation(field, v.description) if v.field == "prompt" else v for v in error.violations]
    return InvalidArgument.for_fields(renamed, reason=error.reason)


def chat_usage(chat: PreparedChat, started: Started | None, ends: Iterable[Finished]) -> Usage:
    """The prompt counted once, the completions summed (OpenAI's accounting for n choices)."""
    return Usage(
        prompt_tokens=len(chat.prompt),
        completion_tokens=sum(e.usage.completion_tokens for e in ends),
        cached_tokens=started.cached_tokens if started else 0,
    )


async def _merge(streams: list[TokenStream]) -> AsyncGenerator[ChoiceEvent, None]:
    """The events of several streams in arrival order, each tagged with its stream's index."""
    queue: asyncio.Queue[ChoiceEvent | None] = asyncio.Queue()

    async def pump(index: int, stream: TokenStream) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for event in stream:
                    await queue.put(ChoiceEvent(index, event))
        except Exception as exc:  # this choice alone fails; it still ends, as every choice must
            failed = Finished(
                f"choice-{index}", FinishReason.ERROR, Usage(0, 0, 0), Timings(0, 0, 0, 0), 0, None, str(exc)
            )
            await queue.put(ChoiceEvent(index, failed))
        finally:
            await queue.put(None)

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(pumps)
        while open_streams:
            item = await queue.get()
            if item is None:
                open_streams -= 1
            else:
                yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # a stream never iterated still holds its engine request
