"""ChatService over the raw stubs against a real server: Complete and CompleteStream (choices, stops, seeds,
usage, cancellation), Converse (turn accounting, cancel, busy turns, resume, templates, half-close, the
call going away), session export and import, and the errors of a bad open or a session that is gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

import grpc
import pytest
from google.rpc import error_details_pb2
from rwkvd.v1 import chat_pb2, chat_pb2_grpc, common_pb2, tasks_pb2, tasks_pb2_grpc

from service.app import App
from tests.grpc.conftest import error_of, slots_free
from tests.support import grpc_target, running_app

if TYPE_CHECKING:  # the async stub class exists in the .pyi only
    from rwkvd.v1.chat_pb2_grpc import ChatServiceAsyncStub

pytestmark = pytest.mark.asyncio(loop_scope="module")

SYSTEM, USER, ASSISTANT = chat_pb2.CHAT_ROLE_SYSTEM, chat_pb2.CHAT_ROLE_USER, chat_pb2.CHAT_ROLE_ASSISTANT
LENGTH, CANCELLED = common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_CANCELLED


def greedy(max_tokens: int, **more: object) -> common_pb2.SamplingParams:
    """Deterministic and of a known length: greedy, end of text ignored."""
    values: dict[str, object] = {"temperature": 0.0, "ignore_eos": True, **more}
    return common_pb2.SamplingParams(max_tokens=max_tokens, **values)  # type: ignore[arg-type]


def messages(*turns: tuple[chat_pb2.ChatRole.ValueType, str]) -> list[chat_pb2.ChatMessage]:
    return [chat_pb2.ChatMessage(role=role, content=content) for role, content in turns]


QUESTION = messages((SYSTEM, "You answer briefly."), (USER, "What is RWKV?"))


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> ChatServiceAsyncStub:
    return chat_pb2_grpc.ChatServiceStub(channel)


class Conversation:
    """A Converse call driven message by message: send() queues a request, read() takes the next answer."""

    def __init__(self, stub: ChatServiceAsyncStub, open_: chat_pb2.OpenSession | None = None) -> None:
        self._requests: asyncio.Queue[chat_pb2.ConverseRequest | None] = asyncio.Queue()
        self.call = stub.Converse(self._drain())
        if open_ is not None:
            self.send(open=open_)

    async def _drain(self) -> AsyncIterator[chat_pb2.ConverseRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    def send(self, **action: object) -> None:
        self._requests.put_nowait(chat_pb2.ConverseRequest(**action))  # type: ignore[arg-type]

    def turn(self, content: str, turn_id: str = "", sampling: common_pb2.SamplingParams | None = None) -> None:
        self.send(turn=chat_pb2.UserTurn(turn_id=turn_id, content=content, sampling=sampling))

    def half_close(self) -> None:
        self._requests.put_nowait(None)

    def close(self) -> None:
        """Ends the call whatever its state, and the request stream with it (else gRPC's task that reads
        the requests would wait on them forever)."""
        self.half_close()
        self.call.cancel()

    async def read(self) -> chat_pb2.ConverseResponse:
        message = await self.call.read()
        assert isinstance(message, chat_pb2.ConverseResponse), message
        return message

    async def opened(self) -> chat_pb2.SessionOpened:
        message = await self.read()
        assert message.HasField("opened"), message
        return message.opened

    async def answer(self, turn_id: str) -> tuple[list[chat_pb2.TurnDelta], chat_pb2.ConverseResponse]:
        """The deltas of a turn and the message that ends it (turn_end or error)."""
        deltas = []
        while True:
            message = await self.read()
            if message.HasField("delta"):
                assert message.delta.turn_id == turn_id
                deltas.append(message.delta)
            else:
                assert getattr(message, message.WhichOneof("event") or "opened").turn_id == turn_id, message
                return deltas, message

    async def end(self, turn_id: str) -> chat_pb2.TurnEnd:
        deltas, message = await self.answer(turn_id)
        assert message.HasField("turn_end"), message
        assert "".join(d.delta.text for d in deltas) == message.turn_end.text
        assert sum(len(d.delta.token_ids) for d in deltas) == message.turn_end.usage.completion_tokens
        return message.turn_end


Converse = Callable[..., Conversation]


@pytest.fixture
def converse(stub: ChatServiceAsyncStub) -> Iterator[Converse]:
    """Starts Converse calls (open with the given OpenSession, or send nothing) and ends them after the test."""
    started: list[Conversation] = []

    def start(open_: chat_pb2.OpenSession | None = None) -> Conversation:
        started.append(Conversation(stub, open_))
        return started[-1]

    yield start
    for conversation in started:
        conversation.close()


async def session_of(stub: ChatServiceAsyncStub, session_id: str) -> chat_pb2.Session:
    return (await stub.GetSession(chat_pb2.GetSessionRequest(session_id=session_id))).session


def tokens(app: App, text: str) -> int:
    assert app.engine is not None
    return len(app.engine.tokenizer.encode(text))


# Complete and CompleteStream


async def test_complete_choices_usage_and_seeds(stub: ChatServiceAsyncStub) -> None:
    sampling = common_pb2.SamplingParams(max_tokens=12, seed=7, temperature=1.0, top_p=1.0, ignore_eos=True)
    request = chat_pb2.CompleteRequest(messages=QUESTION, sampling=sampling, n=3, user="tester")
    first, again = await stub.Complete(request), await stub.Complete(request)
    assert first.id.startswith("chatcmpl-")
    assert first.model == "local/rwkv7-demo"
    assert first.create_time.seconds > 0
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert {c.message.role for c in first.choices} == {ASSISTANT}
    assert {c.finish_reason for c in first.choices} == {LENGTH}
    assert first.usage.completion_tokens == 3 * 12  # the choices summed, the prompt counted once
    assert first.usage.prompt_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    assert first.seed == 7
    # Same seed, same choices; each choice has its own random stream (seed + index).
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    assert len({c.message.content for c in first.choices}) > 1

    logged = await stub.Complete(
        chat_pb2.CompleteRequest(messages=QUESTION, sampling=greedy(4, logprobs=True, top_logprobs=2))
    )
    [choice] = logged.choices
    assert len(choice.logprobs) == 4
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in choice.logprobs)


async def test_complete_stops_before_a_stop_string(stub: ChatServiceAsyncStub) -> None:
    free = await stub.Complete(chat_pb2.CompleteRequest(messages=QUESTION, sampling=greedy(24)))
    text = free.choices[0].message.content
    stop = text[len(text) // 2 :][:3].strip() or text[-3:]
    assert stop
    stopped = await stub.Complete(chat_pb2.CompleteRequest(messages=QUESTION, sampling=greedy(24, stop=[stop])))
    [choice] = stopped.choices
    assert choice.finish_reason == common_pb2.FINISH_REASON_STOP_SEQUENCE
    assert choice.message.content == text[: text.index(stop)]


async def test_stream_matches_complete(stub: ChatServiceAsyncStub) -> None:
    sampling = greedy(10, seed=3, temperature=0.8)
    whole = await stub.Complete(chat_pb2.CompleteRequest(messages=QUESTION, sampling=sampling, n=2))
    chunks = [
        m async for m in stub.CompleteStream(chat_pb2.CompleteStreamRequest(messages=QUESTION, sampling=sampling, n=2))
    ]
    assert len({m.id for m in chunks}) == 1
    assert not chunks[0].choices  # the prompt has been read
    texts, reasons = ["", ""], [0, 0]
    for chunk in chunks:
        for choice in chunk.choices:
            assert reasons[choice.index] == 0, "nothing after a choice's finish reason"
            texts[choice.index] += choice.delta.text
            reasons[choice.index] = choice.finish_reason
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [LENGTH, LENGTH]
    assert [m.HasField("usage") for m in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage == whole.usage


async def test_cancelling_a_call_frees_the_slots(app: App, stub: ChatServiceAsyncStub) -> None:
    request = chat_pb2.CompleteStreamRequest(messages=QUESTION, sampling=greedy(5000), n=2)
    call = stub.CompleteStream(request)
    async for chunk in call:
        if chunk.choices:
            break
    assert app.engine is not None
    assert app.engine.stats().slots_in_use > 0
    call.cancel()
    assert await slots_free(app)

    unary = stub.Complete(chat_pb2.CompleteRequest(messages=QUESTION, sampling=greedy(5000), n=3))
    for _ in range(500):  # until the three choices run
        if app.engine.stats().slots_in_use == 3:
            break
        await asyncio.sleep(0.01)
    unary.cancel()
    assert await slots_free(app)


async def test_complete_bad_input(stub: ChatServiceAsyncStub) -> None:
    cases = [
        (chat_pb2.CompleteRequest(), ["messages"]),
        (chat_pb2.CompleteRequest(messages=[chat_pb2.ChatMessage(content="no role")]), ["messages[0].role"]),
        (chat_pb2.CompleteRequest(messages=QUESTION, n=9), ["n"]),
        (chat_pb2.CompleteRequest(messages=QUESTION, sampling=common_pb2.SamplingParams(top_p=2)), ["sampling.top_p"]),
    ]
    for request, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Complete(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_of(err.value)[1] == fields
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Complete(chat_pb2.CompleteRequest(messages=QUESTION, model="nope/x"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# Converse


async def test_turns_read_only_their_new_text(app: App, stub: ChatServiceAsyncStub, converse: Converse) -> None:
    chat = converse(chat_pb2.OpenSession(history=messages((SYSTEM, "You are terse."))))
    opened = await chat.opened()
    session_id = opened.session.session_id
    assert session_id.startswith("sess_")
    assert not opened.resumed
    assert (opened.session.turns, opened.session.model) == (0, "local/rwkv7-demo")
    assert dict(await chat.call.initial_metadata())["x-session-id"] == session_id
    history_tokens = opened.session.state_tokens
    assert history_tokens > 0

    state = history_tokens
    for n, content in enumerate(["Hello there.", "Tell me more, please.", "Thanks!"], start=1):
        chat.turn(content, sampling=greedy(6))
        end = await chat.end(str(n))  # the server numbers turns sent without an id
        assert end.finish_reason == LENGTH
        assert end.usage.cached_tokens == state  # the session's state was not read again
        if n > 1:  # after a reply: a blank line, then the user's turn
            assert end.usage.prompt_tokens == tokens(app, f"\n\nUser: {content}\n\nAssistant:")
        session = await session_of(stub, session_id)
        assert session.turns == n
        # The state read its pending token (the history's or the previous reply's last one), the turn,
        # and the reply but its last token (pending now).
        assert session.state_tokens == state + 1 + end.usage.prompt_tokens + 6 - 1
        state = session.state_tokens
    assert session.expire_time.ToSeconds() > session.last_used_time.ToSeconds()
    chat.half_close()
    assert await chat.call.read() == grpc.aio.EOF
    assert await chat.call.code() == grpc.StatusCode.OK


async def test_cancel_keeps_the_partial_reply(app: App, stub: ChatServiceAsyncStub, converse: Converse) -> None:
    chat = converse(chat_pb2.OpenSession(sampling=greedy(5000)))
    session_id = (await chat.opened()).session.session_id
    chat.turn("Count to a million.", turn_id="long")
    first = await chat.read()
    assert first.delta.turn_id == "long"
    chat.send(cancel=chat_pb2.CancelTurn(turn_id="long"))
    rest, message = await chat.answer("long")
    end = message.turn_end
    assert end.finish_reason == CANCELLED
    generated = end.usage.completion_tokens
    assert 0 < generated < 5000
    assert first.delta.delta.text + "".join(d.delta.text for d in rest) == end.text
    session = await session_of(stub, session_id)
    assert session.turns == 1
    assert session.state_tokens == end.usage.prompt_tokens + generated - 1  # the partial reply is in the state
    assert await slots_free(app)

    chat.turn("Go on.", turn_id="next", sampling=greedy(3))
    after = await chat.end("next")
    assert after.finish_reason == LENGTH
    assert after.usage.cached_tokens == session.state_tokens
    assert (await session_of(stub, session_id)).state_tokens > session.state_tokens
    chat.half_close()
    assert await chat.call.code() == grpc.StatusCode.OK


async def test_a_turn_while_one_runs_fails_in_band(app: App, converse: Converse) -> None:
    chat = converse(chat_pb2.OpenSession())
    await chat.opened()
    chat.turn("Write a long story.", turn_id="a", sampling=greedy(5000))
    chat.turn("And another.", turn_id="b")
    chat.send(cancel=chat_pb2.CancelTurn(turn_id="b"))  # names no running turn: nothing happens
    error = None
    while error is None:
        message = await chat.read()
        if message.HasField("error"):
            error = message.error
        else:
            assert message.delta.turn_id == "a"
    assert error.turn_id == "b"
    assert error.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    info = error_details_pb2.ErrorInfo()
    assert error.status.details[0].Unpack(info)
    assert info.reason == "TURN_RUNNING"
    chat.send(cancel=chat_pb2.CancelTurn())  # no id: the running turn
    _, end = await chat.answer("a")
    assert end.turn_end.finish_reason == CANCELLED
    chat.turn("Short now.", turn_id="c", sampling=greedy(2))
    assert (await chat.end("c")).finish_reason == LENGTH  # the stream went on
    chat.half_close()
    assert await chat.call.code() == grpc.StatusCode.OK
    assert await slots_free(app)


async def test_half_close_finishes_the_running_turn(converse: Converse) -> None:
    chat = converse(chat_pb2.OpenSession())
    await chat.opened()
    chat.turn("Hi", sampling=greedy(20))
    chat.half_close()
    end = await chat.end("1")
    assert (end.finish_reason, end.usage.completion_tokens) == (LENGTH, 20)
    assert await chat.call.read() == grpc.aio.EOF
    assert await chat.call.code() == grpc.StatusCode.OK


async def test_resume_on_a_new_stream(stub: ChatServiceAsyncStub, converse: Converse) -> None:
    chat = converse(chat_pb2.OpenSession())
    session_id = (await chat.opened()).session.session_id
    chat.turn("One.", sampling=greedy(3))
    await chat.end("1")
    chat.half_close()
    assert await chat.call.code() == grpc.StatusCode.OK
    state = (await session_of(stub, session_id)).state_tokens

    again = converse(chat_pb2.OpenSession(session_id=session_id))
    opened = await again.opened()
    assert opened.resumed
    assert (opened.session.session_id, opened.session.turns, opened.session.state_tokens) == (session_id, 1, state)
    assert dict(await again.call.initial_metadata())["x-session-id"] == session_id
    again.turn("Two.", turn_id="t2", sampling=greedy(3))
    assert (await again.end("t2")).usage.cached_tokens == state
    again.half_close()
    assert (await session_of(stub, session_id)).turns == 2

    # A resumed session keeps its state: a history or template is for new sessions.
    bad = converse(chat_pb2.OpenSession(session_id=session_id, history=messages((SYSTEM, "x"))))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await bad.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_export_then_import_continues_identically(stub: ChatServiceAsyncStub, converse: Converse) -> None:
    chat = converse(chat_pb2.OpenSession(history=messages((SYSTEM, "Be exact."))))
    source_id = (await chat.opened()).session.session_id
    chat.turn("Name a colour.", sampling=greedy(5))
    await chat.end("1")
    exported = await stub.ExportSession(chat_pb2.ExportSessionRequest(session_id=source_id))
    assert exported.session.session_id == source_id
    assert len(exported.state) > 1000

    imported = await stub.ImportSession(chat_pb2.ImportSessionRequest(state=exported.state, sampling=greedy(8)))
    copy_id = imported.session.session_id
    assert copy_id != source_id
    assert (imported.session.turns, imported.session.state_tokens) == (1, exported.session.state_tokens)

    chat.turn("And another?", sampling=greedy(8))
    original = await chat.answer("2")
    chat.half_close()
    copy = converse(chat_pb2.OpenSession(session_id=copy_id))
    await copy.opened()
    copy.turn("And another?")  # the imported session's defaults: greedy(8)
    copied = await copy.answer("1")
    copy.half_close()
    assert [t for d in copied[0] for t in d.delta.token_ids] == [t for d in original[0] for t in d.delta.token_ids]
    assert copied[1].turn_end.usage == original[1].turn_end.usage

    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.ImportSession(chat_pb2.ImportSessionRequest(state=b"not a session"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(bad.value)[0] == "INVALID_STATE"


async def test_a_session_from_a_template(channel: grpc.aio.Channel, converse: Converse) -> None:
    tasks = tasks_pb2_grpc.TaskServiceStub(channel)
    system = await tasks.CreateTask(
        tasks_pb2.CreateTaskRequest(
            kind=tasks_pb2.TASK_KIND_PERSISTENT,
            prompt=common_pb2.Prompt(text="System: You are a pirate.\n\n"),
            sampling=common_pb2.SamplingParams(max_tokens=0),
        )
    )
    async for _ in tasks.SubscribeTask(tasks_pb2.SubscribeTaskRequest(task_id=system.task.task_id)):
        pass
    template = (await tasks.SaveTaskAsTemplate(tasks_pb2.SaveTaskAsTemplateRequest(task_id=system.task.task_id))).task
    chat = converse(chat_pb2.OpenSession(template_id=template.task_id))
    opened = await chat.opened()
    assert opened.session.state_tokens == template.state_tokens > 0
    chat.turn("Ahoy?", sampling=greedy(3))
    assert (await chat.end("1")).usage.cached_tokens == template.state_tokens
    chat.half_close()

    not_template = converse(chat_pb2.OpenSession(template_id=system.task.task_id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await not_template.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(err.value)[:2] == ("NOT_A_TEMPLATE", ["template_id"])


async def test_cancelling_the_call_aborts_the_turn(app: App, stub: ChatServiceAsyncStub, converse: Converse) -> None:
    chat = converse(chat_pb2.OpenSession())
    session_id = (await chat.opened()).session.session_id
    chat.turn("Never stop.", sampling=greedy(5000))
    assert (await chat.read()).HasField("delta")
    chat.call.cancel()
    assert await slots_free(app)
    for _ in range(100):  # the aborted turn records its state just after the engine lets go of it
        session = await session_of(stub, session_id)
        if session.turns:
            break
        await asyncio.sleep(0.02)
    assert session.turns == 1
    assert session.state_tokens > 0
    again = converse(chat_pb2.OpenSession(session_id=session_id))
    await again.opened()
    again.turn("Hello?", sampling=greedy(2))  # not busy: the aborted turn has ended
    assert (await again.end("1")).finish_reason == LENGTH
    again.half_close()


async def test_bad_messages_in_a_conversation(converse: Converse) -> None:
    chat = converse()
    chat.turn("Hi")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chat.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_of(err.value)[:2] == ("OPEN_REQUIRED", ["open"])

    chat = converse(chat_pb2.OpenSession())
    await chat.opened()
    chat.send(open=chat_pb2.OpenSession())  # once is enough: an in-band error, and the session goes on
    message = await chat.read()
    assert message.error.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    chat.turn("Too hot.", turn_id="hot", sampling=greedy(1, temperature=9.0))
    message = await chat.read()
    assert (message.error.turn_id, message.error.status.code) == ("hot", grpc.StatusCode.INVALID_ARGUMENT.value[0])
    bad = error_details_pb2.BadRequest()
    assert message.error.status.details[1].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["sampling.temperature"]
    chat.turn("Still here?", sampling=greedy(1))
    assert (await chat.end("2")).usage.completion_tokens == 1  # "hot" was the stream's first turn
    chat.half_close()

    silent = converse()
    silent.half_close()
    assert await silent.call.read() == grpc.aio.EOF
    assert await silent.call.code() == grpc.StatusCode.OK


async def test_unknown_and_deleted_sessions(stub: ChatServiceAsyncStub, converse: Converse) -> None:
    chat = converse(chat_pb2.OpenSession(session_id="sess_nope"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await chat.read()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_of(err.value) == ("SESSION_NOT_FOUND", [], ("session", "sess_nope"))

    chat = converse(chat_pb2.OpenSession())
    session_id = (await chat.opened()).session.session_id
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await stub.ExportSession(chat_pb2.ExportSessionRequest(session_id=session_id))
    assert error_of(empty.value)[0] == "NO_STATE"
    deleted = await stub.DeleteSession(chat_pb2.DeleteSessionRequest(session_id=session_id))
    assert deleted.session_id == session_id
    for rpc in (
        lambda: stub.GetSession(chat_pb2.GetSessionRequest(session_id=session_id)),
        lambda: stub.ExportSession(chat_pb2.ExportSessionRequest(session_id=session_id)),
        lambda: stub.DeleteSession(chat_pb2.DeleteSessionRequest(session_id=session_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await rpc()
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    # The open stream's session is gone: its next turn ends the stream.
    chat.turn("Anyone?")
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await chat.read()
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_expired_session_says_so() -> None:
    async with running_app(session_idle_seconds=1.0) as app, grpc.aio.insecure_channel(grpc_target(app)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        chat = Conversation(stub, chat_pb2.OpenSession())
        session_id = (await chat.opened()).session.session_id
        chat.turn("Hi", sampling=greedy(1))
        await chat.end("1")
        chat.close()
        await asyncio.sleep(1.5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await session_of(stub, session_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_of(err.value)[0] == "SESSION_EXPIRED"
        resume = Conversation(stub, chat_pb2.OpenSession(session_id=session_id))
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await resume.read()
        resume.close()
        assert error_of(again.value)[0] == "SESSION_EXPIRED"
