"""AsyncClient against a real server: models, completions (unary and streamed), typed errors, deadlines."""

from __future__ import annotations

import asyncio
import re
from contextlib import aclosing

import pytest
import rwkvd
from rwkvd.v1 import chat_pb2, common_pb2

from tests.clients.conftest import Server

DEMO_ID = "local/rwkv7-demo"

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_list_and_get_models(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        models = await client.list_models()
        assert [m.id for m in models] == [DEMO_ID]
        model = models[0]
        assert re.fullmatch(r"[0-9a-f]{64}", model.version)
        assert (model.shape.n_layer, model.shape.n_embd) == (2, 128)
        assert model.demo
        assert await client.get_model(DEMO_ID) == model
        assert await client.get_model(model.version) == model


async def test_complete(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        response = await client.complete("The quick brown fox", max_tokens=8, ignore_eos=True, seed=7)
        again = await client.complete("The quick brown fox", max_tokens=8, ignore_eos=True, seed=7)
    assert response.model == DEMO_ID
    assert response.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert response.seed == 7
    assert len(response.token_ids) == response.usage.completion_tokens == 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8
    assert response.text
    assert (again.text, list(again.token_ids)) == (response.text, list(response.token_ids))


async def test_complete_from_token_ids_with_stop_and_logprobs(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        response = await client.complete(
            [510, 4996, 8516], max_tokens=4, ignore_eos=True, seed=1, stop=[], logprobs=True, top_logprobs=2
        )
    assert response.usage.prompt_tokens == 3
    assert [lp.token_id for lp in response.logprobs] == list(response.token_ids)
    assert all(len(lp.top_logprobs) == 2 for lp in response.logprobs)


async def test_complete_stream(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        events = [e async for e in client.complete_stream("Hello", max_tokens=6, ignore_eos=True, seed=3)]
        whole = await client.complete("Hello", max_tokens=6, ignore_eos=True, seed=3)
    kinds = [e.WhichOneof("event") for e in events]
    assert (kinds[0], kinds[-1]) == ("started", "finished")
    assert set(kinds[1:-1]) == {"delta"}
    started, finished = events[0].started, events[-1].finished
    assert (started.model, started.seed) == (DEMO_ID, 3)
    assert started.prompt_tokens == whole.usage.prompt_tokens
    deltas = [e.delta for e in events[1:-1]]
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == list(whole.token_ids)
    assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == 6
    assert finished.usage.total_tokens == finished.usage.prompt_tokens + 6


async def test_leaving_a_stream_cancels_the_call(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        async with aclosing(client.complete_stream("Once", max_tokens=5000, ignore_eos=True)) as stream:
            async for event in stream:
                if event.HasField("delta"):
                    break
        assert await server.engine_idle()

        async for event in client.complete_stream("Once", max_tokens=5000, ignore_eos=True):
            if event.HasField("delta"):
                break  # no aclosing: the dropped generator is closed by the event loop's finalizer
        assert await server.engine_idle()


async def test_cancelling_the_reading_task_cancels_the_call(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        first = asyncio.Event()

        async def read() -> None:
            async for _ in client.complete_stream("Once", max_tokens=5000, ignore_eos=True):
                first.set()

        task = asyncio.create_task(read())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await server.engine_idle()


async def test_invalid_argument_names_the_field(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        with pytest.raises(rwkvd.InvalidArgument) as caught:
            await client.complete("x", temperature=9)
        with pytest.raises(rwkvd.InvalidArgument) as streamed:
            async for _ in client.complete_stream("x", temperature=9):
                pass
    for err in (caught.value, streamed.value):
        assert err.code.name == "INVALID_ARGUMENT"
        assert "sampling.temperature" in [v.field for v in err.field_violations]
        assert err.domain == "rwkvd"
        assert err.reason


async def test_unknown_model_is_not_found(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        with pytest.raises(rwkvd.NotFound) as caught:
            await client.complete("x", model="nope/x")
        with pytest.raises(rwkvd.NotFound) as by_id:
            await client.get_model("nope/x")
    assert caught.value.resource == ("model", "nope/x")
    assert by_id.value.reason


async def test_raw_stubs_raise_typed_errors(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        with pytest.raises(rwkvd.NotFound) as unary:
            await client.call(lambda s: s.chat.GetSession(chat_pb2.GetSessionRequest(session_id="x")))
        with pytest.raises(rwkvd.InvalidArgument) as streaming:
            async for _ in client.call_stream(lambda s: s.chat.CompleteStream(chat_pb2.CompleteStreamRequest())):
                pass
    assert (unary.value.reason, unary.value.resource) == ("SESSION_NOT_FOUND", ("session", "x"))
    assert [v.field for v in streaming.value.field_violations] == ["messages"]


async def test_per_call_timeout_raises_deadline_exceeded(stalling_target: str) -> None:
    async with rwkvd.AsyncClient(stalling_target) as client:
        with pytest.raises(rwkvd.DeadlineExceeded) as unary:
            await client.complete("x", timeout=0.05)
        with pytest.raises(rwkvd.DeadlineExceeded):
            async for _ in client.complete_stream("x", timeout=0.05):
                pass
    assert unary.value.code.name == "DEADLINE_EXCEEDED"


async def test_default_deadline_applies_to_unary_calls_only(server: Server, stalling_target: str) -> None:
    async with rwkvd.AsyncClient(stalling_target, timeout=0.05) as client:
        with pytest.raises(rwkvd.DeadlineExceeded):
            await client.complete("x")
    # 40 tokens take longer than 0.05 s on the demo model, yet the stream runs to its end.
    async with rwkvd.AsyncClient(server.target, timeout=0.05) as client:
        events = [e async for e in client.complete_stream("x", max_tokens=40, ignore_eos=True)]
    assert events[-1].finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert events[-1].finished.usage.completion_tokens == 40


async def test_deadline_ends_a_generation_on_the_server(server: Server) -> None:
    # Whichever side notices the deadline first (gRPC cancelling the call, or the engine dropping the
    # request at its deadline), the client sees DEADLINE_EXCEEDED and the engine slot is freed.
    async with rwkvd.AsyncClient(server.target) as client:
        for timeout in (1e-6, 0.05, 0.2):
            with pytest.raises(rwkvd.DeadlineExceeded):
                async for _ in client.complete_stream("x", max_tokens=5000, ignore_eos=True, timeout=timeout):
                    pass
            with pytest.raises(rwkvd.DeadlineExceeded):
                await client.complete("x", max_tokens=5000, ignore_eos=True, timeout=timeout)
    assert await server.engine_idle()
