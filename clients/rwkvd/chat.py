"""Chat sessions: AsyncChatSession (coroutines, from AsyncClient.chat) and ChatSession (blocking, from Client.chat),
plus the chat messages every chat call takes.

A session handle holds one Converse call. Opening it opens (or resumes) the session on the server, whose
RNN state stays there between turns; send() writes a user turn and yields the reply's text as it comes;
last_turn says how the last turn ended. One turn at a time: a turn left before its end is cancelled, and
the handle reads what remains of it before the next one. AsyncChatSession has the one implementation;
ChatSession carries each call to the Client's loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, Self, TypeAlias, TypeVar, Unpack

import grpc

from ._loop import LoopThread
from .errors import RwkvdError, from_rpc_error, from_status
from .params import SamplingOptions, sampling_params
from .tasks import FINISH_REASONS, FinishReason
from .v1 import chat_pb2, common_pb2

if TYPE_CHECKING:
    from .client import AsyncClient

P = ParamSpec("P")
R = TypeVar("R")

ChatRole: TypeAlias = Literal["system", "developer", "user", "assistant"]
# A ChatMessage, an OpenAI-style {"role": ..., "content": ...} mapping, or a (role, content) pair.
MessageLike: TypeAlias = "chat_pb2.ChatMessage | Mapping[str, str] | tuple[str, str]"

ROLES: dict[str, chat_pb2.ChatRole.ValueType] = {
    "system": chat_pb2.CHAT_ROLE_SYSTEM,
    "developer": chat_pb2.CHAT_ROLE_DEVELOPER,
    "user": chat_pb2.CHAT_ROLE_USER,
    "assistant": chat_pb2.CHAT_ROLE_ASSISTANT,
}


def chat_message(message: MessageLike) -> chat_pb2.ChatMessage:
    if isinstance(message, chat_pb2.ChatMessage):
        return message
    role, content = (message["role"], message["content"]) if isinstance(message, Mapping) else message
    if role not in ROLES:
        raise ValueError(f"unknown chat role {role!r}: use one of {', '.join(ROLES)}")
    return chat_pb2.ChatMessage(role=ROLES[role], content=content)


def chat_messages(messages: Sequence[MessageLike] | None) -> list[chat_pb2.ChatMessage]:
    return [chat_message(m) for m in messages or ()]


@dataclass(frozen=True)
class TurnResult:
    """How a turn ended: the whole reply, why it ended, and its usage (prompt_tokens counts only the turn's new
    text; cached_tokens the tokens the session's state already held)."""

    turn_id: str
    text: str
    finish_reason: FinishReason
    usage: common_pb2.Usage
    timings: common_pb2.Timings


class AsyncChatSession:
    """A chat session over one Converse call; open it with `async with` (or open() and close()).

    `id`, `resumed` and `session` (the rwkvd.v1.chat_pb2.Session as opened or last refreshed: turns,
    state_tokens, expire_time) are set once it is open. Not for use by several tasks at once, except
    cancel().
    """

    def __init__(self, client: AsyncClient, request: chat_pb2.OpenSession, timeout: float | None) -> None:
        self._client = client
        self._request = request
        self._timeout = timeout
        self._call: grpc.aio.StreamStreamCall[chat_pb2.ConverseRequest, chat_pb2.ConverseResponse] | None = None
        self._write_lock = asyncio.Lock()
        self._turns = 0
        self._running: str | None = None  # the turn on the server that has not ended yet
        self._left: str | None = None  # a turn whose reader left early: its end is still to be read
        self._closed = False
        self.session = chat_pb2.Session()
        self.resumed = False
        self.last_turn: TurnResult | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id or '(not open)'} {self.session.turns} turns>"

    @property
    def id(self) -> str:
        return self.session.session_id

    async def open(self) -> Self:
        """Opens (or resumes) the session: NotFound for a session id that is unknown, expired or evicted."""
        if self._call is not None:
            raise RuntimeError("this chat session is open already")
        self._call = self._client.stubs.chat.Converse(timeout=self._timeout)
        try:
            await self._write(chat_pb2.ConverseRequest(open=self._request))
            opened = await self._read()
        except BaseException:
            self._call.cancel()
            raise
        self.session, self.resumed = opened.opened.session, opened.opened.resumed
        return self

    async def close(self) -> None:
        """Ends the conversation; a turn still running is cancelled first. The session stays on the server, to
        be resumed by id until it expires."""
        call = self._call
        if call is None or call.done():
            return
        self._closed = True
        try:
            await self.cancel()  # nobody reads a turn still running now
            await call.done_writing()
            while isinstance(message := await call.read(), chat_pb2.ConverseResponse):
                self._on_unread(message)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            await self.close()
        elif self._call is not None:
            self._call.cancel()  # leaving on an error: the server aborts the running turn at once

    async def send(self, content: str, **overrides: Unpack[SamplingOptions]) -> AsyncGenerator[str, None]:
        """Sends a user turn and yields the reply's text as it is generated; last_turn has the end.

        The turn is sent at the first iteration. The sampling keyword arguments override the session's
        for this turn. A failed turn raises its typed error (e.g. FailedPrecondition if another stream of
        the session runs a turn) and the session goes on. Leaving the loop early cancels the turn; the
        text generated so far stays in the session's state.
        """
        await self._settle()
        self._turns += 1
        turn_id = str(self._turns)
        turn = chat_pb2.UserTurn(turn_id=turn_id, content=content, sampling=sampling_params(**overrides))
        self._running = turn_id  # before the write, so that a cancel() meanwhile is not lost
        try:
            await self._write(chat_pb2.ConverseRequest(turn=turn))
        except BaseException:
            self._running = None
            raise
        try:
            while self._running == turn_id:
                message = await self._read()
                if message.HasField("delta"):
                    if message.delta.delta.text:
                        yield message.delta.delta.text
                else:
                    self._end(message)
        finally:
            if self._running == turn_id and self._call is not None and self._call.done():
                self._running = None  # the call has ended, and the turn with it
            if self._running == turn_id:  # left early: stop the turn, read its end before the next one
                self._left = turn_id
                with contextlib.suppress(RwkvdError):  # the call has ended: nothing runs any more
                    await self.cancel()

    async def ask(self, content: str, **overrides: Unpack[SamplingOptions]) -> TurnResult:
        """send() run to the end of the turn: how it ended, with the whole reply."""
        async with contextlib.aclosing(self.send(content, **overrides)) as texts:
            async for _ in texts:
                pass
        assert self.last_turn is not None
        return self.last_turn

    async def cancel(self) -> None:
        """Stops the running turn (from another task than the one reading it); it ends with finish reason
        "cancelled" and its text so far stays in the session's state. Nothing happens when none runs."""
        if self._running is not None:
            await self._write(chat_pb2.ConverseRequest(cancel=chat_pb2.CancelTurn(turn_id=self._running)))

    async def refresh(self, *, timeout: float | None = None) -> chat_pb2.Session:  # noqa: ASYNC109
        """The session as the server has it now (turns, state_tokens, expire_time); also updates `session`."""
        self.session = await self._client.get_session(self.id, timeout=timeout)
        return self.session

    async def export(self, *, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        """The session's state as bytes, for AsyncClient.import_session (on this server or another one that
        serves the same model version)."""
        await self._settle()
        return await self._client.export_session(self.id, timeout=timeout)

    async def _settle(self) -> None:
        """Reads the end of a turn whose reader left early, so that the stream is quiet for the next call."""
        if self._call is None:
            raise RuntimeError("open the chat session first (async with client.chat(...) as session)")
        if self._closed:
            raise RuntimeError("this chat session is closed (resume it by id with client.chat(session.id))")
        if self._running is not None and self._left is None:
            # Its send() was left but not closed yet (an async generator is closed when collected, later).
            self._left = self._running
            await self.cancel()
        while self._left is not None and self._running == self._left:
            message = await self._read()
            if not message.HasField("delta"):
                self._end(message)
        self._left = None

    def _end(self, message: chat_pb2.ConverseResponse) -> None:
        """A turn_end or error: the running turn is over (an error raises)."""
        self._running = None
        if message.HasField("turn_end"):
            end = message.turn_end
            self.last_turn = TurnResult(
                end.turn_id, end.text, FINISH_REASONS.get(end.finish_reason, "error"), end.usage, end.timings
            )
        elif message.HasField("error") and message.error.turn_id != self._left:
            raise from_status(message.error.status)

    def _on_unread(self, message: chat_pb2.ConverseResponse) -> None:
        if not message.HasField("delta"):
            with contextlib.suppress(RwkvdError):  # a turn nobody waits for any more
                self._end(message)

    async def _write(self, request: chat_pb2.ConverseRequest) -> None:
        call = self._call
        assert call is not None
        try:
            async with self._write_lock:  # gRPC allows one write in flight per call
                await call.write(request)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        except asyncio.InvalidStateError as err:  # the call has ended
            raise await self._ended() from err

    async def _read(self) -> chat_pb2.ConverseResponse:
        assert self._call is not None
        try:
            message = await self._call.read()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        if not isinstance(message, chat_pb2.ConverseResponse):  # EOF: the call has ended
            raise await self._ended()
        return message

    async def _ended(self) -> RwkvdError:
        """Why the call has ended, for a read or write after its end (gRPC only says that it has)."""
        call = self._call
        assert call is not None
        self._running = self._left = None  # nothing runs on a call that has ended
        code = await call.code()
        if code is grpc.StatusCode.OK:
            return RwkvdError(grpc.StatusCode.UNKNOWN, "the conversation has ended")
        trailers = await call.trailing_metadata()
        return from_rpc_error(grpc.aio.AioRpcError(code, await call.initial_metadata(), trailers, await call.details()))


def _blocking(
    method: Callable[Concatenate[AsyncChatSession, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[ChatSession, P], R]:
    """The blocking form of an AsyncChatSession coroutine method, with its signature and docstring."""

    @functools.wraps(method)
    def blocking(self: ChatSession, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._loop.run(method(self._session, *args, **kwargs))

    return blocking


class ChatSession:
    """A chat session for synchronous code, made by Client.chat: a context manager with AsyncChatSession's
    operations, blocking. send() returns a generator; leaving it early cancels the turn. cancel() may be
    called from another thread while one reads."""

    def __init__(self, loop: LoopThread, session: AsyncChatSession) -> None:
        self._loop = loop
        self._session = session

    def __repr__(self) -> str:
        return repr(self._session).replace("AsyncChatSession", "ChatSession")

    @property
    def id(self) -> str:
        return self._session.id

    @property
    def resumed(self) -> bool:
        return self._session.resumed

    @property
    def session(self) -> chat_pb2.Session:
        return self._session.session

    @property
    def last_turn(self) -> TurnResult | None:
        return self._session.last_turn

    def open(self) -> Self:
        self._loop.run(self._session.open())
        return self

    open.__doc__ = AsyncChatSession.open.__doc__

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._loop.closing:  # else the client is closed, and its calls with it
            self._loop.run(self._session.__aexit__(exc_type, exc, tb))

    def send(self, content: str, **overrides: Unpack[SamplingOptions]) -> Generator[str, None, None]:
        return self._loop.iterate(self._session.send(content, **overrides))

    send.__doc__ = AsyncChatSession.send.__doc__

    close = _blocking(AsyncChatSession.close)
    ask = _blocking(AsyncChatSession.ask)
    cancel = _blocking(AsyncChatSession.cancel)
    refresh = _blocking(AsyncChatSession.refresh)
    export = _blocking(AsyncChatSession.export)
