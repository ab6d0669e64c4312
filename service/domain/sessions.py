"""Chat sessions: conversations whose RNN state stays on this server, so each turn reads only its new text.

A session holds the state after its last turn and knows how that state ends (a fresh start, a
history that ended with a blank line, a reply, or a reply cut at the "User:" the model began), so the
next turn's text joins it exactly as the chat format would have written the whole conversation.
Sessions live in memory under an idle limit and a count limit (an expired or evicted id says so),
and move between replicas by export and import. One turn at a time per session.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from service.engine.protocol import (
    EngineClient,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StateRef,
    TokenStream,
)
from service.errors import FailedPrecondition, InvalidArgument, NotFound

from .chat import CHAT_DEFAULTS, ChatMessage, prompt_as
from .models import resolve_model
from .prompts import ASSISTANT_OPEN, render_turn, turn_content
from .sampling import NO_OVERRIDES, SamplingOverrides

EXPORT_FORMAT = "rwkvd-session-v1"


class Tail(enum.Enum):
    """How a session's state ends, which decides how the next user turn starts."""

    FRESH = "fresh"  # nothing read: "User: …"
    BLANK_LINE = "blank_line"  # a history or template ending in a blank line: "User: …"
    REPLY = "reply"  # inside an assistant reply: "\n\nUser: …"
    USER_MARK = "user_mark"  # the reply stopped at "\n\nUser:", already read up to its ":": " …"

    def opening(self, content: str) -> str:
        if self is Tail.USER_MARK:
            return f" {turn_content(content)}\n\n{ASSISTANT_OPEN}"
        lead = "\n\n" if self is Tail.REPLY else ""
        return lead + render_turn("User", content) + ASSISTANT_OPEN


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = 256
    idle_seconds: float = 1800.0
    remember_gone: int = 10_000


@dataclass
class ChatSession:
    id: str
    model: str
    defaults: SamplingOverrides
    state: StateRef | None = None
    tail: Tail = Tail.FRESH
    turns: int = 0
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    turn_request: str | None = None  # the engine request of the running turn

    @property
    def state_tokens(self) -> int:
        return self.state.token_count if self.state is not None else 0

    def expires(self, idle_seconds: float) -> float:
        return self.last_used + idle_seconds


@dataclass(frozen=True)
class Turn:
    """A started turn: its engine events, the prompt tokens it reads, and the session it belongs to."""

    session: ChatSession
    request_id: str
    prompt_tokens: int
    events: TokenStream


class SessionManager:
    def __init__(
        self, engine: EngineClient, limits: SessionLimits = SessionLimits(), defaults: SamplingParams = CHAT_DEFAULTS
    ) -> None:
        self._engine = engine
        self._limits = limits
        self._defaults = defaults
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> why it is gone (expired, evicted, deleted)

    async def open(
        self,
        session_id: str = "",
        model: str = "",
        start: StateRef | None = None,
        history: Sequence[ChatMessage] = (),
        sampling: SamplingOverrides = NO_OVERRIDES,
    ) -> tuple[ChatSession, bool]:
        """Resumes `session_id`, or makes a new session (from `start`, then `history` read into it)."""
        if session_id:
            if start is not None or history:
                raise InvalidArgument.for_field(
                    "session_id", "a resumed session keeps its state; start and history are for new ones"
                )
            return self.get(session_id), True
        served = resolve_model(self._engine, model)
        self._check(sampling)
        session = ChatSession(id=f"sess_{uuid.uuid4().hex}", model=served.id, defaults=sampling, state=start)
        if start is not None:
            session.tail = Tail.BLANK_LINE
        if history:
            text = "".join(render_turn(m.role.speaker, m.content) for m in history)
            await self._read(session, self._engine.tokenizer.encode(text))
            session.tail = Tail.BLANK_LINE
        self._remember(session)
        return session, False

    def get(self, session_id: str) -> ChatSession:
        self._expire()
        session = self._sessions.get(session_id)
        if session is None:
            why = self._gone.get(session_id)
            reason = {"expired": "SESSION_EXPIRED", "evicted": "SESSION_EVICTED"}.get(why or "", "SESSION_NOT_FOUND")
            raise NotFound.resource_missing("session", session_id, reason=reason, detail=why or "")
        session.last_used = time.time()
        self._sessions.move_to_end(session_id)
        return session

    def start_turn(self, session: ChatSession, content: str, overrides: SamplingOverrides) -> Turn:
        """Submits a user turn; raises (busy, bad input, engine full) before anything changes."""
        if session.turn_request is not None:
            raise FailedPrecondition("a turn of this session is still running", reason="TURN_RUNNING")
        params = overrides.over(session.defaults).resolve(self._defaults)
        prompt = self._engine.tokenizer.encode(session.tail.opening(content))
        request_id = f"{session.id}#{session.turns + 1}"
        try:
            events = self._engine.generate(
                GenerationRequest(
                    request_id=request_id,
                    prompt=tuple(prompt),
                    sampling=params,
                    start_state=session.state,
                    keep_state=True,
                    use_prefix_cache=session.state is None,
                )
            )
        except InvalidArgument as exc:
            raise prompt_as(exc, "content") from None  # the turn's text, not an engine prompt the client never saw
        session.turn_request = request_id
        session.last_used = time.time()
        return Turn(session, request_id, len(prompt), events)

    def end_turn(self, turn: Turn, finished: Finished | None) -> None:
        """Records how a turn ended: the state it left (kept also when cancelled) and how that state ends."""
        session = turn.session
        session.turn_request = None
        session.last_used = time.time()
        if finished is None or finished.state is None:
            return  # failed before a state existed: the session is as it was
        session.state = finished.state
        session.turns += 1
        stopped_at_user = finished.reason is FinishReason.STOP_SEQUENCE  # the chat stops end with "User:"
        session.tail = Tail.USER_MARK if stopped_at_user else Tail.REPLY

    async def cancel(self, session: ChatSession) -> None:
        if session.turn_request is not None:
            await self._engine.abort(session.turn_request)

    async def export(self, session_id: str) -> tuple[ChatSession, bytes]:
        """The session as bytes: a JSON header line (how it ends, its turns, its model) and the engine state."""
        session = self.get(session_id)
        if session.turn_request is not None:
            raise FailedPrecondition("a turn of this session is still running", reason="TURN_RUNNING")
        if session.state is None:
            raise FailedPrecondition("the session has no state yet", reason="NO_STATE")
        header = {"format": EXPORT_FORMAT, "tail": session.tail.value, "turns": session.turns, "model": session.model}
        return session, json.dumps(header).encode() + b"\n" + await self._engine.export_state(session.state)

    async def import_(self, data: bytes, sampling: SamplingOverrides = NO_OVERRIDES) -> ChatSession:
        self._check(sampling)
        head, sep, state_bytes = data.partition(b"\n")
        try:
            header = json.loads(head) if sep else {}
        except ValueError:
            header = {}
        if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
            raise InvalidArgument.for_field(
                "state", f"not an exported session ({EXPORT_FORMAT})", reason="INVALID_STATE"
            )
        state = await self._engine.import_state(state_bytes)
        session = ChatSession(
            id=f"sess_{uuid.uuid4().hex}",
            model=self._engine.model.id,
            defaults=sampling,
            state=state,
            tail=Tail(header.get("tail", Tail.REPLY.value)),
            turns=int(header.get("turns", 0)),
        )
        self._remember(session)
        return session

    async def delete(self, session_id: str) -> None:
        session = self.get(session_id)
        await self.cancel(session)
        del self._sessions[session_id]
        self._forget(session_id, "deleted")

    def _check(self, sampling: SamplingOverrides) -> None:
        """Refuses bad session defaults now, not at every turn."""
        self._engine.check(GenerationRequest("check", (), sampling.resolve(self._defaults)))

    def expire_time(self, session: ChatSession) -> float:
        return session.expires(self._limits.idle_seconds)

    async def _read(self, session: ChatSession, tokens: list[int]) -> None:
        """Reads tokens into the session's state without generating (max_tokens 0)."""
        params = replace(self._defaults, max_tokens=0)
        request = GenerationRequest(
            request_id=f"{session.id}#history",
            prompt=tuple(tokens),
            sampling=params,
            start_state=session.state,
            keep_state=True,
            use_prefix_cache=session.state is None,
        )
        try:
            events = self._engine.generate(request)
        except InvalidArgument as exc:
            raise prompt_as(exc, "history") from None
        async for event in events:
            if isinstance(event, Finished):
                if event.state is None:
                    raise InvalidArgument.for_field("history", event.error or "could not be read")
                session.state = event.state

    def _remember(self, session: ChatSession) -> None:
        self._expire()
        self._sessions[session.id] = session
        idle = [s.id for s in self._sessions.values() if s.turn_request is None]
        for session_id in idle[: max(0, len(self._sessions) - self._limits.max_sessions)]:
            del self._sessions[session_id]
            self._forget(session_id, "evicted")

    def _expire(self) -> None:
        now = time.time()
        for session_id in [
            s.id
            for s in self._sessions.values()
            if s.turn_request is None and s.expires(self._limits.idle_seconds) < now
        ]:
            del self._sessions[session_id]
            self._forget(session_id, "expired")

    def _forget(self, session_id: str, why: str) -> None:
        self._gone[session_id] = why
        while len(self._gone) > self._limits.remember_gone:
            self._gone.popitem(last=False)
