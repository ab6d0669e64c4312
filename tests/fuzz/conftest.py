"""The fuzz suites' server: a real rwkvd (demo model) on loopback, run by its own event loop in a thread so that
hypothesis and schemathesis can drive it with plain synchronous clients.

Generations are capped at CAP tokens (see `capped_generations`): random requests ask for anything up to the
engine's limit of a million tokens, and the APIs' defaults run to thousands, which would make a fuzz run as
slow as its longest example. The cap is applied after validation, so what is refused is exactly what would
be refused without it; only the length of what runs changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import pytest

from service.app import App
from service.engine.engine import Engine
from service.engine.protocol import GenerationRequest
from service.engine.sequence import Sink
from tests.support import grpc_target, http_base, needs_engine_in_this_process, running_app

CAP = 4
# Examples per fuzzed operation: small enough for CI; raise it (RWKVD_FUZZ_EXAMPLES=500) to hunt locally.
EXAMPLES = int(os.environ.get("RWKVD_FUZZ_EXAMPLES", "40"))
SETTINGS: dict[str, Any] = {
    "engine.threads": 1,
    "engine.max_batch_size": 16,
    "engine.max_prompt_tokens": 256,  # a huge random prompt is refused, not read for seconds
    "engine.max_new_tokens": 4096,  # below the APIs' own bounds (so the engine's limit is met too), above defaults
    "max_temporary_tasks": 64,
}
T = TypeVar("T")


def capped_generations(patch: pytest.MonkeyPatch, cap: int = CAP) -> None:
    """Every accepted generation runs at most `cap` tokens (min_tokens likewise), whatever it asked for."""
    needs_engine_in_this_process()
    original = Engine.submit

    def submit(self: Engine, request: GenerationRequest, sink: Sink, *more: Any, **named: Any) -> None:
        self.validate(request)  # refusals are decided on what the client asked for
        sampling = request.sampling
        if sampling.max_tokens > cap:
            sampling = dataclasses.replace(sampling, max_tokens=cap, min_tokens=min(sampling.min_tokens, cap))
            request = dataclasses.replace(request, sampling=sampling)
        original(self, request, sink, *more, **named)

    patch.setattr(Engine, "submit", submit)


class ThreadedServer:
    """running_app() on an event loop of its own thread."""

    def __init__(self, **settings: Any) -> None:
        self._settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fuzz-server", daemon=True)
        self._context: AbstractAsyncContextManager[App] | None = None
        self.app: App | None = None

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        self._context = running_app(**self._settings)
        self.app = self.run(self._context.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._context is not None
        try:
            self.run(self._context.__aexit__(None, None, None))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    @property
    def grpc_target(self) -> str:
        assert self.app is not None
        return grpc_target(self.app)

    @property
    def http_base(self) -> str:
        assert self.app is not None
        return http_base(self.app)

    def idle(self, within: float = 30) -> bool:
        """Whether the engine runs nothing, waiting up to `within` seconds for what is running to end."""
        from tests.reliability_support import engine_idle

        assert self.app is not None
        return self.run(engine_idle(self.app, within), timeout=within + 5)


@pytest.fixture(scope="package")
def server() -> Iterator[ThreadedServer]:
    """One server for the whole fuzz package, its generations capped while it runs."""
    with pytest.MonkeyPatch.context() as patch:
        capped_generations(patch)
        with ThreadedServer(**SETTINGS) as running:
            yield running
