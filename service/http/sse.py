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
from typing import cast

from starlette.responses import StreamingResponse

KEEPALIVE = b": keep-alive\n"
HEADERS = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}


def event(data: str, name: str | None = None, event_id: str | None = None) -> bytes:
    if name is None and event_id is None and "\n" not in data and "\r" not in data:
        return ("data: " + data + "\n\n").encode()  # the usual case (a JSON payload): one data line
    lines = []
    if name is not None:
        lines.append(f"event: {name}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    text = data.replace("\r\n", "\n").replace("\r", "\n")
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


_END = object()  # the source is exhausted


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


async def with_keepalive(events: AsyncIterator[bytes], every: float) -> AsyncIterator[bytes]:
    """The events, with a keep-alive comment whenever none came for `every` seconds (client read timeouts).

    One task reads the source into a one-item queue and one timer per `every` seconds checks for silence,
    rather than a task and a timer per event: a stream's events cost two queue hand-offs. The queue holds
    one item, so a slow client still holds the source back (the engine then merges its tokens)."""
    iterator = aiter(events)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=1)
    last = loop.time()  # when the client was last given something

    async def read() -> None:
        try:
            async for item in iterator:
                await queue.put(item)
        except Exception as exc:
            await queue.put(_Failed(exc))
        else:
            await queue.put(_END)

    timer: asyncio.TimerHandle | None = None

    def tick() -> None:
        nonlocal timer
        silent = loop.time() - last
        if silent >= every and queue.empty():
            queue.put_nowait(KEEPALIVE)
            silent = 0.0
        timer = loop.call_later(max(every - silent, every / 10), tick)

    reader = asyncio.ensure_future(read())
    timer = loop.call_later(every, tick)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            last = loop.time()
            yield cast(bytes, item)
    finally:
        if timer is not None:
            timer.cancel()
        if not reader.done():
            reader.cancel()  # the source gets the CancelledError at its await: its finally runs
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        closer = getattr(iterator, "aclose", None)
        if closer is not None:
            await closer()  # runs the source's finally: (aborts, unsubscribes)


def sse_response(events: AsyncIterator[bytes], keepalive: float = 4.0) -> StreamingResponse:
    """A text/event-stream response; keep-alives every `keepalive` s (RockAI's sync client gives up at 5 s)."""
    return StreamingResponse(with_keepalive(events, keepalive), media_type="text/event-stream", headers=HEADERS)
