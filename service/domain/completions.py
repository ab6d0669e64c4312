"""Plain completions: a prompt (text or token ids, optionally fill-in-the-middle) continued by the engine.

Shared by gRPC CompletionService and, later, OpenAI /v1/completions. The prompt is read verbatim.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field

from service.engine.protocol import (
    Delta,
    EngineClient,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Timings,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from service.errors import DeadlineExceeded, InternalError, InvalidArgument

from .models import resolve_model
from .prompts import fim_prompt
from .sampling import COMPLETION_DEFAULTS, SamplingOverrides


@dataclass(frozen=True)
class CompletionRequest:
    model: str = ""
    text: str | None = None
    tokens: tuple[int, ...] | None = None
    suffix: str = ""
    sampling: SamplingOverrides = field(default_factory=SamplingOverrides)
    deadline: float | None = None  # time.monotonic()


@dataclass(frozen=True)
class CompletionResult:
    id: str
    model: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    seed: int
    logprobs: tuple[TokenLogprob, ...]


class Completions:
    def __init__(self, engine: EngineClient, defaults: SamplingParams = COMPLETION_DEFAULTS) -> None:
        self._engine = engine
        self._defaults = defaults

    @property
    def model_id(self) -> str:
        return self._engine.model.id

    def prepare(self, request: CompletionRequest) -> GenerationRequest:
        """Validates and tokenizes; raises before anything runs, so callers can answer with a clean error."""
        resolve_model(self._engine, request.model)
        if request.text is not None and request.tokens is not None:
            raise InvalidArgument.for_field("prompt", "give text or token ids, not both")
        if request.suffix:
            if request.text is None:
                raise InvalidArgument.for_field("suffix", "fill-in-the-middle needs a text prompt")
            tokens = self._engine.tokenizer.encode(fim_prompt(request.text, request.suffix))
        elif request.tokens is not None:
            tokens = list(request.tokens)
        else:
            tokens = self._engine.tokenizer.encode(request.text or "")
        prepared = GenerationRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            prompt=tuple(tokens),
            sampling=request.sampling.resolve(self._defaults),
            deadline=request.deadline,
        )
        self._engine.check(prepared)  # refuse now, not once a stream has started
        return prepared

    async def stream(self, prepared: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """Engine events of a prepared completion; closing the iterator early aborts it.

        A generation ended by the request's deadline raises DeadlineExceeded instead of finishing: the
        client's deadline has passed, and that is what it must be told, whichever side noticed first.
        """
        async with aclosing(self._engine.generate(prepared)) as events:
            async for event in events:
                if isinstance(event, Finished) and event.reason is FinishReason.DEADLINE:
                    raise _deadline_passed(event)
                yield event

    async def complete(self, prepared: GenerationRequest) -> CompletionResult:
        text: list[str] = []
        tokens: list[int] = []
        logprobs: list[TokenLogprob] = []
        async with aclosing(self._engine.generate(prepared)) as events:
            async for event in events:
                if isinstance(event, Delta):
                    text.append(event.text)
                    tokens.extend(event.token_ids)
                    logprobs.extend(event.logprobs)
                elif isinstance(event, Finished):
                    if event.reason is FinishReason.DEADLINE:
                        raise _deadline_passed(event)
                    if event.reason is FinishReason.ERROR:
                        raise InternalError(event.error or "generation failed", reason="GENERATION_FAILED")
                    return CompletionResult(
                        id=prepared.request_id,
                        model=self.model_id,
                        text="".join(text),
                        token_ids=tuple(tokens),
                        finish_reason=event.reason,
                        usage=event.usage,
                        timings=event.timings,
                        seed=event.seed,
                        logprobs=tuple(logprobs),
                    )
        raise InternalError("the engine ended a request without a result", reason="NO_RESULT")


def _deadline_passed(event: Finished) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"the deadline passed after {event.usage.completion_tokens} generated tokens", reason="DEADLINE_EXCEEDED"
    )
