"""The prediction API of the typed client (RockAI's shape: run, run_async, stream, stream_async, cancel)
against a real server, through AsyncClient and Client."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any

import pytest
import rwkvd

from tests.clients.conftest import Server

pytestmark = pytest.mark.asyncio(loop_scope="session")

DEMO = "local/rwkv7-demo"


def exactly(tokens: int, prompt: str = "Write a haiku", **more: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0, **more}


async def latest(client: rwkvd.AsyncClient) -> rwkvd.Prediction:
    return (await client.list_predictions(page_size=1)).predictions[0]


async def test_run_and_stream(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        output = await client.run(model=DEMO, input=exactly(10))
        assert output
        assert all(isinstance(chunk, str) for chunk in output)
        chunks = [chunk async for chunk in client.stream(DEMO, input=exactly(10))]
        assert "".join(chunks) == "".join(output)  # greedy: the same text
        version = (await latest(client)).version
        # Chunks are the engine's deltas, which coalesce under load: the text is what repeats.
        assert "".join(await client.run_async(f"{DEMO}:{version}", input=exactly(10))) == "".join(output)
        assert "".join([c async for c in client.stream_async(version=version, input=exactly(10))]) == "".join(chunks)

        done = await latest(client)
        assert (done.status, done.done, done.model, done.text) == ("succeeded", True, DEMO, "".join(chunks))
        assert done.input == exactly(10)
        assert done.output
        assert done.error is None
        assert done.metrics.output_token_count == 10
        assert done.created_at <= done.started_at <= done.completed_at  # type: ignore[operator]

        with pytest.raises(rwkvd.InvalidArgument) as bad:
            await client.run(model=DEMO, input={"prompt": 1, "max_tokens": "many"})
        assert sorted(v.field for v in bad.value.field_violations) == ["input.max_tokens", "input.prompt"]
        with pytest.raises(rwkvd.NotFound) as missing:
            await client.run("someone/else", input=exactly(1))
        assert missing.value.reason == "MODEL_NOT_FOUND"


async def test_leaving_a_stream_cancels_its_prediction(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        async with aclosing(client.stream(DEMO, input=exactly(5000))) as chunks:
            async for _ in chunks:
                break
        assert (await latest(client)).status == "canceled"
        assert await server.engine_idle()

        # Cancelled by someone else: the stream ends with PredictionError.
        async def cancel_soon() -> rwkvd.Prediction:
            for _ in range(500):  # until run() has made its prediction and it is generating
                if (p := await latest(client)).status == "processing":
                    return await client.cancel(p.id)
                await asyncio.sleep(0.01)
            raise AssertionError("the prediction never started")

        canceller = asyncio.create_task(cancel_soon())
        with pytest.raises(rwkvd.PredictionError) as failed:
            await client.run(DEMO, input=exactly(5000))
        assert failed.value.prediction.status == "canceled"
        assert (await canceller).id == failed.value.prediction.id
        assert await server.engine_idle()


async def test_create_get_list_cancel_and_events(server: Server) -> None:
    async with rwkvd.AsyncClient(server.target) as client:
        waited = await client.create_prediction(model=DEMO, input=exactly(4), wait=30)
        assert waited.done
        assert waited.status == "succeeded"
        assert waited.output
        assert waited.webhook is None
        assert set(waited.webhook_events_filter) == {"start", "output", "logs", "completed"}
        assert (await client.get_prediction(waited.id)) == waited

        started = await client.create_prediction(DEMO, input=exactly(5000), webhook_events_filter=["completed"])
        assert started.status in ("starting", "processing")
        assert started.webhook_events_filter == ("completed",)
        page = await client.list_predictions(page_size=1)
        assert [p.id for p in page.predictions] == [started.id]
        assert page.next_cursor
        following = await client.list_predictions(page.next_cursor, page_size=1)
        assert [p.id for p in following.predictions] == [waited.id]
        canceled = await client.cancel(started.id)
        assert canceled.status == "canceled"
        assert canceled.completed_at is not None

        events = [e async for e in client.prediction_events(waited.id)]
        assert events[-1].HasField("done")
        resumed = [e async for e in client.prediction_events(waited.id, last_event_id=events[1].event_id)]
        assert resumed == events[2:]
        with pytest.raises(rwkvd.NotFound):
            await client.get_prediction("nope")


async def test_sync_client(server: Server) -> None:
    def run() -> None:
        with rwkvd.Client(server.target) as client:
            text = "".join(client.run(DEMO, input=exactly(6)))
            assert "".join(client.stream(DEMO, input=exactly(6))) == text

            async def from_another_loop() -> tuple[str, str]:  # RockAI's use in FastAPI and the like
                ran = await client.run_async(model=DEMO, input=exactly(6))
                return "".join(ran), "".join(
                    [chunk async for chunk in client.stream_async(model=DEMO, input=exactly(6))]
                )

            assert asyncio.run(from_another_loop()) == (text, text)
            for _ in client.stream(DEMO, input=exactly(5000)):
                break
            last = client.list_predictions(page_size=1).predictions[0]
            assert last.status == "canceled"
            assert client.cancel(last.id) == last
            assert client.get_prediction(last.id).id == last.id
            created = client.create_prediction(DEMO, input=exactly(2), wait=30)
            assert [e.WhichOneof("event") for e in client.prediction_events(created.id)][-1] == "done"

    await asyncio.to_thread(run)
    assert await server.engine_idle()
