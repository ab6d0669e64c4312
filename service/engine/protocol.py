"""What the layers above see of the engine: requests, events, state handles and the EngineClient protocol.

The engine speaks token ids; these types carry them plus the UTF-8-safe text the engine decodes at its
edge. The domain depends on `EngineClient`, never on the concrete engine. No torch here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from service.errors import AlreadyExists, FieldViolation, InvalidArgument, ResourceExhausted, Unavailable

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20


class FinishReason(enum.Enum):
    STOP = "stop"  # end of text or a stop token id
    STOP_SEQUENCE = "stop_sequence"
    LENGTH = "length"  # max_tokens reached (0 = prefill only)
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """Fully resolved sampling and stopping parameters of one generation (defaults are neutral)."""

    max_tokens: int = 256
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus mass; 0 keeps only the most likely token
    top_k: int = 0  # 0 or -1: no limit
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 0.0
    penalty_decay: float = 1.0
    # Hugging Face style (Replicate inputs): generated tokens' logits divided by it when positive,
    # multiplied when negative; 1 = off.
    multiplicative_repetition_penalty: float = 1.0
    seed: int | None = None  # None: the engine picks one and reports it
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def has_penalties(self) -> bool:
        """Whether the sampler must track this row's generated tokens."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty
            or self.multiplicative_repetition_penalty != 1.0
        )

    def violations(self, prefix: str, vocab_size: int, max_tokens_limit: int) -> list[FieldViolation]:
        """Every out-of-range field, named `<prefix>.<field>`."""
        bad: list[FieldViolation] = []

        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                bad.append(FieldViolation(f"{prefix}.{name}" if prefix else name, why))

        check(0 <= self.max_tokens <= max_tokens_limit, "max_tokens", f"must be in [0, {max_tokens_limit}]")
        max_ok = 0 <= self.max_tokens <= max_tokens_limit  # else min_tokens is not compared with it
        check(
            self.min_tokens >= 0 and (not max_ok or self.min_tokens <= self.max_tokens),
            "min_tokens",
            "must be in [0, max_tokens]",
        )
        check(0.0 <= self.temperature <= 5.0, "temperature", "must be in [0, 5]")
        check(0.0 <= self.top_p <= 1.0, "top_p", "must be in [0, 1]")
        check(-1 <= self.top_k <= vocab_size, "top_k", f"must be in [-1, {vocab_size}]")
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            check(-2.0 <= getattr(self, name) <= 10.0, name, "must be in [-2, 10]")
        check(0.0 <= self.penalty_decay <= 1.0, "penalty_decay", "must be in [0, 1]")
        check(
            0.0 < self.multiplicative_repetition_penalty <= 10.0,
            "multiplicative_repetition_penalty",
            "must be in (0, 10]",
        )
        check(self.seed is None or 0 <= self.seed < 2**64, "seed", "must be in [0, 2^64)")
        check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings")
        check(all(0 < len(s) <= MAX_STOP_LENGTH for s in self.stop), "stop", f"each 1..{MAX_STOP_LENGTH} characters")
        check(all(0 <= t < vocab_size for t in self.stop_token_ids), "stop_token_ids", f"ids in [0, {vocab_size})")
        check(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        return bad


class StateRef(Protocol):
    """An opaque handle to a saved sequence state (RNN state, pending token, sampler state)."""

    @property
    def token_count(self) -> int:
        """Tokens read into the state since it was zero."""
        ...

    @property
    def pending_token(self) -> int | None:
        """The last token sampled (or given) but not yet read; it is read first when generation resumes."""
        ...

    @property
    def nbytes(self) -> int: ...

    @property
    def generated_tokens(self) -> int:
        """Tokens the request it was taken from had generated when it was taken."""
        ...


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    # Tokens to read before generating. With a start_state, its pending token is read first.
    prompt: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    start_state: StateRef | None = None
    # With start_state: carry on its penalties and random stream (forks, continues) instead of fresh ones.
    inherit_sampler: bool = False
    # Hand the final state back in the Finished event (tasks, sessions, templates).
    keep_state: bool = False
    # Prompt offsets after which the state goes into the prefix cache (e.g. the end of a system prompt).
    cache_points: tuple[int, ...] = ()
    use_prefix_cache: bool = True
    # time.monotonic() after which the request ends with FinishReason.DEADLINE.
    deadline: float | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    queue_seconds: float
    prefill_seconds: float
    first_token_seconds: float
    generation_seconds: float

    def tokens_per_second(self, completion_tokens: int) -> float:
        # The first token is the end of prefill, so the rate is over the tokens after it.
        return (completion_tokens - 1) / self.generation_seconds if self.generation_seconds > 0 else 0.0


@dataclass(frozen=True)
class Started:
    """The prompt has been read (prefill done); generation starts."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int
    prefill_seconds: float
    seed: int


@dataclass(frozen=True)
class Delta:
    """Generated tokens and the text they complete (text may lag: split characters, possible stops)."""

    request_id: str
    offset: int  # index among generated tokens of token_ids[0]
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    request_id: str
    reason: FinishReason
    usage: Usage
    timings: Timings
    seed: int
    state: StateRef | None = None  # when keep_state
    error: str | None = None  # when reason is ERROR

    @classmethod
    def unserved(cls, request_id: str, prompt_tokens: int, error: str, seed: int = 0) -> Finished:
        """The end of a request that failed without the engine running it (see RequestSample.unserved)."""
        usage = Usage(prompt_tokens, 0, 0)
        return cls(request_id, FinishReason.ERROR, usage, Timings(0.0, 0.0, 0.0, 0.0), seed, error=error)


TokenEvent = Started | Delta | Finished


class TokenStream(Protocol):
    """The events of one request: an async iterator with aclose() (which aborts an unfinished request)."""

    def __aiter__(self) -> TokenStream: ...

    async def __anext__(self) -> TokenEvent: ...

    async def aclose(self) -> None: ...


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...


@dataclass(frozen=True)
class ModelInfo:
    """What ModelService reports about the loaded model."""

    id: str
    version: str
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    ffn_dim: int
    lora: tuple[int, int, int, int]  # decay, aaa, mv, gate
    parameter_count: int
    checkpoint_dtype: str
    dtype: str  # weights and activations in memory
    backend: str
    device: str
    demo: bool
    source: str
    load_time: float  # unix seconds
    max_batch_size: int
    aliases: tuple[str, ...] = ()
    state_dtype: str = "float32"  # the WKV state in the slot pool and in snapshots (--state-dtype)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    slots_in_use: int
    slots_total: int
    prefix_cache_entries: int
    prefix_cache_hits: int
    prefix_cache_misses: int
    steps: int


class EngineClient(Protocol):
    """All the domain layer sees of the engine."""

    @property
    def model(self) -> ModelInfo: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def generate(self, request: GenerationRequest) -> TokenStream:
        """Submits a request at once (raising if it is invalid or the engine is full) and returns its events,
        which end with one Finished. Closing the stream early, or dropping it, aborts the request."""
        ...

    def check(self, request: GenerationRequest) -> None:
        """Raises what generate() would refuse the request for (bad sampling or prompt), submitting nothing."""
        ...

    async def abort(self, request_id: str) -> None:
        """Ends a request (FinishReason.CANCELLED, state kept if asked); unknown ids are ignored."""
        ...

    async def snapshot(self, request_id: str) -> StateRef:
        """The current state of a running request, at the latest step."""
        ...

    async def export_state(self, state: StateRef) -> bytes: ...

    async def import_state(self, data: bytes) -> StateRef: ...

    def stats(self) -> EngineStats: ...


def check_sampling(params: SamplingParams, prefix: str, vocab_size: int, max_tokens_limit: int) -> None:
    """Raises InvalidArgument naming every out-of-range field."""
    bad = params.violations(prefix, vocab_size, max_tokens_limit)
    if bad:
        raise InvalidArgument.for_fields(bad)


def check_request(
    request: GenerationRequest,
    *,
    vocab_size: int,
    max_prompt_tokens: int,
    max_new_tokens: int,
    state_ok: Callable[[StateRef], bool],
) -> None:
    """Raises what an engine refuses a request for: bad sampling, a prompt too long or out of the vocabulary,
    or a start state that `state_ok` says is not one of this engine's (another model's, another process's)."""
    check_sampling(request.sampling, "sampling", vocab_size, max_new_tokens)
    if len(request.prompt) > max_prompt_tokens:
        raise InvalidArgument.for_field(
            "prompt",
            f"{len(request.prompt)} tokens, at most {max_prompt_tokens} are accepted",
            reason="PROMPT_TOO_LONG",
        )
    if any(not 0 <= t < vocab_size for t in request.prompt):
        raise InvalidArgument.for_field("prompt", f"token ids must be in [0, {vocab_size})", reason="INVALID_TOKEN")
    if request.start_state is not None and not state_ok(request.start_state):
        raise foreign_state()


def foreign_state() -> InvalidArgument:
    """The error for a state that is not this engine's (another model's, or not a state at all)."""
    return InvalidArgument.for_field("state", "not a state of this model", reason="INVALID_STATE")


def check_admission(request_id: str, *, stopping: bool, in_use: bool, waiting: int, max_queued: int) -> None:
    """Raises what an engine refuses a valid request for: stopping, a request id still running, a full queue.

    `waiting`: requests that would be ahead of this one in the queue (submitted beyond the free slots)."""
    if stopping:
        raise Unavailable("the engine is shutting down", reason="ENGINE_STOPPING", retry_after=1.0)
    if in_use:
        raise AlreadyExists(f"request id {request_id!r} is in use", reason="DUPLICATE_REQUEST_ID")
    if waiting >= max_queued:
        raise ResourceExhausted(
            f"{max(waiting, 0)} requests are waiting for a slot; try again shortly",
            reason="QUEUE_FULL",
            retry_after=1.0,
        )
