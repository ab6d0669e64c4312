"""Client: the synchronous client, an AsyncClient run on a private event loop in a background thread.

There is one implementation of every call, AsyncClient's; each method here only carries it across
to the loop thread and blocks for its result (or, for streams, for each message). Tasks come back as
Task handles and chat sessions come back as Task and ChatSession handles whose methods do the same.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from ._loop import LoopThread
from .chat import AsyncChatSession, ChatSession
from .client import AsyncClient
from .tasks import AsyncTask, Task

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Client, P], R]:
    """The synchronous form of an AsyncClient coroutine method, with the same signature."""

    @functools.wraps(method)
    def blocking(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._loop.run(method(self._client, *args, **kwargs))

    return blocking


def _task_blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, AsyncTask]],
) -> Callable[Concatenate[Client, P], Task]:
    """The synchronous form of an AsyncClient method that makes an AsyncTask: it returns a (blocking) Task."""

    @functools.wraps(method)
    def blocking(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Task:
        return Task(self._loop, self._loop.run(method(self._client, *args, **kwargs)))

    blocking.__signature__ = inspect.signature(method).replace(return_annotation="Task")  # type: ignore[attr-defined]
    return blocking


def _session_handle(
    method: Callable[Concatenate[AsyncClient, P], AsyncChatSession],
) -> Callable[Concatenate[Client, P], ChatSession]:
    """The synchronous form of AsyncClient.chat: a (blocking) ChatSession, opened by `with`."""

    @functools.wraps(method)
    def handle(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> ChatSession:
        return ChatSession(self._loop, method(self._client, *args, **kwargs))

    handle.__signature__ = inspect.signature(method).replace(return_annotation="ChatSession")  # type: ignore[attr-defined]
    return handle


def _iterating(
    method: Callable[Concatenate[AsyncClient, P], AsyncGenerator[T, None]],
) -> Callable[Concatenate[Client, P], Generator[T, None, None]]:
    """The synchronous form of an AsyncClient streaming method: a generator that closing cancels the call."""

    @functools.wraps(method)
    def iterating(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Generator[T, None, None]:
        messages = method(self._client, *args, **kwargs)  # builds the request; the call starts at the first next()
        return self._loop.iterate(messages)

    return iterating


def _awaiting(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Client, P], Coroutine[Any, Any, R]]:
    """A coroutine method awaitable from any event loop (RockAI's run_async), run on the client's own loop."""

    @functools.wraps(method)
    async def awaiting(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._loop.run_async(method(self._client, *args, **kwargs))

    return awaiting


def _async_iterating(
    method: Callable[Concatenate[AsyncClient, P], AsyncGenerator[T, None]],
) -> Callable[Concatenate[Client, P], AsyncGenerator[T, None]]:
    """A stream iterable with `async for` on any event loop (RockAI's stream_async), run on the client's loop."""

    @functools.wraps(method)
    def async_iterating(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> AsyncGenerator[T, None]:
        return self._loop.iterate_async(method(self._client, *args, **kwargs))

    return async_iterating


class Client:
    """A connection to one rwkvd server for synchronous code; safe to share between threads.

    Arguments as for AsyncClient. Streams are generators: leaving the loop early (or close()) cancels
    the call. run_async() and stream_async() may be awaited from any event loop (as in RockAI's client).
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
        self._loop = LoopThread("rwkvd-client")

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
            self._client = self._loop.run(connect())
        except BaseException:
            self._loop.shutdown()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel (cancelling calls in flight) and stops the loop thread; idempotent."""
        if self._loop.closing:
            return
        self._loop.closing = True
        try:
            self._loop.run(self._client.close())
        finally:
            self._loop.shutdown()

    call = _blocking(AsyncClient.call)
    call_stream = _iterating(AsyncClient.call_stream)
    list_models = _blocking(AsyncClient.list_models)
    get_model = _blocking(AsyncClient.get_model)
    complete = _blocking(AsyncClient.complete)
    complete_stream = _iterating(AsyncClient.complete_stream)

    complete_chat = _blocking(AsyncClient.complete_chat)
    complete_chat_stream = _iterating(AsyncClient.complete_chat_stream)
    chat = _session_handle(AsyncClient.chat)
    get_session = _blocking(AsyncClient.get_session)
    export_session = _blocking(AsyncClient.export_session)
    import_session = _blocking(AsyncClient.import_session)
    delete_session = _blocking(AsyncClient.delete_session)

    create_task = _task_blocking(AsyncClient.create_task)
    create_task_stream = _iterating(AsyncClient.create_task_stream)
    get_task = _task_blocking(AsyncClient.get_task)
    list_tasks = _blocking(AsyncClient.list_tasks)

    run = _blocking(AsyncClient.run)
    stream = _iterating(AsyncClient.stream)
    run_async = _awaiting(AsyncClient.run)
    stream_async = _async_iterating(AsyncClient.stream)
    cancel = _blocking(AsyncClient.cancel)
    create_prediction = _blocking(AsyncClient.create_prediction)
    get_prediction = _blocking(AsyncClient.get_prediction)
    list_predictions = _blocking(AsyncClient.list_predictions)
    prediction_events = _iterating(AsyncClient.prediction_events)
