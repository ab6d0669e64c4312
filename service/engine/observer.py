"""What the engine reports about its work: the observer protocol, the samples it passes, the API label.

The engine calls its observer in the engine thread, once per step and once per request end, with plain
values; metrics, request logs and traces implement the protocol above the engine, so nothing here (or
in the engine) imports prometheus_client or OpenTelemetry. Observers must be quick and must not raise.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .protocol import FinishReason, Usage

log = logging.getLogger("rwkvd.engine")

# Which front end a request came in through (grpc, openai, replicate, tasks; internal when none set it).
# The gRPC interceptor and the HTTP middleware set it for the call's task; the engine client reads it at
# submission, in the caller's context, so background consumers started from a call inherit it.
request_api: contextvars.ContextVar[str] = contextvars.ContextVar("rwkvd_request_api", default="internal")


@dataclass(slots=True)
class StepSample:
    """One engine step. Times are time.monotonic() seconds; latencies are per sampled token."""

    rows: int
    prefill_tokens: int  # prompt tokens read (rows still in prefill)
    decode_tokens: int  # generated tokens read (one per decoding row)
    # Launch to tokens accepted: forward, sampling and bookkeeping (with overlap also the previous step's
    # text and delivery, done while the device ran: the step's wall time as the engine saw it).
    seconds: float
    forward_seconds: float
    sample_seconds: float
    first_tokens: list[tuple[str, float]]  # (api, seconds from arrival) of each request's first token
    token_gaps: list[tuple[str, float]]  # (api, seconds since the request's previous token)


@dataclass(slots=True)
class RequestSample:
    """One request at its end. Clock values are time.monotonic() seconds (None: never reached)."""

    request_id: str
    api: str
    reason: FinishReason
    usage: Usage
    arrival: float
    prefill_start: float | None
    prefill_end: float | None
    first_token: float | None
    last_token: float | None
    end: float
    error: str | None
    # The submitting call's context, kept only for observers that ask (tracing parents its span on it).
    origin: contextvars.Context | None

    @classmethod
    def unserved(cls, request_id: str, api: str, usage: Usage, arrival: float, error: str) -> RequestSample:
        """A request that ended with an error without the engine running it (refused by an engine process,
        or lost with one), ending now."""
        return cls(
            request_id=request_id,
            api=api,
            reason=FinishReason.ERROR,
            usage=usage,
            arrival=arrival,
            prefill_start=None,
            prefill_end=None,
            first_token=None,
            last_token=None,
            end=time.monotonic(),
            error=error,
            origin=None,
        )

    @property
    def queue_seconds(self) -> float:
        return (self.prefill_start if self.prefill_start is not None else self.end) - self.arrival

    @property
    def e2e_seconds(self) -> float:
        return self.end - self.arrival

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def prefill_seconds(self) -> float | None:
        if self.prefill_start is None or self.prefill_end is None:
            return None
        return self.prefill_end - self.prefill_start

    @property
    def decode_seconds(self) -> float | None:
        if self.first_token is None or self.last_token is None:
            return None
        return self.last_token - self.first_token

    @property
    def tokens_per_second(self) -> float:
        """Decode rate after the first token (the first token is the end of prefill)."""
        decode = self.decode_seconds
        return (self.usage.completion_tokens - 1) / decode if decode else 0.0


class EngineObserver(Protocol):
    # Whether on_request_end needs RequestSample.origin (copying the context costs a little per request).
    wants_origin: bool

    def on_step(self, step: StepSample) -> None: ...

    def on_request_end(self, request: RequestSample) -> None: ...

    def on_rejected(self, api: str, kind: str) -> None:
        """A submission refused before it queued; `kind` is the error kind in lower case (queue full, ...)."""
        ...


class ObserverGroup:
    """Several observers as one; a failing observer is logged and does not stop the others or the engine."""

    def __init__(self, observers: Sequence[EngineObserver]) -> None:
        self._observers = tuple(observers)
        self.wants_origin = any(o.wants_origin for o in self._observers)

    @classmethod
    def guarding(cls, observer: EngineObserver) -> ObserverGroup:
        """`observer` with its errors contained: itself if it is a group, else a group of one."""
        return observer if isinstance(observer, ObserverGroup) else cls([observer])

    def on_step(self, step: StepSample) -> None:
        for o in self._observers:
            try:
                o.on_step(step)
            except Exception:
                log.exception("observer %r failed on a step", o)

    def on_request_end(self, request: RequestSample) -> None:
        for o in self._observers:
            try:
                o.on_request_end(request)
            except Exception:
                log.exception("observer %r failed on request %s", o, request.request_id)

    def on_rejected(self, api: str, kind: str) -> None:
        for o in self._observers:
            try:
                o.on_rejected(api, kind)
            except Exception:
                log.exception("observer %r failed on a rejection", o)
