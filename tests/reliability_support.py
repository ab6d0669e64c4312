"""Helpers shared by the reliability tests (tests/test_reliability_*.py, tests/fuzz/): SSE parsing, token
continuity, gRPC error details, engine step pacing and waiting on the engine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import message as pb_message
from google.rpc import error_details_pb2, status_pb2
from rwkvd.v1 import common_pb2

from service.app import App
from service.engine.runner import Runner
from service.engine.sequence import Sequence as EngineSequence
from tests.support import needs_engine_in_this_process

DETAILS_KEY = "grpc-status-details-bin"


# ---- gRPC error details ------------------------------------------------------------------------------


@dataclass
class ErrorDetails:
    """The google.rpc details of a failed call."""

    reason: str = ""
    fields: list[str] = field(default_factory=list)
    retry_delay: float | None = None
    resource: tuple[str, str] | None = None


def details_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> ErrorDetails | None:
    """The details in a call's trailing metadata (None when the status carries none)."""
    raw = dict(metadata or ()).get(DETAILS_KEY)
    if not isinstance(raw, bytes):
        return None
    out = ErrorDetails()
    for detail in status_pb2.Status.FromString(raw).details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
            error_details_pb2.ResourceInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                unpacked: Any = kind()
                detail.Unpack(unpacked)
                if isinstance(unpacked, error_details_pb2.ErrorInfo):
                    out.reason = unpacked.reason
                elif isinstance(unpacked, error_details_pb2.BadRequest):
                    out.fields = [v.field for v in unpacked.field_violations]
                elif isinstance(unpacked, error_details_pb2.RetryInfo):
                    out.retry_delay = unpacked.retry_delay.ToNanoseconds() / 1e9
                else:
                    out.resource = (unpacked.resource_type, unpacked.resource_name)
    return out


def rpc_details(err: grpc.RpcError) -> ErrorDetails | None:
    trailing = err.trailing_metadata()  # type: ignore[attr-defined]
    return details_of(trailing)


def field_root(path: str) -> str:
    """The top-level field of a violation path: "messages[0].content" -> "messages", "sampling.top_p" -> "sampling"."""
    for sep in (".", "["):
        path = path.split(sep, 1)[0]
    return path


def message_field_names(message: pb_message.Message) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.fields}


# ---- token continuity ----------------------------------------------------------------------------------


def contiguous_tokens(deltas: Iterable[common_pb2.GenerationDelta]) -> list[int]:
    """The token ids of a stream's deltas, asserting that each delta starts where the previous one ended
    (offset 0 first): no token lost, none repeated."""
    tokens: list[int] = []
    for delta in deltas:
        assert delta.offset == len(tokens), f"delta at offset {delta.offset} after {len(tokens)} tokens"
        tokens.extend(delta.token_ids)
    return tokens


# ---- SSE ----------------------------------------------------------------------------------------------


@dataclass
class SseEvent:
    data: str
    name: str | None = None
    id: str | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class SseParser:
    """Incremental text/event-stream parser (comment lines such as keep-alives are dropped)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._name: str | None = None
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        events: list[SseEvent] = []
        while b"\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n", 1)
            line = raw.decode()
            if not line:
                if self._data or self._name is not None:
                    events.append(SseEvent("\n".join(self._data), self._name, self._id))
                self._data, self._name, self._id = [], None, None
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    self._data.append(value)
                elif name == "event":
                    self._name = value
                elif name == "id":
                    self._id = value
        return events

    @property
    def pending(self) -> bool:
        """Whether an event was left incomplete."""
        return bool(self._buffer or self._data or self._name is not None)


def parse_sse(raw: bytes) -> list[SseEvent]:
    parser = SseParser()
    events = parser.feed(raw)
    assert not parser.pending, "the stream ended inside an event"
    return events


def over_sse(text: str) -> str:
    """What a text looks like after an SSE round trip: a CR ends a line, so CR LF and CR arrive as LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---- the engine ---------------------------------------------------------------------------------------


def engine_of(app: App) -> Any:
    assert app.engine is not None
    return app.engine


def steps(app: App) -> int:
    return int(engine_of(app).step_clock()["steps"])


async def wait_until(condition: Callable[[], bool], within: float = 30.0, poll: float = 0.002) -> bool:
    end = time.monotonic() + within
    while not condition():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(poll)
    return True


async def engine_idle(app: App, within: float = 30.0) -> bool:
    def idle() -> bool:
        s = engine_of(app).stats()
        return bool(s.slots_in_use == s.running == s.waiting == 0)

    return await wait_until(idle, within)


@contextmanager
def paced_steps(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Iterator[None]:
    """Every engine step takes at least `seconds` (the engine thread sleeps before the forward pass).

    Only the pace changes, nothing the engine computes: it makes "within N steps" and "still running
    while the rest arrive" independent of how fast this machine happens to be.
    """
    needs_engine_in_this_process()
    original = Runner.launch

    def slow(self: Runner, plan: Any) -> Any:
        time.sleep(seconds)
        return original(self, plan)

    with monkeypatch.context() as patch:
        patch.setattr(Runner, "launch", slow)
        yield


@contextmanager
def failing_rows(
    monkeypatch: pytest.MonkeyPatch, doomed: Callable[[EngineSequence], bool], after_tokens: int = 2
) -> Iterator[list[str]]:
    """A fault inside one request: once a doomed sequence has generated `after_tokens` tokens, handling its next
    sampled token raises (as a bug in the per-row post-processing would). Yields the ids of the sequences
    that failed."""
    needs_engine_in_this_process()
    original = EngineSequence.on_token
    failed: list[str] = []

    def on_token(self: EngineSequence, token: int, logprob: Any, now: float, defer_text: bool = False) -> bool:
        if len(self.generated) >= after_tokens and doomed(self):
            failed.append(self.id)
            raise RuntimeError("injected fault in one row")
        return original(self, token, logprob, now, defer_text)

    with monkeypatch.context() as patch:
        patch.setattr(EngineSequence, "on_token", on_token)
        yield failed
