"""Chat through the typed client against the real server: complete_chat (whole and streamed), chat sessions
(turns, resume, leaving a turn early, cancel from another task, export and import, typed errors), and the
same through the synchronous Client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import rwkvd
from rwkvd.v1 import chat_pb2, common_pb2

from tests.clients.conftest import Server

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Greedy and of a known length (the demo model's random weights would otherwise end at any token).
GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
QUESTION: list[rwkvd.MessageLike] = [
    ("system", "You answer briefly."),
    {"role": "user", "content": "What is RWKV?"},
    chat_pb2.ChatMessage(role=chat_pb2.CHAT_ROLE_ASSISTANT, content="A language model."),
    ("user", "Say more."),
]


async def test_complete_chat_whole_and_streamed(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        whole = await client.complete_chat(QUESTION, n=2, max_tokens=6, seed=5, ignore_eos=True, user="me")
        chunks = [c async for c in client.complete_chat_stream(QUESTION, n=2, max_tokens=6, seed=5, ignore_eos=True)]
    assert [c.index for c in whole.choices] == [0, 1]
    assert {c.finish_reason for c in whole.choices} == {common_pb2.FINISH_REASON_LENGTH}
    assert whole.usage.completion_tokens == 12
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.text
    assert texts == [c.message.content for c in whole.choices]
    assert chunks[-1].usage == whole.usage


async def test_a_session_keeps_its_state_between_turns(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        async with client.chat(history=[("system", "You are terse.")], max_tokens=4, **GREEDY) as chat:
            assert chat.id.startswith("sess_")
            assert not chat.resumed
            texts = [text async for text in chat.send("Hello.")]
            first = chat.last_turn
            assert first is not None
            assert "".join(texts) == first.text
            assert (first.turn_id, first.finish_reason, first.usage.completion_tokens) == ("1", "length", 4)
            second = await chat.ask("And then?", max_tokens=2)  # this turn's override
            assert (second.turn_id, second.usage.completion_tokens) == ("2", 2)
            assert second.usage.cached_tokens > first.usage.cached_tokens
            assert chat.session.turns == 0  # as opened
            session = await chat.refresh()
            assert (session.turns, chat.session.turns) == (2, 2)
        async with client.chat(chat.id) as again:
            assert again.resumed
            assert again.session.turns == 2
            assert (await again.ask("Last one.", max_tokens=1)).usage.cached_tokens == session.state_tokens
        assert (await client.get_session(chat.id)).turns == 3
        await client.delete_session(chat.id)
        with pytest.raises(rwkvd.NotFound) as gone:
            await client.get_session(chat.id)
    assert gone.value.resource == ("session", chat.id)


async def test_leaving_a_turn_early_cancels_it(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client, client.chat(max_tokens=5000, **GREEDY) as chat:
        async for _ in chat.send("Talk forever."):
            break
        assert await server.engine_idle()
        # The next turn reads the end of the one left first; both are in the session.
        after = await chat.ask("Short now.", max_tokens=2)
        assert (after.turn_id, after.finish_reason) == ("2", "length")
        assert (await chat.refresh()).turns == 2

        left = chat.send("Talk forever again.")
        await anext(left)  # left without closing it: the next call cancels the turn and reads its end
        assert (await chat.ask("Short again.", max_tokens=2)).turn_id == "4"
        await left.aclose()  # too late to matter
        assert chat.last_turn is not None
        assert chat.last_turn.turn_id == "4"
        assert (await chat.refresh()).turns == 4

        last = chat.send("And once more, forever.")
        await anext(last)
    # Leaving the block closes the stream, which cancels the running turn first.
    assert await server.engine_idle()
    assert chat.last_turn is not None
    assert (chat.last_turn.turn_id, chat.last_turn.finish_reason) == ("5", "cancelled")
    await last.aclose()


async def test_cancel_from_another_task(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client, client.chat(max_tokens=5000, **GREEDY) as chat:
        texts: list[str] = []
        reading = asyncio.Event()

        async def read() -> None:
            async for text in chat.send("Count to a million."):
                texts.append(text)
                reading.set()

        reader = asyncio.create_task(read())
        await reading.wait()
        await chat.cancel()
        await asyncio.wait_for(reader, 10)
        assert chat.last_turn is not None
        assert chat.last_turn.finish_reason == "cancelled"
        assert chat.last_turn.text == "".join(texts)
        assert 0 < chat.last_turn.usage.completion_tokens < 5000
        await chat.cancel()  # nothing runs: nothing happens


async def test_export_and_import(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        async with client.chat(history=[("system", "Be exact.")], max_tokens=6, **GREEDY) as chat:
            await chat.ask("Name a colour.")
            state = await chat.export()
            original = await chat.ask("Another?")
        copy_id = await client.import_session(state, max_tokens=6, **GREEDY)
        assert copy_id != chat.id
        assert await client.export_session(chat.id) != state  # the original went on
        async with client.chat(copy_id) as copy:
            assert copy.session.turns == 1
            copied = await copy.ask("Another?")
    assert (copied.text, copied.usage) == (original.text, original.usage)


async def test_typed_errors(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        with pytest.raises(rwkvd.NotFound) as unknown:
            await client.chat("sess_nope").open()
        assert (unknown.value.reason, unknown.value.resource) == ("SESSION_NOT_FOUND", ("session", "sess_nope"))
        with pytest.raises(rwkvd.InvalidArgument) as empty:
            await client.complete_chat([])
        assert [v.field for v in empty.value.field_violations] == ["messages"]
        with pytest.raises(ValueError, match="unknown chat role"):
            await client.complete_chat([("robot", "beep")])
        with pytest.raises(rwkvd.InvalidArgument):
            await client.import_session(b"not a session")

        async with client.chat(max_tokens=5000, **GREEDY) as chat:
            # A failed turn raises its error, in-band; the session goes on.
            with pytest.raises(rwkvd.InvalidArgument) as bad:
                await chat.ask("Hi", temperature=9)
            assert [v.field for v in bad.value.field_violations] == ["sampling.temperature"]
            assert bad.value.domain == "rwkvd"
            # One turn at a time per session, whichever stream sends it.
            running = chat.send("A long story, please.")
            await anext(running)
            async with client.chat(chat.id) as other:
                with pytest.raises(rwkvd.FailedPrecondition) as busy:
                    await other.ask("Me too?")
                assert busy.value.reason == "TURN_RUNNING"
                with pytest.raises(rwkvd.FailedPrecondition):
                    await other.export()
            await running.aclose()  # cancels the turn
            assert (await chat.ask("Now?", max_tokens=1)).turn_id == "3"

            # The session is deleted under the open stream: its next turn ends the stream, and later calls
            # say why.
            await client.delete_session(chat.id)
            with pytest.raises(rwkvd.NotFound) as deleted:
                await chat.ask("Still there?")
            with pytest.raises(rwkvd.NotFound) as after:
                await chat.ask("Hello?")
            assert deleted.value.reason == after.value.reason == "SESSION_NOT_FOUND"


async def test_sync_client(server: Server) -> None:
    def run() -> None:
        with rwkvd.Client(server.target) as client:
            whole = client.complete_chat(QUESTION, max_tokens=4, **GREEDY)
            streamed = "".join(
                c.delta.text for m in client.complete_chat_stream(QUESTION, max_tokens=4, **GREEDY) for c in m.choices
            )
            assert streamed == whole.choices[0].message.content
            with client.chat(history=[("system", "Be kind.")], max_tokens=3, **GREEDY) as chat:
                text = "".join(chat.send("Hi!"))
                assert chat.last_turn is not None
                assert (text, chat.last_turn.finish_reason) == (chat.last_turn.text, "length")
                for _ in chat.send("Go on and on.", max_tokens=5000):
                    break  # cancels the turn
                assert chat.ask("Bye.").turn_id == "3"
                state = chat.export()
                assert chat.refresh().turns == 3
            copy_id = client.import_session(state)
            with client.chat(copy_id) as copy:
                assert copy.resumed
                assert copy.session.state_tokens == chat.session.state_tokens
            with pytest.raises(rwkvd.NotFound):
                client.get_session("sess_nope")
            client.delete_session(copy_id)

    await asyncio.to_thread(run)
    assert await server.engine_idle()
