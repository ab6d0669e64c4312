"""HTTP call observation: each call's API label (from its path), error counts by status, and the access log.

Pure ASGI, outside auth, so refusals are seen too. The label is set in the call's context before any
handler runs: engine requests submitted by the call, and tasks it starts (task rounds, predictions),
carry it. Probes and scrapes are logged at debug only; they come every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine.observer import request_api

access_log = logging.getLogger("rwkvd.access")

_OPENAI = ("/v1/chat/", "/v1/completions")
_REPLICATE = ("/v1/predictions", "/v1/run", "/v1/deployments/")
_QUIET = ("/health/", "/metrics")


def api_for_path(path: str) -> str | None:
    """openai, replicate or tasks for the dialects' paths; None for the rest (health, metrics, docs)."""
    if path.startswith("/v1/tasks"):
        return "tasks"
    if path.startswith(_REPLICATE):
        return "replicate"
    if path.startswith("/v1/models"):
        # /v1/models/{owner}/{name}[/...] is Replicate's; /v1/models[/{id}] is OpenAI's.
        return "replicate" if path.removeprefix("/v1/models").strip("/").count("/") >= 1 else "openai"
    if path.startswith(_OPENAI):
        return "openai"
    return None


class ObserveMiddleware:
    def __init__(self, app: ASGIApp, count_error: Callable[[str, str], None] | None = None) -> None:
        self._app = app
        self._count_error = count_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path: str = scope["path"]
        api = api_for_path(path)
        token = request_api.set(api) if api is not None else None
        status = 0
        started = time.perf_counter()

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, observed_send)
        except asyncio.CancelledError:
            status = status or 499  # the client went away before a response started
            raise
        except Exception:
            status = status or 500  # the error middleware outside sends the 500
            raise
        finally:
            if token is not None:
                request_api.reset(token)
            if status >= 400 and self._count_error is not None:
                self._count_error(api or "internal", str(status))
            ms = (time.perf_counter() - started) * 1e3
            level = logging.DEBUG if path.startswith(_QUIET) else logging.INFO
            access_log.log(level, "http %s %s %d %.1fms", scope["method"], path, status, ms)
