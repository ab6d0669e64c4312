"""LoopThread: a private event loop in a daemon thread, and the bridges that carry calls onto it.

The synchronous Client and its Task handles run every AsyncClient call here: blocking callers wait
for results (run, iterate), and callers on another event loop await them (run_async, iterate_async).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Coroutine, Generator
from typing import Any, TypeVar

R = TypeVar("R")
T = TypeVar("T")


async def _next(messages: AsyncGenerator[T, None]) -> tuple[T] | None:
    """The next message in a 1-tuple, or None at the end: the end crosses back to the caller's thread as a value."""
    try:
        return (await anext(messages),)
    except StopAsyncIteration:
        return None


class LoopThread:
    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        # Set once the owner starts closing: streams left open then are not closed on the loop again.
        self.closing = False

    def run(self, coroutine: Coroutine[Any, Any, R]) -> R:
        """Runs `coroutine` on the loop and blocks for its result."""
        if self._loop.is_closed():
            coroutine.close()
            raise RuntimeError("this rwkvd.Client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted (e.g. KeyboardInterrupt): do not leave the call running
            raise

    def iterate(self, messages: AsyncGenerator[T, None]) -> Generator[T, None, None]:
        """A blocking generator over `messages`; closing it closes them on the loop (cancelling their call)."""
        try:
            while (item := self.run(_next(messages))) is not None:
                yield item[0]
        finally:
            if not self.closing:
                self.run(messages.aclose())

    async def run_async(self, coroutine: Coroutine[Any, Any, R]) -> R:
        """Awaits `coroutine` run on the loop, from another event loop; cancelling the wait cancels it."""
        if self._loop.is_closed():
            coroutine.close()
            raise RuntimeError("this rwkvd.Client is closed")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    async def iterate_async(self, messages: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """`messages` iterated from another event loop; closing this closes them on the loop."""
        try:
            while (item := await self.run_async(_next(messages))) is not None:
                yield item[0]
        finally:
            if not self.closing:
                await self.run_async(messages.aclose())

    def shutdown(self) -> None:
        """Finalizes the loop's async generators, then stops the loop and its thread."""
        self.run(self._loop.shutdown_asyncgens())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
