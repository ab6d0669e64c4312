"""OpenAI request bodies: their JSON checked and turned into domain requests, every bad field named as OpenAI does.

Pydantic checks the types of the fields both endpoints know (unknown ones are ignored, as OpenAI clients send
many); polymorphic fields (message content, stop, prompt) are read here by hand so that an error names the
exact field, e.g. "messages[0].content[1].type". What this server cannot do is refused, never ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.domain.chat import ChatMessage, ChatRequest, ChatRole
from service.domain.completions import CompletionRequest
from service.domain.sampling import SamplingOverrides
from service.errors import FieldViolation, InvalidArgument

MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_CHOICES = 8  # /v1/completions: prompts times n (chat's n has the same bound in the domain)
_ROLES = {role.value: role for role in ChatRole}
_M = TypeVar("_M", bound=BaseModel)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _Body(BaseModel):
    """Fields both endpoints take. Unknown keys are ignored (clients send many); known ones are type-checked."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str = ""  # empty: the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stop: object = None  # a string or a list of strings
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # RWKV extensions (as RWKV-Server) and vLLM's.
    top_k: int | None = None
    penalty_decay: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def overrides(self, logprobs: bool | None, top_logprobs: int | None) -> SamplingOverrides:
        if self.logit_bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")
        return SamplingOverrides(
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            penalty_decay=self.penalty_decay,
            # OpenAI's seeds are signed 64-bit integers; the engine's random streams take unsigned ones.
            seed=self.seed % 2**64 if self.seed is not None and self.seed < 0 else self.seed,
            stop=_stops(self.stop),
            stop_token_ids=None if self.stop_token_ids is None else tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: object = None  # a string, null, or a list of content parts
    tool_calls: object = None
    function_call: object = None

    def to_domain(self, where: str) -> ChatMessage:
        if self.role in ("tool", "function"):
            raise _unsupported(f"{where}.role", f"{self.role!r} messages are not supported (no tool calling)")
        role = _ROLES.get(self.role)
        if role is None:
            raise InvalidArgument.for_field(f"{where}.role", "must be one of system, developer, user, assistant")
        for name in ("tool_calls", "function_call"):
            if getattr(self, name):
                raise _unsupported(f"{where}.{name}", "tool calls are not supported")
        return ChatMessage(role, _content(self.content, f"{where}.content"))


class ChatBody(_Body):
    messages: list[_Message]
    max_completion_tokens: int | None = None  # newer clients' name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, object] | None = None
    tools: object = None
    tool_choice: object = None
    functions: object = None
    function_call: object = None

    def to_request(self) -> ChatRequest:
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise _unsupported(name, f"{name} are not supported (no tool calling)")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise _unsupported(name, f"{name} is not supported (no tool calling)")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise _unsupported("response_format", "only {'type': 'text'} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument.for_field("top_logprobs", "requires logprobs: true")
        sampling = self.overrides(self.logprobs, self.top_logprobs)
        if self.max_completion_tokens is not None:
            sampling = replace(sampling, max_tokens=self.max_completion_tokens)
        return ChatRequest(
            messages=[m.to_domain(f"messages[{i}]") for i, m in enumerate(self.messages)],
            model=self.model,
            sampling=sampling,
            n=self.n,
            user=self.user or "",
        )

    def param_names(self) -> dict[str, str]:
        """Domain field names as this request calls them."""
        names = {"prompt": "messages"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return names


class CompletionBody(_Body):
    prompt: object = ""  # a string, a list of strings, token ids, or a list of token id lists
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = None

    def to_requests(self) -> list[CompletionRequest]:
        """One request per prompt (each is then run n times)."""
        if self.best_of is not None and self.best_of != self.n:
            raise _unsupported("best_of", "best_of other than n is not supported")
        if self.echo and self.logprobs is not None:
            raise _unsupported("echo", "echo with logprobs (the prompt's log-probabilities) is not supported")
        prompts = _prompts(self.prompt)
        if not 1 <= self.n <= MAX_CHOICES:
            raise InvalidArgument.for_field("n", f"must be in [1, {MAX_CHOICES}]")
        if len(prompts) * self.n > MAX_CHOICES:
            raise InvalidArgument.for_field("prompt", f"at most {MAX_CHOICES} choices (prompts times n) per request")
        sampling = self.overrides(None if self.logprobs is None else True, self.logprobs)
        return [
            CompletionRequest(
                model=self.model,
                text=p if isinstance(p, str) else None,
                tokens=p if isinstance(p, tuple) else None,
                suffix=self.suffix or "",
                sampling=sampling,
            )
            for p in prompts
        ]


def parse(model: type[_M], raw: bytes) -> _M:
    """The request body, or InvalidArgument naming every bad field (OpenAI answers 400, never 422)."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        bad = []
        for err in exc.errors(include_url=False):
            if err["type"] == "json_invalid":
                raise InvalidArgument(
                    f"the request body is not valid JSON ({err['msg']})", reason="INVALID_JSON"
                ) from None
            where = _location(err["loc"])
            if not where:
                raise InvalidArgument("the request body must be a JSON object", reason="INVALID_JSON") from None
            bad.append(FieldViolation(where, err["msg"]))
        raise InvalidArgument.for_fields(bad) from None


def _location(loc: Sequence[int | str]) -> str:
    """("messages", 0, "role") -> "messages[0].role", OpenAI's way of naming a nested parameter."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path


def _stops(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgument.for_field("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise InvalidArgument.for_field("stop", f"at most {MAX_STOPS} stop sequences")
    return tuple(stops)


def _content(content: object, where: str) -> str:
    """A message's text: a string, null (empty), or text parts (joined by newlines, as vLLM does)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidArgument.for_field(where, "must be a string, null or a list of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise _unsupported(f"{where}[{j}].type", f"only text content parts are supported, not {kind!r}")
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidArgument.for_field(f"{where}[{j}].text", "must be a string")
        texts.append(text)
    return "\n".join(texts)


def _prompts(prompt: object) -> list[str | tuple[int, ...]]:
    """/v1/completions prompts: text or token ids, one or a list of them."""

    def token_ids(value: object) -> bool:
        return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)

    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and token_ids(prompt):
        return [tuple(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or token_ids(p) for p in prompt):
        return [p if isinstance(p, str) else tuple(p) for p in prompt]
    raise InvalidArgument.for_field("prompt", "must be a string, a list of strings, or (lists of) token ids")


def _unsupported(field: str, message: str) -> InvalidArgument:
    return InvalidArgument.for_field(field, message, reason="UNSUPPORTED")
