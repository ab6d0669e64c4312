"""Server-sent events framing shared by the HTTP dialects (one place for the rules every client needs).

Rules (from the decoders of the openai, replicate, rwkv-api and RockAI clients): "\\n" line endings,
one space after "data:", multi-line payloads as several data lines (a lone "\\r" is a line break to
decoders, so it is normalised first), events separated by a blank line, keep-alive as a single
comment line between events (no blank line after it: httpx-sse would dispatch an empty event).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse

KEEPALIVE = b": keep-alive\n"
HEADERS = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}


def event(data: str, name: str | None = None, event_id: str | None = None) -> bytes:
    lines = []
    if name is not None:
        lines.append(f"event: {name}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    text = data.replace("\r\n", "\n").replace("\r", "\n")
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


async def with_keepalive(events: AsyncIterator[bytes], every: float) -> AsyncIterator[bytes]:
    """The events, with a keep-alive comment whenever none came for `every` seconds (client read timeouts)."""
    iterator = aiter(events)
    pending: asyncio.Task[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield KEEPALIVE
                continue
            pending, finished = None, done.pop()
            try:
                yield finished.result()
            except StopAsyncIteration:
                return
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        closer = getattr(iterator, "aclose", None)
        if closer is not None:
            await closer()  # runs the source's finally: (aborts, unsubscribes)


def sse_response(events: AsyncIterator[bytes], keepalive: float = 4.0) -> StreamingResponse:
    """A text/event-stream response; keep-alives every `keepalive` s (RockAI's sync client gives up at 5 s)."""
    return StreamingResponse(with_keepalive(events, keepalive), media_type="text/event-stream", headers=HEADERS)
