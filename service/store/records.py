"""What the store keeps: plain, JSON-serialisable records of tasks and predictions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskRecord:
    id: str
    kind: str  # "temporary" | "persistent" | "template"
    created: float  # unix seconds
    updated: float
    status: int  # 0 prefill, 1 ready, 2 running, 3 finished
    generated_tokens: int = 0
    # The current round's text as (generated-token count after the chunk, text) pairs.
    chunks: list[list[Any]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prefill_seconds: float = 0.0
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    parent_id: str | None = None
    state_tokens: int = 0
    has_state: bool = False
    tokens: list[int] = field(default_factory=list)  # the current round's generated token ids


@dataclass(frozen=True)
class PredictionRecord:
    id: str
    model: str
    version: str
    created: float
    status: str  # starting | processing | succeeded | failed | canceled
    input: dict[str, Any] = field(default_factory=dict)
    output: list[str] | None = None
    error: str | None = None
    logs: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    started: float | None = None
    completed: float | None = None
    webhook: str | None = None
    webhook_events_filter: list[str] = field(default_factory=list)
