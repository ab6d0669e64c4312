"""ChatService: chat completions (unary and streamed), bidirectional chat sessions, and session management.

Converse runs as the gRPC guide has it: a reader task drains the request stream in order (turns start,
cancels abort), each turn's events are pumped by a task of their own, and the handler body is the
writer loop over one outbox. A failing turn is answered in-band (TurnError) and the stream goes on;
only a bad or failed open, the session going away meanwhile, or a bug end the stream with a status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import aclosing

from rwkvd.v1 import chat_pb2, chat_pb2_grpc

from service.domain.chat import ChatCompletions, chat_usage
from service.domain.sessions import ChatSession, SessionManager, Turn
from service.domain.tasks import TaskManager
from service.engine.protocol import Delta, Finished, FinishReason, Started
from service.errors import InternalError, InvalidArgument, RwkvdError
from service.grpc import convert
from service.grpc.calls import Context, deadline_of
from service.grpc.status import status_of

SESSION_ID_HEADER = "x-session-id"
# A call that ends (client gone, deadline) mid-turn aborts the turn, then waits this long for the engine to
# hand back the state with the partial reply; the engine ends an aborted request within a step.
SETTLE_SECONDS = 5.0


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(self, chat: ChatCompletions, sessions: SessionManager, tasks: TaskManager) -> None:
        self._chat = chat
        self._sessions = sessions
        self._tasks = tasks

    async def Complete(self, request: chat_pb2.CompleteRequest, context: Context) -> chat_pb2.CompleteResponse:
        prepared = self._chat.prepare(convert.chat_request(request, deadline_of(context)))
        return convert.chat_response(await self._chat.complete(prepared))

    async def CompleteStream(
        self, request: chat_pb2.CompleteStreamRequest, context: Context
    ) -> AsyncIterator[chat_pb2.CompleteStreamResponse]:
        prepared = self._chat.prepare(convert.chat_request(request, deadline_of(context)))
        started: Started | None = None
        ends: list[Finished] = []
        # aclosing: if the client cancels, every choice's engine request is aborted here and its slot freed.
        async with aclosing(self._chat.stream(prepared)) as events:
            async for item in events:
                event = item.event
                if isinstance(event, Started):
                    started = event
                    yield convert.chat_chunk(prepared)  # the prompt is read: the id comes before any text
                    continue
                if isinstance(event, Finished):
                    ends.append(event)
                end_usage = chat_usage(prepared, started, ends) if len(ends) == prepared.n else None
                yield convert.chat_chunk(prepared, [convert.choice_delta(item.index, event)], end_usage)

    async def Converse(
        self, request_iterator: AsyncIterator[chat_pb2.ConverseRequest], context: Context
    ) -> AsyncIterator[chat_pb2.ConverseResponse]:
        first = await anext(request_iterator, None)
        if first is None:
            return  # the client closed without asking anything
        if first.WhichOneof("action") != "open":
            raise InvalidArgument.for_field("open", "the first message must open a session", reason="OPEN_REQUIRED")
        session, resumed = await self._open(first.open)
        # Before the first message, so that a proxy can route the session's later streams by it.
        await context.send_initial_metadata(((SESSION_ID_HEADER, session.id),))
        opened = chat_pb2.SessionOpened(session=self._session(session), resumed=resumed)
        yield chat_pb2.ConverseResponse(opened=opened)

        conversation = _Conversation(self._sessions, session)
        reader = asyncio.create_task(conversation.read(request_iterator))
        try:
            while (message := await conversation.outbox.get()) is not None:
                if isinstance(message, Exception):
                    raise message
                yield message
        finally:
            reader.cancel()
            # Never cancelled itself: a running turn is aborted and its pump records the state it left.
            await conversation.abort()

    async def GetSession(self, request: chat_pb2.GetSessionRequest, context: Context) -> chat_pb2.GetSessionResponse:
        return chat_pb2.GetSessionResponse(session=self._session(self._sessions.get(request.session_id)))

    async def ExportSession(
        self, request: chat_pb2.ExportSessionRequest, context: Context
    ) -> chat_pb2.ExportSessionResponse:
        session, state = await self._sessions.export(request.session_id)
        return chat_pb2.ExportSessionResponse(session=self._session(session), state=state)

    async def ImportSession(
        self, request: chat_pb2.ImportSessionRequest, context: Context
    ) -> chat_pb2.ImportSessionResponse:
        session = await self._sessions.import_(request.state, convert.sampling_overrides(request.sampling))
        return chat_pb2.ImportSessionResponse(session=self._session(session))

    async def DeleteSession(
        self, request: chat_pb2.DeleteSessionRequest, context: Context
    ) -> chat_pb2.DeleteSessionResponse:
        await self._sessions.delete(request.session_id)
        return chat_pb2.DeleteSessionResponse(session_id=request.session_id)

    async def _open(self, pb: chat_pb2.OpenSession) -> tuple[ChatSession, bool]:
        start = await self._tasks.template_state(pb.template_id) if pb.template_id else None
        return await self._sessions.open(
            session_id=pb.session_id,
            model=pb.model,
            start=start,
            history=convert.chat_messages(pb.history, "open.history"),
            sampling=convert.sampling_overrides(pb.sampling),
        )

    def _session(self, session: ChatSession) -> chat_pb2.Session:
        return convert.chat_session(session, self._sessions.expire_time(session))


class _Conversation:
    """One Converse stream after its open: the session, its running turn, and the outbox the writer sends.

    The reader handles requests in the order they came (so a cancel never overtakes the turn it names);
    the pump of a running turn is the only place that ends it (SessionManager.end_turn).
    """

    def __init__(self, sessions: SessionManager, session: ChatSession) -> None:
        self._sessions = sessions
        self._session = session
        # Messages for the writer, an error that ends the stream, or None at the end. Unbounded so that neither
        # the reader nor a pump ever waits on a slow client: a cancel still acts at once.
        self.outbox: asyncio.Queue[chat_pb2.ConverseResponse | Exception | None] = asyncio.Queue()
        self._turns = 0  # turn messages so far, to number those that come without an id
        self._running: tuple[str, asyncio.Task[None]] | None = None  # (turn id, its pump)

    async def read(self, requests: AsyncIterator[chat_pb2.ConverseRequest]) -> None:
        try:
            async for request in requests:
                await self._handle(request)
            # Half-closed: the running turn still ends and is answered, then the stream ends.
            if self._running is not None:
                await asyncio.wait([self._running[1]])  # wait(), not await: cancelling the reader spares the pump
            self.outbox.put_nowait(None)
        except Exception as exc:  # a bug, or the request stream broke: end the call with it
            self.outbox.put_nowait(exc)

    async def abort(self) -> None:
        """Aborts the running turn (the call has ended); its pump records the state and the partial reply."""
        if self._running is None:
            return
        pump = self._running[1]
        await self._sessions.cancel(self._session)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_SECONDS):
                await asyncio.wait([pump])
        pump.cancel()  # a no-op once it has ended

    async def _handle(self, request: chat_pb2.ConverseRequest) -> None:
        action = request.WhichOneof("action")
        if action == "turn":
            self._turns += 1
            turn_id = request.turn.turn_id or str(self._turns)
            # get() again: using the session keeps it alive, and one that has expired or been deleted since
            # the stream opened ends the stream (NotFound), as no later turn could run either.
            session = self._sessions.get(self._session.id)
            try:
                self._start(turn_id, session, request.turn)
            except RwkvdError as exc:  # busy, bad sampling, engine full: this turn fails, the session goes on
                self.outbox.put_nowait(convert.turn_error(turn_id, status_of(exc)))
        elif action == "cancel":
            # An id that is not running names a turn that has just ended (or never started): nothing to stop.
            if self._running is not None and request.cancel.turn_id in ("", self._running[0]):
                await self._sessions.cancel(self._session)
        else:
            error = InvalidArgument.for_field(
                action or "action", "the session is open already; send turns and cancels", reason="ALREADY_OPEN"
            )
            self.outbox.put_nowait(convert.turn_error("", status_of(error)))

    def _start(self, turn_id: str, session: ChatSession, pb: chat_pb2.UserTurn) -> None:
        session_tokens = session.state_tokens
        turn = self._sessions.start_turn(session, pb.content, convert.sampling_overrides(pb.sampling))
        pump = asyncio.create_task(self._pump(turn_id, turn, session_tokens))
        self._running = (turn_id, pump)

    async def _pump(self, turn_id: str, turn: Turn, session_tokens: int) -> None:
        """The turn's events into the outbox; ends the turn in the session however its events end."""
        finished: Finished | None = None
        text: list[str] = []
        try:
            async with aclosing(turn.events) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        text.append(event.text)
                        self.outbox.put_nowait(convert.turn_delta(turn_id, event))
                    elif isinstance(event, Finished):
                        finished = event
        except RwkvdError as exc:  # the engine refused or lost the turn: this turn fails, the session goes on
            self.outbox.put_nowait(convert.turn_error(turn_id, status_of(exc)))
        except Exception as exc:  # a bug: the stream ends with INTERNAL
            self.outbox.put_nowait(exc)
        finally:
            # Before the answer goes out: a client that sends its next turn on seeing it must not find this
            # one still running.
            self._sessions.end_turn(turn, finished)
            if self._running is not None and self._running[1] is asyncio.current_task():
                self._running = None
        if finished is None:
            return
        if finished.reason is FinishReason.ERROR:
            error = InternalError(finished.error or "the turn failed", reason="GENERATION_FAILED")
            self.outbox.put_nowait(convert.turn_error(turn_id, status_of(error)))
        else:
            self.outbox.put_nowait(convert.turn_end(turn_id, finished, session_tokens, "".join(text)))
