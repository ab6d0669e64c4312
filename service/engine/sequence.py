"""One request inside the engine: the tokens it reads, the tokens it generates, and the events it owes.

A sequence's `feed` is every token it reads, in order: the start state's pending token, the prompt,
then each generated token as it is sampled (a token is read in the step after it is sampled). `fed`
counts those already read, so prefill chunks and decode steps are the same thing: read feed[fed:end].
Text is decoded here, at the engine's edge, UTF-8-safe and with stop strings held back. No torch.
"""

from __future__ import annotations

import contextvars
import enum
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

from .protocol import (
    Delta,
    Finished,
    FinishReason,
    GenerationRequest,
    Started,
    StateRef,
    Timings,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from .stops import StopMatcher
from .tokenizer import EOS_ID, IncrementalDecoder, WorldTokenizer


class Sink(Protocol):
    """Where a sequence's events go: handed to its outlet, batched with the outlet's other sinks once per step."""

    @property
    def outlet(self) -> Outlet: ...


class Outlet(Protocol):
    """Where the engine hands a step's events for a group of sinks: an event loop whose consumers read them
    (in-process, service/engine/local.py) or an engine process's pipe to its front end (service/engine/worker.py).

    Called in the engine thread, once per step with every sink of this outlet that has events; it must not
    block on the consumers (hand over and return)."""

    def send(self, batch: list[tuple[Sink, list[TokenEvent]]]) -> None: ...


class Phase(enum.Enum):
    WAITING = "waiting"  # no slot yet
    PREFILL = "prefill"  # reading the prompt
    DECODE = "decode"  # generating
    DONE = "done"


@dataclass
class _Clock:
    arrival: float
    prefill_start: float | None = None
    prefill_end: float | None = None
    first_token: float | None = None
    last_token: float | None = None


class Sequence:
    def __init__(self, request: GenerationRequest, sink: Sink, tokenizer: WorldTokenizer, seed: int) -> None:
        self.request = request
        self.id = request.request_id
        self.params = request.sampling
        self.sink = sink
        self.seed = seed
        self.phase = Phase.WAITING
        self.clock = _Clock(arrival=time.monotonic())
        self.outbox: list[TokenEvent] = []
        self._streamed = False  # a delta has been handed to the sink (read with a stream interval only)
        # For observers only: the front end it came through, and the submitting context when asked for.
        self.api = "internal"
        self.origin: contextvars.Context | None = None
        # Set at admission (runner.admit):
        self.slot: int | None = None
        self.feed: list[int] = []
        self.fed = 0
        self.prompt_end = 0  # len(feed) before any generated token
        self.from_zero = False  # feed[:fed] is the whole history of the state (prefix-cache keys)
        self.cache_points: list[int] = []  # feed offsets after which the state goes into the prefix cache
        self.cached_tokens = 0
        self.position = 0  # random-stream position of the next sampled token
        self.base_token_count = 0  # tokens in the start state before feed[0]
        self.generated: list[int] = []
        self.finish_reason: FinishReason | None = None
        # Sampled tokens whose text is not decoded yet: (index in generated, token, logprob).
        self._unemitted: list[tuple[int, int, tuple[float, list[tuple[int, float]]] | None]] = []
        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = StopMatcher(self.params.stop)
        self._tokenizer = tokenizer
        self._stop_ids = frozenset(self.params.stop_token_ids) | (frozenset() if self.params.ignore_eos else {EOS_ID})

    @property
    def target(self) -> int:
        """How far to read: everything, or all but the last token when nothing is to be generated."""
        return self.prompt_end - 1 if self.params.max_tokens == 0 else len(self.feed)

    def next_chunk(self, limit: int) -> tuple[int, int]:
        """The next [start, end) of feed to read, at most `limit` tokens, ending at a cache point if one comes."""
        end = min(self.fed + limit, self.target)
        for point in self.cache_points:
            if self.fed < point < end:
                end = point
                break
        return self.fed, end

    def samples_after(self, end: int) -> bool:
        return end == len(self.feed) and self.params.max_tokens > 0

    @property
    def banned_now(self) -> tuple[int, ...]:
        """Stop tokens cannot be sampled before min_tokens."""
        return tuple(self._stop_ids) if len(self.generated) < self.params.min_tokens else ()

    def mark_read(self, end: int, step_start: float, now: float) -> None:
        if self.clock.prefill_start is None:
            self.clock.prefill_start = step_start
        self.fed = end
        if self.phase is Phase.PREFILL and end >= self.target:
            self.clock.prefill_end = now

    @property
    def token_count(self) -> int:
        """Tokens read into the slot's state since it was zero."""
        return self.base_token_count + self.fed

    @property
    def pending_token(self) -> int | None:
        return self.feed[self.fed] if self.fed < len(self.feed) else None

    def on_token(
        self,
        token: int,
        logprob: tuple[float, list[tuple[int, float]]] | None,
        now: float,
        defer_text: bool = False,
    ) -> bool:
        """A sampled token: queue it for reading, check stops and budget, decode its text.

        With `defer_text`, a token that cannot end the generation (not a stop token, not the last of the
        budget, no stop strings to watch) leaves its text for emit_text(), and True is returned: the engine
        decodes it while the device runs the next step. Whether the sequence goes on is known either way."""
        if not self.generated:
            self.clock.first_token = now
            self.outbox.append(self._started())
        self.phase = Phase.DECODE
        self.clock.last_token = now
        self.generated.append(token)
        self.feed.append(token)
        self.position += 1
        index = len(self.generated) - 1
        stop = token in self._stop_ids
        last = stop or len(self.generated) >= self.params.max_tokens
        if defer_text and not last and not self._stops.watching:
            self._unemitted.append((index, token, logprob))
            return True
        self.emit_text()
        reason: FinishReason | None = None
        text = ""
        if stop:
            reason = FinishReason.STOP
        else:
            text = self._stops.push(self._decoder.push((token,)))
            if self._stops.stopped:
                reason = FinishReason.STOP_SEQUENCE
            elif last:
                reason = FinishReason.LENGTH
        if reason is not None:
            text += self._flush_text()
        self.outbox.append(Delta(self.id, index, (token,), text, self._logprobs(token, logprob)))
        if reason is not None:
            self.finish_reason = reason
        return False

    def emit_text(self) -> None:
        """Decodes the tokens whose text on_token deferred, in order, into the outbox. None of them ends the
        generation and no stop string is watched, so nothing is held back but split UTF-8 characters."""
        unemitted, self._unemitted = self._unemitted, []  # taken first: a failure here is not met twice
        for index, token, logprob in unemitted:
            text = self._decoder.push((token,))
            self.outbox.append(Delta(self.id, index, (token,), text, self._logprobs(token, logprob)))

    def _logprobs(self, token: int, value: tuple[float, list[tuple[int, float]]] | None) -> tuple[TokenLogprob, ...]:
        """The Delta's logprobs: none unless asked for, else the token's with its top alternatives."""
        if value is None:
            return ()
        tb = self._tokenizer.token_bytes
        return (TokenLogprob(token, tb(token), value[0], tuple((i, tb(i), lp) for i, lp in value[1])),)

    def take_events(self, interval: int) -> list[TokenEvent]:
        """The outbox's events to hand to the sink now, or none to hold them: with `interval` > 1, deltas
        wait until they carry `interval` tokens, unless they are the first tokens or come with any other
        event (Started, Finished, a tail of text on cancel)."""
        events = self.outbox
        if interval > 1 and events:
            pending = 0
            for event in events:
                if not isinstance(event, Delta):
                    break
                pending += len(event.token_ids)
            else:
                if self._streamed and pending < interval:
                    return []
            if not self._streamed:
                self._streamed = any(isinstance(e, Delta) for e in events)
        self.outbox = []
        return events

    def _flush_text(self) -> str:
        if self._stops.stopped:
            return ""
        return self._stops.push(self._decoder.flush()) + self._stops.flush()

    def _started(self) -> Started:
        c = self.clock
        prefill = (c.prefill_end or c.prefill_start or c.arrival) - (c.prefill_start or c.arrival)
        return Started(self.id, len(self.request.prompt), self.cached_tokens, prefill, self.seed)

    def finished_event(self, reason: FinishReason, state: StateRef | None, error: str | None = None) -> Finished:
        """The last event; adds Started first if generation never began (prefill only, cancelled, failed)."""
        self.emit_text()  # text deferred by on_token comes before the end
        self.phase = Phase.DONE
        self.finish_reason = reason
        if not self.generated:
            self.outbox.append(self._started())
        elif reason not in (FinishReason.STOP, FinishReason.STOP_SEQUENCE, FinishReason.LENGTH):
            # Ended from outside (cancel, deadline, error): release text held back for a possible stop.
            tail = self._flush_text()
            if tail:
                self.outbox.append(Delta(self.id, len(self.generated), (), tail))
        c = self.clock
        now = time.monotonic()
        usage = Usage(len(self.request.prompt), len(self.generated), self.cached_tokens)
        timings = Timings(
            queue_seconds=(c.prefill_start or now) - c.arrival,
            prefill_seconds=(c.prefill_end or c.prefill_start or now) - (c.prefill_start or now),
            first_token_seconds=(c.first_token - c.arrival) if c.first_token is not None else 0.0,
            generation_seconds=(c.last_token - c.first_token) if c.first_token and c.last_token else 0.0,
        )
        return Finished(self.id, reason, usage, timings, self.seed, state, error)


def feed_for(prompt: Seq[int], pending: int | None) -> list[int]:
    """What a request reads: the start state's pending token, then the prompt; never nothing."""
    feed = ([] if pending is None else [pending]) + list(prompt)
    return feed or [EOS_ID]
