"""One real rwkvd server (demo model) for the client tests, shared by the whole session to keep them fast.

Modules whose tests use it run on the session's event loop, where the server lives:
`pytestmark = pytest.mark.asyncio(loop_scope="session")` (so they hold async tests only). Tests that
need other settings (auth, a fixed port) start their own server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest_asyncio
from rwkvd.v1 import completions_pb2_grpc

from service.app import App
from tests.support import grpc_target, running_app


@dataclass(frozen=True)
class Server:
    app: App
    target: str

    async def engine_idle(self, within: float = 3.0) -> bool:
        """Whether the engine has no request running or waiting, polling up to `within` seconds.

        A call the client gave up on must free its engine slot: long generations (thousands of
        tokens take seconds on the demo model) going idle at once shows the call was cancelled.
        """
        assert self.app.engine is not None
        for _ in range(int(within / 0.02)):
            stats = self.app.engine.stats()
            if stats.running == stats.waiting == 0:
                return True
            await asyncio.sleep(0.02)
        return False


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def server() -> AsyncIterator[Server]:
    async with running_app() as app:
        yield Server(app, grpc_target(app))


class _StallingCompletions(completions_pb2_grpc.CompletionServiceServicer):
    """Accepts every call and never answers, so only the client's own deadline can end it."""

    async def CreateCompletion(self, request: Any, context: Any) -> Any:
        await asyncio.Event().wait()

    async def CreateCompletionStream(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield  # pragma: no cover - makes this an async generator


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def stalling_target() -> AsyncIterator[str]:
    """A server whose CompletionService stalls. Deadlines cannot be tested on the real one: it ends a
    call whose deadline passed with OK and finish reason DEADLINE as often as the client's timer wins."""
    stalling = grpc.aio.server()
    completions_pb2_grpc.add_CompletionServiceServicer_to_server(_StallingCompletions(), stalling)
    port = stalling.add_insecure_port("127.0.0.1:0")
    await stalling.start()
    yield f"127.0.0.1:{port}"
    await stalling.stop(0)
