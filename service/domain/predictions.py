"""Predictions (the Replicate / RockAI model): create, get, list, cancel, wait, and follow their events.

A prediction runs one generation on an input object; its output is the list of text chunks so far.
Status moves starting -> processing -> succeeded | failed | canceled. Every change is also an event
(output, logs, error, done) with an increasing id, kept for replay, so a stream can resume after any
id, during or after the run. Rows are stored at creation and at the end; one cut off by a restart
reads as failed. Shared by gRPC PredictionService and the /v1/predictions HTTP API.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from service.engine.protocol import (
    Delta,
    EngineClient,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Started,
    TokenStream,
)
from service.errors import FieldViolation, InvalidArgument, NotFound
from service.store.records import PredictionRecord
from service.store.sqlite import Store

from .models import resolve_model
from .prediction_input import parse_input

log = logging.getLogger("rwkvd.predictions")

PREDICTION_DEFAULTS = SamplingParams(max_tokens=512, temperature=0.7, top_p=0.9)
# Engine field -> the input name a client used, for error messages.
_INPUT_NAMES = {"multiplicative_repetition_penalty": "repetition_penalty"}


class PredictionStatus(enum.Enum):
    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (PredictionStatus.SUCCEEDED, PredictionStatus.FAILED, PredictionStatus.CANCELED)


class WebhookEvent(enum.Enum):
    START = "start"
    OUTPUT = "output"
    LOGS = "logs"
    COMPLETED = "completed"


@dataclass(frozen=True)
class PredictionEvent:
    id: int
    kind: str  # output | logs | error | done
    data: str


@dataclass
class Prediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    created: float = field(default_factory=time.time)
    status: PredictionStatus = PredictionStatus.STARTING
    output: list[str] | None = None
    error: str | None = None
    logs: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    started: float | None = None
    completed: float | None = None
    webhook: str | None = None
    webhook_events_filter: tuple[WebhookEvent, ...] = tuple(WebhookEvent)
    events: list[PredictionEvent] = field(default_factory=list)
    request_id: str | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def add_event(self, kind: str, data: str) -> None:
        self.events.append(PredictionEvent(len(self.events) + 1, kind, data))
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int = 0) -> AsyncIterator[PredictionEvent]:
        """Events with ids after `after`: those kept, then live ones, until done."""
        sent = max(0, after)
        while True:
            changed = self._changed
            while sent < len(self.events):
                event = self.events[sent]
                sent += 1
                yield event
                if event.kind == "done":
                    return
            if self.events and self.events[-1].kind == "done":  # resumed after the end: nothing more will come
                return
            await changed.wait()

    async def wait(self, within: float | None) -> None:
        """Until the prediction ends, or `within` seconds pass."""
        deadline = None if within is None else time.monotonic() + within
        while not self.status.terminal:
            changed = self._changed
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return

    def to_record(self) -> PredictionRecord:
        return PredictionRecord(
            id=self.id,
            model=self.model,
            version=self.version,
            created=self.created,
            status=self.status.value,
            input=self.input,
            output=self.output,
            error=self.error,
            logs=self.logs,
            metrics=self.metrics,
            started=self.started,
            completed=self.completed,
            webhook=self.webhook,
            webhook_events_filter=[e.value for e in self.webhook_events_filter],
        )

    @classmethod
    def from_record(cls, rec: PredictionRecord) -> Prediction:
        """A stored prediction; one stored mid-run was cut off by a restart and reads as failed."""
        status = PredictionStatus(rec.status)
        p = cls(
            id=rec.id,
            model=rec.model,
            version=rec.version,
            input=rec.input,
            created=rec.created,
            status=status if status.terminal else PredictionStatus.FAILED,
            output=rec.output,
            error=rec.error if status.terminal else "interrupted by a server restart",
            logs=rec.logs,
            metrics=rec.metrics,
            started=rec.started,
            completed=rec.completed if status.terminal else rec.created,
            webhook=rec.webhook,
            webhook_events_filter=tuple(WebhookEvent(e) for e in rec.webhook_events_filter),
        )
        for chunk in p.output or []:  # the event log, rebuilt for streams that connect late
            p.add_event("output", chunk)
        if p.status is PredictionStatus.FAILED:
            p.add_event("error", p.error or "failed")
        p.add_event("done", _done_data(p.status))
        return p


Notify = Callable[[Prediction, WebhookEvent], None]


class PredictionManager:
    def __init__(
        self,
        engine: EngineClient,
        store: Store,
        notify: Notify | None = None,
        defaults: SamplingParams = PREDICTION_DEFAULTS,
        keep_in_memory: int = 1000,
    ) -> None:
        self._engine = engine
        self._store = store
        self._notify = notify
        self._defaults = defaults
        self._keep = keep_in_memory
        self._memory: OrderedDict[str, Prediction] = OrderedDict()
        self._runners: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Waits for running predictions to record their end (the engine cancels them when it stops)."""
        if self._runners:
            await asyncio.wait(list(self._runners), timeout=10)

    async def create(
        self,
        input: Mapping[str, Any],
        model: str = "",
        version: str = "",
        webhook: str | None = None,
        webhook_events_filter: list[str] | None = None,
    ) -> Prediction:
        """Checks everything, starts the generation, stores the prediction; raises before anything runs."""
        served = resolve_model(self._engine, version or model, field="version" if version else "model")
        if model and version:
            resolve_model(self._engine, model, field="model")
        parsed = parse_input(input)
        events = _events_filter(webhook_events_filter)
        params = parsed.sampling.resolve(self._defaults)
        self._check(params)
        prediction = Prediction(
            id=_new_id(),
            model=served.id,
            version=served.version,
            input=dict(input),
            webhook=webhook or None,
            webhook_events_filter=events,
        )
        request = GenerationRequest(
            request_id=f"prediction-{prediction.id}",
            prompt=tuple(self._engine.tokenizer.encode(parsed.prompt)),
            sampling=params,
        )
        try:
            stream = self._engine.generate(request)  # raises (queue full, bad input) before anything is stored
        except InvalidArgument as exc:  # the engine names its fields ("prompt", "sampling.x"); the client wrote input.*
            if not exc.violations:
                raise
            raise InvalidArgument.for_fields(
                [FieldViolation(_input_field(v.field), v.description) for v in exc.violations], reason=exc.reason
            ) from exc
        prediction.request_id = request.request_id
        self._memory[prediction.id] = prediction
        self._trim()
        await self._store.save_prediction(prediction.to_record())
        runner = asyncio.create_task(self._consume(prediction, stream), name=f"prediction-{prediction.id}")
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)
        return prediction

    async def get(self, prediction_id: str) -> Prediction:
        prediction = self._memory.get(prediction_id)
        if prediction is not None:
            return prediction
        record = await self._store.load_prediction(prediction_id)
        if record is None:
            raise NotFound.resource_missing("prediction", prediction_id, reason="PREDICTION_NOT_FOUND")
        prediction = Prediction.from_record(record)
        self._memory[prediction.id] = prediction
        self._trim()
        return prediction

    async def list(self, cursor: str | None, limit: int = 100) -> tuple[list[Prediction], str | None]:
        """Newest first; the page and the next page's cursor (None on the last)."""
        try:
            records, next_cursor = await self._store.list_predictions(cursor, max(1, min(limit, 1000)))
        except ValueError as exc:
            raise InvalidArgument.for_field("cursor", str(exc)) from exc
        return [self._memory.get(r.id) or Prediction.from_record(r) for r in records], next_cursor

    async def cancel(self, prediction_id: str) -> Prediction:
        """Cancels a running prediction and waits for it to settle; an ended one is returned unchanged."""
        prediction = await self.get(prediction_id)
        if not prediction.status.terminal and prediction.request_id is not None:
            await self._engine.abort(prediction.request_id)
            await prediction.wait(within=10)
        return prediction

    def _check(self, params: SamplingParams) -> None:
        """Out-of-range values, named as the client wrote them (input.<name>)."""
        limit = 1_000_000
        bad = params.violations("", self._engine.model.vocab_size, limit)
        if bad:
            raise InvalidArgument.for_fields(
                [FieldViolation(f"input.{_INPUT_NAMES.get(v.field, v.field)}", v.description) for v in bad],
                reason="INVALID_INPUT",
            )

    async def _consume(self, prediction: Prediction, stream: TokenStream) -> None:
        try:
            async with aclosing(stream):
                async for event in stream:
                    if isinstance(event, Started):
                        prediction.status = PredictionStatus.PROCESSING
                        prediction.started = time.time()
                        self._log(
                            prediction,
                            f"prompt: {event.prompt_tokens} tokens ({event.cached_tokens} from cache), "
                            f"read in {event.prefill_seconds:.3f} s\n",
                        )
                        self._emit(prediction, WebhookEvent.START)
                    elif isinstance(event, Delta):
                        self._output(prediction, event.text)
                    elif isinstance(event, Finished):
                        self._finish(prediction, event)
        except Exception as exc:  # a failure of this prediction alone
            log.exception("prediction %s failed", prediction.id)
            self._end(prediction, PredictionStatus.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            prediction.request_id = None
            if not prediction.status.terminal:
                self._end(prediction, PredictionStatus.CANCELED, None)
            await self._store.save_prediction(prediction.to_record())

    def _output(self, prediction: Prediction, text: str) -> None:
        if not text:
            return
        # replicate-python turns output strings starting with "https:" or "data:" into file objects: keep
        # such a start from beginning a chunk by moving its first character into a chunk of its own.
        chunks = [text[:1], text[1:]] if text.startswith(("https:", "data:")) else [text]
        prediction.output = prediction.output or []
        for chunk in chunks:
            prediction.output.append(chunk)
            prediction.add_event("output", chunk)
        self._emit(prediction, WebhookEvent.OUTPUT)

    def _log(self, prediction: Prediction, line: str) -> None:
        prediction.logs += line
        prediction.add_event("logs", line)
        self._emit(prediction, WebhookEvent.LOGS)

    def _finish(self, prediction: Prediction, event: Finished) -> None:
        t = event.timings
        prediction.metrics = {
            "predict_time": t.prefill_seconds + t.generation_seconds,
            "input_token_count": event.usage.prompt_tokens,
            "output_token_count": event.usage.completion_tokens,
            "tokens_per_second": t.tokens_per_second(event.usage.completion_tokens),
            "time_to_first_token": t.first_token_seconds,
        }
        self._log(
            prediction,
            f"generated {event.usage.completion_tokens} tokens in {t.generation_seconds:.3f} s, "
            f"finish reason {event.reason.value}\n",
        )
        if event.reason is FinishReason.CANCELLED:
            self._end(prediction, PredictionStatus.CANCELED, None)
        elif event.reason in (FinishReason.ERROR, FinishReason.DEADLINE):
            self._end(prediction, PredictionStatus.FAILED, event.error or event.reason.value)
        else:
            self._end(prediction, PredictionStatus.SUCCEEDED, None)

    def _end(self, prediction: Prediction, status: PredictionStatus, error: str | None) -> None:
        prediction.status = status
        prediction.error = error
        prediction.completed = time.time()
        prediction.metrics["total_time"] = prediction.completed - prediction.created
        if error is not None:
            prediction.add_event("error", error)
        prediction.add_event("done", _done_data(status))
        self._emit(prediction, WebhookEvent.COMPLETED)

    def _emit(self, prediction: Prediction, kind: WebhookEvent) -> None:
        if self._notify is not None and prediction.webhook and kind in prediction.webhook_events_filter:
            self._notify(prediction, kind)

    def _trim(self) -> None:
        finished = [k for k, p in self._memory.items() if p.status.terminal]
        for key in finished[: max(0, len(self._memory) - self._keep)]:
            del self._memory[key]


def _input_field(engine_field: str) -> str:
    """An engine field as the input a client wrote: "prompt" -> "input.prompt", "sampling.max_tokens" ->
    "input.max_tokens" (refused by the engine's own limit, e.g. --max-new-tokens)."""
    name = engine_field.removeprefix("sampling.")
    return f"input.{_INPUT_NAMES.get(name, name)}"


def _done_data(status: PredictionStatus) -> str:
    """The data of the final "done" event: {} on success, else the reason (Replicate's convention)."""
    if status is PredictionStatus.CANCELED:
        return '{"reason": "canceled"}'
    if status is PredictionStatus.FAILED:
        return '{"reason": "error"}'
    return "{}"


def _events_filter(names: list[str] | None) -> tuple[WebhookEvent, ...]:
    if not names:
        return tuple(WebhookEvent)
    known = {e.value: e for e in WebhookEvent}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidArgument.for_field(
            "webhook_events_filter", f"unknown events {unknown}; use {sorted(known)}", reason="INVALID_WEBHOOK_EVENTS"
        )
    return tuple(dict.fromkeys(known[n] for n in names))


def _new_id() -> str:
    """26 lowercase base32 characters, as Replicate's ids look."""
    return base64.b32encode(os.urandom(16)).decode().lower().rstrip("=")
