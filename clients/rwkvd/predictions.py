"""Predictions as Python values: the Prediction record, a page of them, the error of one that did not succeed,
and the conversions of inputs and outputs (a google.protobuf.Struct input, a Value output)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

from google.protobuf import struct_pb2, timestamp_pb2

from .v1 import predictions_pb2

PredictionStatus: TypeAlias = Literal["starting", "processing", "succeeded", "failed", "canceled"]
WebhookEvent: TypeAlias = Literal["start", "output", "logs", "completed"]

STATUSES: dict[predictions_pb2.PredictionStatus.ValueType, PredictionStatus] = {
    predictions_pb2.PREDICTION_STATUS_STARTING: "starting",
    predictions_pb2.PREDICTION_STATUS_PROCESSING: "processing",
    predictions_pb2.PREDICTION_STATUS_SUCCEEDED: "succeeded",
    predictions_pb2.PREDICTION_STATUS_FAILED: "failed",
    predictions_pb2.PREDICTION_STATUS_CANCELED: "canceled",
}
_WEBHOOK_EVENTS: dict[predictions_pb2.WebhookEvent.ValueType, WebhookEvent] = {
    predictions_pb2.WEBHOOK_EVENT_START: "start",
    predictions_pb2.WEBHOOK_EVENT_OUTPUT: "output",
    predictions_pb2.WEBHOOK_EVENT_LOGS: "logs",
    predictions_pb2.WEBHOOK_EVENT_COMPLETED: "completed",
}
WEBHOOK_EVENT_VALUES = {name: value for value, name in _WEBHOOK_EVENTS.items()}


@dataclass(frozen=True)
class Prediction:
    """A prediction as the server reported it. `output` is the list of text chunks so far (None before the
    first); `text` joins them. `message` is the rwkvd.v1.predictions_pb2.Prediction it was read from."""

    id: str
    model: str
    version: str
    status: PredictionStatus
    input: dict[str, Any]
    output: list[str] | None
    error: str | None
    logs: str
    metrics: predictions_pb2.PredictionMetrics
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    webhook: str | None
    webhook_events_filter: tuple[WebhookEvent, ...]
    message: predictions_pb2.Prediction = field(repr=False, compare=False)

    @property
    def text(self) -> str:
        return "".join(self.output or ())

    @property
    def done(self) -> bool:
        """Whether it has ended (succeeded, failed or canceled)."""
        return self.status in ("succeeded", "failed", "canceled")

    @classmethod
    def from_message(cls, pb: predictions_pb2.Prediction) -> Prediction:
        output = plain(pb.output) if pb.HasField("output") else None
        return cls(
            id=pb.id,
            model=pb.model,
            version=pb.version,
            status=STATUSES[pb.status],
            input={k: plain(v) for k, v in pb.input.fields.items()},
            output=[str(chunk) for chunk in output] if isinstance(output, list) else None,
            error=pb.error or None,
            logs=pb.logs,
            metrics=pb.metrics,
            created_at=_time(pb.create_time),
            started_at=_time(pb.start_time) if pb.HasField("start_time") else None,
            completed_at=_time(pb.complete_time) if pb.HasField("complete_time") else None,
            webhook=pb.webhook or None,
            webhook_events_filter=tuple(_WEBHOOK_EVENTS[e] for e in pb.webhook_events_filter if e in _WEBHOOK_EVENTS),
            message=pb,
        )


@dataclass(frozen=True)
class PredictionPage:
    """Predictions newest first; pass next_cursor to list_predictions() for the next page (None on the last)."""

    predictions: list[Prediction]
    next_cursor: str | None


class PredictionError(Exception):
    """A prediction that failed or was canceled, raised by run() and stream(); `prediction` is how it ended."""

    def __init__(self, prediction: Prediction) -> None:
        super().__init__(f"prediction {prediction.id} {prediction.status}: {prediction.error or prediction.status}")
        self.prediction = prediction


def input_struct(input: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON-like input object as a Struct (numbers travel as doubles; the server reads whole ones as integers)."""
    struct = struct_pb2.Struct()
    struct.update(dict(input))
    return struct


def plain(value: struct_pb2.Value) -> Any:
    """A Value as JSON-like Python, whole numbers as int."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        n = value.number_value
        return int(n) if math.isfinite(n) and n.is_integer() and abs(n) <= 2**53 else n
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: plain(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [plain(v) for v in value.list_value.values]
    return None


def _time(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)
