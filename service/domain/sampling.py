"""Sampling parameters as clients give them (anything may be absent), resolved over an API's defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from service.engine.protocol import SamplingParams


@dataclass(frozen=True)
class SamplingOverrides:
    """What a request asked for; None = not given."""

    max_tokens: int | None = None
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    penalty_decay: float | None = None
    multiplicative_repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def given(self) -> dict[str, object]:
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    def resolve(self, defaults: SamplingParams) -> SamplingParams:
        """The defaults with every given field replaced."""
        return dataclasses.replace(defaults, **self.given())  # type: ignore[arg-type]

    def over(self, base: SamplingOverrides) -> SamplingOverrides:
        """These overrides on top of earlier ones (fork/continue on a task's stored parameters)."""
        return dataclasses.replace(base, **self.given())  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.given().items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SamplingOverrides:
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)


NO_OVERRIDES = SamplingOverrides()

# gRPC CompletionService and OpenAI /v1/completions: neutral sampling, a modest budget.
COMPLETION_DEFAULTS = SamplingParams(max_tokens=256)
