"""Transport limits of the HTTP API: request body size (413) and requests handled at once (429 + Retry-After).

An ASGI wrapper around the whole app, so a refusal costs no routing, parsing or engine work. Each refusal
comes in the JSON shape of the dialect its path belongs to (as auth's 401 does). Health probes and
/metrics are never refused for concurrency: a busy server must still answer its probes and be scraped.
Refusals never reach the app's own observation middleware, so they are counted and logged here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ResourceExhausted

from .errors import headers_of, status_of
from .observe import access_log, api_for_path

_EXEMPT = re.compile(r"^/(health/|metrics/?$)")
_TASKS = re.compile(r"^/v1/tasks")
_REPLICATE = re.compile(r"^/v1/(predictions|models/[^/]+/[^/]+|deployments|run)")
RETRY_AFTER_SECONDS = 1.0
DRAIN_SECONDS = 5.0  # at most this long reading an oversized body before refusing it


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int
    max_concurrency: int


class RequestLimits:
    def __init__(self, app: ASGIApp, limits: HttpLimits, count_error: Callable[[str, str], None] | None = None) -> None:
        """`count_error(api, status)` is told of each refusal (the metrics' error counter)."""
        self._app = app
        self._limits = limits
        self._count_error = count_error
        self.active = 0  # requests being handled now, exempt paths not counted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path: str = scope["path"]
        exempt = _EXEMPT.match(path) is not None
        if not exempt and self.active >= self._limits.max_concurrency:
            busy = ResourceExhausted(
                f"{self.active} requests are being handled, at most {self._limits.max_concurrency}; try again shortly",
                reason="TOO_MANY_REQUESTS",
                retry_after=RETRY_AFTER_SECONDS,
            )
            await _send_refusal(send, path, status_of(busy), busy.reason, busy.message, headers_of(busy))
            self._refused(scope, 429)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self._limits.max_body_bytes:
            # Read the rest first only if it is within the drain bound; a far larger body is not worth it.
            drain = declared <= 2 * self._limits.max_body_bytes
            await self._refuse_too_large(receive, send, path, more_body=drain)
            self._refused(scope, 413)
            return
        if not exempt:
            self.active += 1
        try:
            await self._handle(scope, receive, send, path)
        finally:
            if not exempt:
                self.active -= 1

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        """Runs the app, counting the body as it arrives (a chunked body declares no length).

        Past the limit the app reads a disconnect, which every route already handles quietly (no
        error log, no answer), and the 413 is sent once it has returned.
        """
        received = 0
        more_body = True
        too_large = False

        async def counting_receive() -> Message:
            nonlocal received, more_body, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more_body = bool(message.get("more_body", False))
                if received > self._limits.max_body_bytes:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not too_large:  # else whatever the app makes of the cut-off body is dropped
                await send(message)

        try:
            await self._app(scope, counting_receive, guarded_send)
        except Exception:
            if not too_large:
                raise  # a failure of the app's own, not of the body it was denied
        if too_large:
            await self._refuse_too_large(receive, send, path, more_body)
            self._refused(scope, 413)

    def _refused(self, scope: Scope, status: int) -> None:
        path: str = scope["path"]
        if self._count_error is not None:
            self._count_error(api_for_path(path) or "internal", str(status))
        access_log.info("http %s %s %d refused by a limit", scope["method"], path, status)

    async def _refuse_too_large(self, receive: Receive, send: Send, path: str, more_body: bool) -> None:
        """413 with no retry hint (the same body is refused again), after reading what is left of the body
        within a bound: a client still writing when the connection closes sees a reset, not the answer."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):
                drained = 0
                while more_body and drained <= self._limits.max_body_bytes:
                    chunk = await receive()
                    drained += len(chunk.get("body", b""))
                    more_body = chunk["type"] == "http.request" and bool(chunk.get("more_body", False))
        text = f"the request body is larger than {self._limits.max_body_bytes} bytes"
        await _send_refusal(send, path, 413, "REQUEST_TOO_LARGE", text, {"connection": "close"})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server (h11) rejects a malformed length before the app sees it
    return None


async def _send_refusal(send: Send, path: str, status: int, reason: str, message: str, headers: dict[str, str]) -> None:
    content_type, body = refusal_body(path, status, reason, message)
    raw_headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def refusal_body(path: str, status: int, reason: str, message: str) -> tuple[str, bytes]:
    """(content type, body) of a refusal in the shape of the dialect `path` belongs to."""
    if _TASKS.match(path):  # RWKV-Server (FastAPI) shape
        return "application/json", json.dumps({"detail": message}).encode()
    if _REPLICATE.match(path):  # Replicate problem details, as the dialect's own errors
        title = "Too Many Requests" if status == 429 else "Request Too Large"
        problem = {"type": "about:blank", "title": title, "status": status, "detail": message, "reason": reason}
        return "application/problem+json", json.dumps(problem).encode()
    kind = "requests" if status == 429 else "invalid_request_error"  # as openai.py names them
    error = {"message": message, "type": kind, "param": None, "code": reason.lower()}
    return "application/json", json.dumps({"error": error}).encode()
