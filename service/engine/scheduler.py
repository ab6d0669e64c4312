"""Continuous batching: which sequences wait, which hold a slot, and what each step reads.

Every step takes all generating sequences (one token each, so inter-token latency stays flat), then
fills the rest of the step's token budget with prefill chunks in arrival order. Sequences join at
the next step after a slot frees and leave the step they finish. Pure Python: no torch, no I/O.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from .sequence import Phase, Sequence


class PlannedRow(NamedTuple):  # a tuple: built for every row of every step, so cheaply
    seq: Sequence
    start: int  # feed[start:end] is read this step
    end: int
    sample: bool  # sample a token from the logits after feed[end - 1]

    @property
    def tokens(self) -> list[int]:
        return self.seq.feed[self.start : self.end]


@dataclass(frozen=True)
class StepPlan:
    rows: list[PlannedRow]

    @property
    def token_count(self) -> int:
        return sum(r.end - r.start for r in self.rows)


class Scheduler:
    def __init__(self, max_batch_tokens: int, prefill_chunk: int) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # hold a slot, in admission order
        self.by_id: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.by_id[seq.id] = seq

    def admit_next(self) -> Sequence | None:
        """The oldest waiting sequence, moved to running (the caller gives it a slot)."""
        if not self.waiting:
            return None
        seq = self.waiting.popleft()
        seq.phase = Phase.PREFILL
        self.running.append(seq)
        return seq

    def remove(self, seq: Sequence) -> None:
        self.by_id.pop(seq.id, None)
        if seq in self.running:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)

    def all(self) -> Iterator[Sequence]:
        yield from self.running
        yield from self.waiting

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def plan(self) -> StepPlan:
        rows: list[PlannedRow] = []
        budget = self.max_batch_tokens
        decode = Phase.DECODE
        for seq in self.running:
            if seq.phase is decode:
                # A generating sequence reads its one pending token: feed[fed] (no cache point lies strictly
                # inside a one-token chunk), so next_chunk(1) is not needed on this per-row path.
                rows.append(PlannedRow(seq, seq.fed, seq.fed + 1, True))
                budget -= 1
        for seq in self.running:
            if budget <= 0:
                break
            if seq.phase is not Phase.PREFILL:
                continue
            start, end = seq.next_chunk(min(self.prefill_chunk, budget))
            if end > start:
                rows.append(PlannedRow(seq, start, end, seq.samples_after(end)))
                budget -= end - start
        return StepPlan(rows)
