"""Client: the synchronous client, an AsyncClient run on a private event loop in a background thread.

There is one implementation of every call, AsyncClient's; each method here only carries it across
to the loop thread and blocks for its result (or, for streams, for each message).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from .client import AsyncClient

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Client, P], R]:
    """The synchronous form of an AsyncClient coroutine method, with the same signature."""

    @functools.wraps(method)
    def blocking(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self._client, *args, **kwargs))

    return blocking


def _iterating(
    method: Callable[Concatenate[AsyncClient, P], AsyncGenerator[T, None]],
) -> Callable[Concatenate[Client, P], Generator[T, None, None]]:
    """The synchronous form of an AsyncClient streaming method: a generator that closing cancels the call."""

    @functools.wraps(method)
    def iterating(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Generator[T, None, None]:
        messages = method(self._client, *args, **kwargs)  # builds the request; the call starts at the first next()
        return self._iterate(messages)

    return iterating


async def _next(messages: AsyncGenerator[T, None]) -> tuple[T] | None:
    """The next message in a 1-tuple, or None at the end: the end crosses back to the caller's thread as a value."""
    try:
        return (await anext(messages),)
    except StopAsyncIteration:
        return None


class Client:
    """A connection to one rwkvd server for synchronous code; safe to share between threads.

    Arguments as for AsyncClient. Streams are generators: leaving the loop early (or close()) cancels
    the call.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        timeout: float | None = 60.0,
        max_attempts: int = 5,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rwkvd-client", daemon=True)
        self._thread.start()
        self._closed = False

        async def connect() -> AsyncClient:  # a grpc.aio channel belongs to the loop it is made in
            return AsyncClient(
                target,
                api_key=api_key,
                tls=tls,
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
                timeout=timeout,
                max_attempts=max_attempts,
            )

        try:
            self._client = self._run(connect())
        except BaseException:
            self._stop_loop()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel (cancelling calls in flight) and stops the loop thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    call = _blocking(AsyncClient.call)
    list_models = _blocking(AsyncClient.list_models)
    get_model = _blocking(AsyncClient.get_model)
    complete = _blocking(AsyncClient.complete)
    complete_stream = _iterating(AsyncClient.complete_stream)
    stream = _iterating(AsyncClient.stream)

    def _run(self, coroutine: Coroutine[Any, Any, R]) -> R:
        if self._loop.is_closed():
            coroutine.close()
            raise RuntimeError("this rwkvd.Client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # interrupted (e.g. KeyboardInterrupt): do not leave the call running
            raise

    def _iterate(self, messages: AsyncGenerator[T, None]) -> Generator[T, None, None]:
        try:
            while (item := self._run(_next(messages))) is not None:
                yield item[0]
        finally:
            if not self._closed:
                self._run(messages.aclose())

    def _stop_loop(self) -> None:
        self._run(self._loop.shutdown_asyncgens())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
