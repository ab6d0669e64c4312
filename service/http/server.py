"""Runs the HTTP app with uvicorn inside the server's own event loop, on a socket we bind ourselves.

The listener's transport concerns live here: TLS (uvicorn's ssl options) and the request limits of
limits.py, wrapped around the whole app so that a refusal costs no routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from .limits import HttpLimits, RequestLimits

log = logging.getLogger("rwkvd.http")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the certificate (chain) and its key; a client CA bundle requires client certificates."""

    cert: str
    key: str
    client_ca: str | None = None


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP listening socket whose accepted connections get TCP_NODELAY.

    asyncio sets TCP_NODELAY only on sockets whose `proto` is IPPROTO_TCP, and socket.create_server()
    leaves it 0: Nagle's algorithm then held every SSE event written after the first until the client's
    delayed ACK (~40 ms), so tokens arrived in bursts. Accepted sockets inherit the listener's proto.
    """
    plain = socket.create_server((host, port), reuse_port=False)
    return socket.socket(plain.family, plain.type, socket.IPPROTO_TCP, fileno=plain.detach())


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The app owns SIGTERM/SIGINT (ordered drain of both ports); uvicorn must not take them.
        yield


class HttpServer:
    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        grace_seconds: float,
        limits: HttpLimits | None = None,
        tls: TlsFiles | None = None,
        count_error: Callable[[str, str], None] | None = None,
    ) -> None:
        """`count_error(api, status)` counts the limits' refusals (they never reach the app's middleware)."""
        self.limits = RequestLimits(app, limits, count_error) if limits is not None else None
        self.tls = tls
        self._sock = _listening_socket(host, port)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.limits or app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(1, int(grace_seconds)),
            # Idle keep-alive connections stay open this long. uvicorn's 5 s default is shorter than the idle
            # time clients and load balancers assume (60-75 s), so a pooled connection reused after a pause
            # would hit a socket the server just closed.
            timeout_keep_alive=75,
            ssl_certfile=tls.cert if tls else None,
            ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=tls.client_ca if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
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
        log.info("HTTP listening on %s:%d%s", self._host, self.port, " (TLS)" if self.tls else "")
        return self.port

    async def stop(self) -> None:
        """Stops accepting, lets open requests finish within the grace period, then closes."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._sock.close()
