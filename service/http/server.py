"""Runs the HTTP app with uvicorn inside the server's own event loop, on a socket we bind ourselves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("rwkvd.http")


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The app owns SIGTERM/SIGINT (ordered drain of both ports); uvicorn must not take them.
        yield


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int, grace_seconds: float) -> None:
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(1, int(grace_seconds)),
            # Idle keep-alive connections stay open this long. uvicorn's 5 s default is shorter than the idle
            # time clients and load balancers assume (60-75 s), so a pooled connection reused after a pause
            # would hit a socket the server just closed.
            timeout_keep_alive=75,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        self._host = host

    async def start(self) -> int:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="rwkvd-http")
        # uvicorn exposes start-up only as a flag; poll it briefly.
        while not self._server.started and not self._task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()  # raises the startup error
        log.info("HTTP listening on %s:%d", self._host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stops accepting, lets open requests finish within the grace period, then closes."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._sock.close()
