"""ChatCompletions and SessionManager on the real engine: prompt format and cache points, prefix reuse, n choices
from one prefill, and sessions whose turns read only their new text."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from service.domain.chat import ChatCompletions, ChatMessage, ChatRequest, ChatRole
from service.domain.prompts import render_turn
from service.domain.sampling import SamplingOverrides
from service.domain.sessions import ChatSession, SessionLimits, SessionManager, Tail, Turn
from service.engine.config import EngineConfig
from service.engine.local import LocalEngineClient, build_engine
from service.engine.protocol import Delta, Finished, FinishReason
from service.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.support import eventually

GREEDY = SamplingOverrides(max_tokens=8, temperature=0.0, ignore_eos=True)
SYSTEM = ChatMessage(ChatRole.SYSTEM, "You are a helpful assistant.\n\nAnswer briefly.")
HELLO = ChatMessage(ChatRole.USER, "Hello there, how are you today?")


@pytest.fixture(scope="module")
def engine() -> Iterator[LocalEngineClient]:
    client = build_engine(EngineConfig(max_batch_size=8, prefix_cache_min_tokens=4, model_aliases=("gpt-3.5-turbo",)))
    yield client
    client.shutdown()


@pytest.fixture
def chat(engine: LocalEngineClient) -> ChatCompletions:
    return ChatCompletions(engine)


def test_prompt_is_the_turns_tokenized_one_by_one(chat: ChatCompletions, engine: LocalEngineClient) -> None:
    prepared = chat.prepare(ChatRequest([SYSTEM, HELLO], model="gpt-3.5-turbo"))
    encode = engine.tokenizer.encode
    system = encode(render_turn("System", SYSTEM.content))
    user = encode(render_turn("User", HELLO.content))
    assert prepared.prompt == tuple(system + user + encode("Assistant:"))
    assert render_turn("System", SYSTEM.content) == "System: You are a helpful assistant.\nAnswer briefly.\n\n"
    assert prepared.cache_points == (len(system), len(system) + len(user))
    assert prepared.model == "local/rwkv7-demo"  # the alias names the served model
    assert prepared.params.stop[:2] == ("\n\nUser:", "\nUser:")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ChatRequest([]), "messages"),
        (ChatRequest([HELLO], n=0), "n"),
        (ChatRequest([HELLO], n=9), "n"),
        (ChatRequest([HELLO], sampling=SamplingOverrides(temperature=-1.0)), "sampling.temperature"),
    ],
)
def test_bad_requests_name_the_field(chat: ChatCompletions, request_: ChatRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        chat.prepare(request_)  # everything, sampling included, is checked before anything runs
    assert err.value.violations[0].field == field


def test_unknown_model_is_not_found(chat: ChatCompletions) -> None:
    with pytest.raises(NotFound):
        chat.prepare(ChatRequest([HELLO], model="gpt-4"))


async def test_a_repeated_conversation_starts_from_the_cached_state(chat: ChatCompletions) -> None:
    first = await chat.complete(chat.prepare(ChatRequest([SYSTEM, HELLO], sampling=GREEDY)))
    follow_up = [
        SYSTEM,
        HELLO,
        ChatMessage(ChatRole.ASSISTANT, first.choices[0].text),
        ChatMessage(ChatRole.USER, "And?"),
    ]
    second = await chat.complete(chat.prepare(ChatRequest(follow_up, sampling=GREEDY)))
    earlier_messages = chat.prepare(ChatRequest([SYSTEM, HELLO])).cache_points[-1]
    # At least the earlier messages come from the cache (the reply's own tokens often match too: the state
    # at the end of the first generation is cached as well).
    assert earlier_messages <= second.usage.cached_tokens < second.usage.prompt_tokens


async def test_n_choices_fork_from_one_prefill(chat: ChatCompletions) -> None:
    sampling = SamplingOverrides(max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    result = await chat.complete(chat.prepare(ChatRequest([HELLO], sampling=sampling, n=3)))
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert len({c.text for c in result.choices}) > 1  # each choice has its own random stream
    assert result.usage.prompt_tokens == len(chat.prepare(ChatRequest([HELLO])).prompt)  # counted once
    assert result.usage.completion_tokens == 18
    again = await chat.complete(chat.prepare(ChatRequest([HELLO], sampling=sampling, n=3)))
    assert [c.text for c in again.choices] == [c.text for c in result.choices]  # seeded: reproducible
    single = await chat.complete(chat.prepare(ChatRequest([HELLO], sampling=SamplingOverrides(seed=12).over(sampling))))
    assert single.choices[0].text == result.choices[1].text  # choice i uses seed + i


async def test_closing_a_stream_frees_every_slot(chat: ChatCompletions, engine: LocalEngineClient) -> None:
    long = SamplingOverrides(max_tokens=500, ignore_eos=True)
    stream = chat.stream(chat.prepare(ChatRequest([HELLO], sampling=long, n=3)))
    async with contextlib.aclosing(stream):
        async for item in stream:
            if isinstance(item.event, Delta):
                break
    assert await eventually(lambda: engine.stats().slots_in_use == 0)


async def run_turn(
    sessions: SessionManager, session: ChatSession, content: str, **kw: object
) -> tuple[Turn, Finished, str]:
    turn = sessions.start_turn(session, content, SamplingOverrides(**kw).over(GREEDY))  # type: ignore[arg-type]
    finished: Finished | None = None
    text = ""
    try:
        async for event in turn.events:
            if isinstance(event, Delta):
                text += event.text
            elif isinstance(event, Finished):
                finished = event
    finally:
        sessions.end_turn(turn, finished)
    assert finished is not None
    return turn, finished, text


async def test_session_turns_read_only_their_new_text(engine: LocalEngineClient) -> None:
    sessions = SessionManager(engine)
    session, resumed = await sessions.open(history=[SYSTEM])
    assert not resumed
    assert session.tail is Tail.BLANK_LINE
    system_tokens = len(engine.tokenizer.encode(render_turn("System", SYSTEM.content)))
    assert session.state_tokens == system_tokens - 1  # its last token is pending
    for i, content in enumerate(["Hello there", "How are you?", "Tell me more"]):
        before = session.state_tokens
        turn, finished, _ = await run_turn(sessions, session, content)
        expected = engine.tokenizer.encode(Tail.REPLY.opening(content) if i else Tail.BLANK_LINE.opening(content))
        assert turn.prompt_tokens == finished.usage.prompt_tokens == len(expected)
        assert session.state_tokens == before + turn.prompt_tokens + finished.usage.completion_tokens
        assert session.turns == i + 1
        assert session.tail is Tail.REPLY  # ended by max_tokens, inside the reply
    again, resumed = await sessions.open(session.id)
    assert resumed
    assert again is session
    with pytest.raises(InvalidArgument):
        await sessions.open(session.id, history=[SYSTEM])


async def test_a_turn_stopped_at_user_joins_the_next_without_repeating_it(engine: LocalEngineClient) -> None:
    assert Tail.USER_MARK.opening("hi") == " hi\n\nAssistant:"
    assert Tail.REPLY.opening("hi") == "\n\nUser: hi\n\nAssistant:"
    assert Tail.FRESH.opening("a\n\nb") == "User: a\nb\n\nAssistant:"
    sessions = SessionManager(engine)
    session, _ = await sessions.open()
    turn = sessions.start_turn(session, "x", GREEDY)
    finished = None
    async for event in turn.events:
        if isinstance(event, Finished):
            finished = event
    assert finished is not None
    sessions.end_turn(turn, Finished(**{**finished.__dict__, "reason": FinishReason.STOP_SEQUENCE}))
    assert session.tail is Tail.USER_MARK


async def test_one_turn_at_a_time_and_cancel_keeps_the_partial_reply(engine: LocalEngineClient) -> None:
    sessions = SessionManager(engine)
    session, _ = await sessions.open()
    turn = sessions.start_turn(session, "go", SamplingOverrides(max_tokens=500).over(GREEDY))
    with pytest.raises(FailedPrecondition) as busy:
        sessions.start_turn(session, "again", GREEDY)
    assert busy.value.reason == "TURN_RUNNING"
    finished = None
    async for event in turn.events:
        if isinstance(event, Delta) and event.offset >= 3:
            await sessions.cancel(session)
        if isinstance(event, Finished):
            finished = event
    sessions.end_turn(turn, finished)
    assert finished is not None
    assert finished.reason is FinishReason.CANCELLED
    assert session.turns == 1
    assert session.state_tokens == turn.prompt_tokens + finished.usage.completion_tokens - 1
    _, after, _ = await run_turn(sessions, session, "next")  # goes on from the partial reply
    assert after.usage.prompt_tokens == len(engine.tokenizer.encode(Tail.REPLY.opening("next")))


async def test_export_then_import_continues_identically(engine: LocalEngineClient) -> None:
    sessions = SessionManager(engine)
    session, _ = await sessions.open(history=[SYSTEM])
    await run_turn(sessions, session, "Hello")
    _, data = await sessions.export(session.id)
    copy = await sessions.import_(data)
    assert (copy.tail, copy.turns, copy.state_tokens) == (session.tail, session.turns, session.state_tokens)
    _, a, text_a = await run_turn(sessions, session, "Next")
    _, b, text_b = await run_turn(sessions, copy, "Next")
    assert text_a == text_b
    assert a.usage == b.usage
    for bad in (b"", b"not json\nxx", b'{"format": "rwkvd-session-v1"}\nnot a state'):
        with pytest.raises(InvalidArgument) as err:
            await sessions.import_(bad)
        assert err.value.violations[0].field == "state"


async def test_idle_sessions_expire_and_extra_ones_are_evicted(engine: LocalEngineClient) -> None:
    expiring = SessionManager(engine, SessionLimits(idle_seconds=0.05))
    old, _ = await expiring.open()
    await asyncio.sleep(0.1)
    with pytest.raises(NotFound) as gone:
        expiring.get(old.id)
    assert gone.value.reason == "SESSION_EXPIRED"
    small = SessionManager(engine, SessionLimits(max_sessions=2))
    first, _ = await small.open()
    await small.open()
    await small.open()
    with pytest.raises(NotFound) as evicted:
        small.get(first.id)
    assert evicted.value.reason == "SESSION_EVICTED"
    with pytest.raises(NotFound) as unknown:
        small.get("sess_nope")
    assert unknown.value.reason == "SESSION_NOT_FOUND"


async def test_bad_session_defaults_are_refused_at_open(engine: LocalEngineClient) -> None:
    sessions = SessionManager(engine)
    with pytest.raises(InvalidArgument) as err:
        await sessions.open(sampling=SamplingOverrides(temperature=9.0))
    assert err.value.violations[0].field == "sampling.temperature"
