"""Client (synchronous) against the real server: the same calls as AsyncClient, run from a worker thread.

The server lives on the test's event loop, so each test drives the blocking client through
asyncio.to_thread.
"""

from __future__ import annotations

import asyncio

import pytest
import rwkvd
from rwkvd.v1 import chat_pb2

from tests.clients.conftest import Server

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_models_and_completions(server: Server) -> None:
    def run() -> None:
        with rwkvd.Client(server.target) as client:
            [model] = client.list_models()
            assert client.get_model(model.id) == model
            whole = client.complete("Hello", max_tokens=5, ignore_eos=True, seed=11)
            events = list(client.complete_stream("Hello", max_tokens=5, ignore_eos=True, seed=11))
        kinds = [e.WhichOneof("event") for e in events]
        # Deltas coalesce when the reader lags, so count tokens, not messages.
        assert kinds[0] == "started"
        assert kinds[-1] == "finished"
        assert set(kinds[1:-1]) == {"delta"}
        assert sum(len(e.delta.token_ids) for e in events[1:-1]) == 5
        assert "".join(e.delta.text for e in events[1:-1]) == whole.text
        assert events[-1].finished.usage == whole.usage

    await asyncio.to_thread(run)


async def test_typed_errors(server: Server) -> None:
    def run() -> None:
        with rwkvd.Client(server.target) as client:
            with pytest.raises(rwkvd.InvalidArgument) as invalid:
                client.complete("x", temperature=9)
            with pytest.raises(rwkvd.NotFound):
                list(client.complete_stream("x", model="nope/x"))
            with pytest.raises(rwkvd.NotFound) as not_found:
                client.call(lambda s: s.chat.GetSession(chat_pb2.GetSessionRequest(session_id="x")))
        assert [v.field for v in invalid.value.field_violations] == ["sampling.temperature"]
        assert not_found.value.reason == "SESSION_NOT_FOUND"

    await asyncio.to_thread(run)


async def test_leaving_a_stream_early_cancels_it(server: Server) -> None:
    def run() -> None:
        with rwkvd.Client(server.target) as client:
            for event in client.complete_stream("Once", max_tokens=5000, ignore_eos=True):
                if event.HasField("delta"):
                    break

    await asyncio.to_thread(run)
    assert await server.engine_idle()


async def test_closing_is_idempotent_and_final(server: Server) -> None:
    def run() -> None:
        client = rwkvd.Client(server.target)
        stream = client.complete_stream("x", max_tokens=1000, ignore_eos=True)
        assert next(stream).HasField("started")
        client.close()  # cancels the open stream
        client.close()
        with pytest.raises(RuntimeError, match="closed"):
            next(stream)
        with pytest.raises(RuntimeError, match="closed"):
            client.list_models()

    await asyncio.to_thread(run)
