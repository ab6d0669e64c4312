"""A task in memory: its identity, parameters, RNN state at rest, and its current generation round.

A round is what the task generated since its last prompt: token ids, the text they completed (as
chunks tagged with the token count at their end), and the outcome. Subscribers follow a round from
any token offset: they get what exists, then live changes, then the end. Records convert both ways.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from service.engine.protocol import FinishReason, StateRef, Timings, Usage
from service.store.records import TaskRecord

from .sampling import SamplingOverrides


class TaskKind(enum.Enum):
    TEMPORARY = "temporary"
    PERSISTENT = "persistent"
    TEMPLATE = "template"

    @property
    def prefix(self) -> str:
        return {"temporary": "TMP_", "persistent": "TASK_", "template": "_TMPL_"}[self.value]


class TaskStatus(enum.IntEnum):
    """RWKV-Server's numbering (the HTTP API sends these ints). READY is never reported: prefill and
    generation happen in the same engine slot, so a task goes from PREFILL straight to RUNNING."""

    PREFILL = 0
    READY = 1
    RUNNING = 2
    FINISHED = 3


@dataclass(frozen=True)
class RoundStarted:
    task_id: str
    prefill_seconds: float
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class RoundDelta:
    task_id: str
    offset: int  # index of token_ids[0] among the round's generated tokens
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class RoundEnded:
    task_id: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    error: str | None


RoundEvent = RoundStarted | RoundDelta | RoundEnded
ZERO_USAGE = Usage(0, 0, 0)
ZERO_TIMINGS = Timings(0.0, 0.0, 0.0, 0.0)


@dataclass
class Round:
    task_id: str
    status: TaskStatus = TaskStatus.PREFILL
    tokens: list[int] = field(default_factory=list)
    chunks: list[tuple[int, str]] = field(default_factory=list)  # (token count after the chunk, text)
    started: RoundStarted | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    usage: Usage = ZERO_USAGE
    timings: Timings = ZERO_TIMINGS
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self.status is TaskStatus.FINISHED

    @property
    def text(self) -> str:
        return "".join(text for _, text in self.chunks)

    @property
    def prefill_seconds(self) -> float:
        return self.started.prefill_seconds if self.started else 0.0

    def notify(self) -> None:
        """Wakes every subscriber; each waits on the event that was current when it looked."""
        self._changed.set()
        self._changed = asyncio.Event()

    def on_started(self, started: RoundStarted) -> None:
        self.started = started
        self.status = TaskStatus.RUNNING
        self.notify()

    def on_tokens(self, offset: int, token_ids: tuple[int, ...], text: str) -> None:
        del self.tokens[offset:]  # a resumed round continues exactly where its tokens end
        self.tokens.extend(token_ids)
        if text:
            self.chunks.append((len(self.tokens), text))
        self.notify()

    def on_end(self, reason: FinishReason, usage: Usage, timings: Timings, error: str | None = None) -> None:
        self.status = TaskStatus.FINISHED
        self.finish_reason = reason
        self.usage = usage
        self.timings = timings
        self.error = error
        self.notify()

    def copy(self, task_id: str, tokens: int | None = None) -> Round:
        """A deep copy for a fork, cut after `tokens` generated tokens (chunks ending later are left out)."""
        cut = len(self.tokens) if tokens is None else min(tokens, len(self.tokens))
        return Round(
            task_id=task_id,
            status=TaskStatus.FINISHED,
            tokens=self.tokens[:cut],
            chunks=[c for c in self.chunks if c[0] <= cut],
            started=replace(self.started, task_id=task_id) if self.started else None,  # events name the copy
            finish_reason=self.finish_reason or FinishReason.CANCELLED,
            usage=self.usage,
            timings=self.timings,
        )

    async def wait_for_tokens(self, count: int) -> None:
        """Until the round holds `count` tokens or has ended (events may trail the engine by a few steps)."""
        while len(self.tokens) < count and not self.finished:
            await self._changed.wait()

    async def follow(self, from_token: int = 0) -> AsyncIterator[RoundEvent]:
        """The round from token offset `from_token`: what exists, then live changes, until it ends."""
        sent = max(0, from_token)
        chunk = next((i for i, c in enumerate(self.chunks) if c[0] > sent), len(self.chunks))
        announced = False
        while True:
            changed = self._changed
            if not announced and self.started is not None:
                announced = True
                yield self.started
            while chunk < len(self.chunks):
                end, text = self.chunks[chunk]
                yield RoundDelta(self.task_id, sent, tuple(self.tokens[sent:end]), text)
                sent, chunk = max(sent, end), chunk + 1
            if self.finished:
                if sent < len(self.tokens):  # tokens without text, e.g. the end-of-text token
                    yield RoundDelta(self.task_id, sent, tuple(self.tokens[sent:]), "")
                if not announced:  # ended before it started (stopped while queued, prefill only)
                    yield RoundStarted(self.task_id, 0.0, 0, 0)
                yield RoundEnded(
                    self.task_id, self.finish_reason or FinishReason.CANCELLED, self.usage, self.timings, self.error
                )
                return
            await changed.wait()


@dataclass
class Task:
    id: str
    kind: TaskKind
    overrides: SamplingOverrides
    seed: int | None
    round: Round
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    parent_id: str | None = None
    state: StateRef | None = None  # at rest; None while running, or not loaded, or never made
    state_tokens: int = 0
    has_state: bool = False  # a state exists (in memory, or in the store for stored tasks)
    request_id: str | None = None  # the engine request while a round runs
    request_base: int = 0  # round tokens generated before that request (a resumed round continues)
    runner: asyncio.Task[None] | None = None
    requests: int = 0  # engine requests made so far (for unique request ids)

    @property
    def running(self) -> bool:
        return self.request_id is not None

    @property
    def status(self) -> TaskStatus:
        return self.round.status

    @property
    def stored(self) -> bool:
        return self.kind is not TaskKind.TEMPORARY

    def to_record(self) -> TaskRecord:
        r = self.round
        return TaskRecord(
            id=self.id,
            kind=self.kind.value,
            created=self.created,
            updated=self.updated,
            status=int(r.status),
            generated_tokens=len(r.tokens),
            chunks=[[end, text] for end, text in r.chunks],
            finish_reason=r.finish_reason.value if r.finish_reason else None,
            error=r.error,
            prefill_seconds=r.prefill_seconds,
            usage={
                "prompt_tokens": r.usage.prompt_tokens,
                "completion_tokens": r.usage.completion_tokens,
                "cached_tokens": r.usage.cached_tokens,
            },
            timings={
                "queue_seconds": r.timings.queue_seconds,
                "prefill_seconds": r.timings.prefill_seconds,
                "first_token_seconds": r.timings.first_token_seconds,
                "generation_seconds": r.timings.generation_seconds,
            },
            overrides=self.overrides.to_json(),
            seed=self.seed,
            parent_id=self.parent_id,
            state_tokens=self.state_tokens,
            has_state=self.has_state,
            tokens=list(r.tokens),
        )

    @classmethod
    def from_record(cls, rec: TaskRecord) -> Task:
        """A stored task, its state not loaded. A round stored unfinished was cut off by a restart."""
        finished = rec.status == TaskStatus.FINISHED
        round_ = Round(
            task_id=rec.id,
            status=TaskStatus.FINISHED,
            tokens=list(rec.tokens),
            chunks=[(int(end), str(text)) for end, text in rec.chunks],
            started=RoundStarted(
                rec.id, rec.prefill_seconds, rec.usage.get("prompt_tokens", 0), rec.usage.get("cached_tokens", 0)
            ),
            finish_reason=FinishReason(rec.finish_reason) if finished and rec.finish_reason else FinishReason.ERROR,
            error=rec.error if finished else "interrupted by a server restart",
            usage=Usage(**rec.usage) if rec.usage else ZERO_USAGE,
            timings=Timings(**rec.timings) if rec.timings else ZERO_TIMINGS,
        )
        return cls(
            id=rec.id,
            kind=TaskKind(rec.kind),
            overrides=SamplingOverrides.from_json(rec.overrides),
            seed=rec.seed,
            round=round_,
            created=rec.created,
            updated=rec.updated,
            parent_id=rec.parent_id,
            state_tokens=rec.state_tokens,
            has_state=rec.has_state,
        )
