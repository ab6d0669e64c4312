"""PredictionService over the raw stubs against a real server: every RPC, model and version forms, event
replay and resumption, cancelling, what a cancelled call frees, and bad input naming the field."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import struct_pb2
from rwkvd.v1 import predictions_pb2, predictions_pb2_grpc

from service.app import App
from tests.grpc.conftest import MAX_PROMPT_TOKENS, error_of, slots_free

if TYPE_CHECKING:  # the async stub class exists in the .pyi only
    from rwkvd.v1.predictions_pb2_grpc import PredictionServiceAsyncStub

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEMO = "local/rwkv7-demo"
SUCCEEDED = predictions_pb2.PREDICTION_STATUS_SUCCEEDED
CANCELED = predictions_pb2.PREDICTION_STATUS_CANCELED


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def exactly(tokens: int, prompt: str = "Tell me a story", **more: Any) -> struct_pb2.Struct:
    """Greedy input that generates exactly `tokens` tokens (end of text suppressed until then)."""
    return struct(prompt=prompt, max_tokens=tokens, min_tokens=tokens, temperature=0, **more)


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> PredictionServiceAsyncStub:
    return predictions_pb2_grpc.PredictionServiceStub(channel)


def output_of(p: predictions_pb2.Prediction) -> list[str]:
    return [v.string_value for v in p.output.list_value.values]


async def events_of(
    stub: PredictionServiceAsyncStub, prediction_id: str, after: str = ""
) -> list[predictions_pb2.StreamPredictionResponse]:
    request = predictions_pb2.StreamPredictionRequest(id=prediction_id, last_event_id=after)
    return [e async for e in stub.StreamPrediction(request)]


async def test_create_stream_get_and_resume(stub: PredictionServiceAsyncStub) -> None:
    request = predictions_pb2.CreatePredictionRequest(model=DEMO, input=exactly(12, seed=3))
    created = (await stub.CreatePrediction(request)).prediction
    assert created.status in (predictions_pb2.PREDICTION_STATUS_STARTING, predictions_pb2.PREDICTION_STATUS_PROCESSING)
    assert (created.model, len(created.version)) == (DEMO, 64)
    assert dict(created.input) == {"prompt": "Tell me a story", "max_tokens": 12, "min_tokens": 12,
                                   "temperature": 0, "seed": 3}  # fmt: skip
    assert created.create_time.seconds > 0

    events = await events_of(stub, created.id)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "logs"
    assert kinds[-1] == "done"
    assert "output" in kinds
    assert "error" not in kinds
    assert events[-1].done.status == SUCCEEDED
    ids = [int(e.event_id) for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)

    done = (await stub.GetPrediction(predictions_pb2.GetPredictionRequest(id=created.id))).prediction
    assert done.status == SUCCEEDED
    assert not done.error
    assert output_of(done) == [e.output for e in events if e.HasField("output")]
    assert done.metrics.output_token_count == 12
    assert done.metrics.input_token_count > 0
    assert done.metrics.predict_time_seconds > 0
    assert done.metrics.total_time_seconds > 0
    assert done.start_time.ToNanoseconds() <= done.complete_time.ToNanoseconds()
    assert "generated 12 tokens" in done.logs

    # A stream resumes after any event it saw, during or after the run.
    resumed = await events_of(stub, created.id, after=events[1].event_id)
    assert resumed == events[2:]
    assert await events_of(stub, created.id, after=events[-1].event_id) == []  # after the end: nothing, at once

    again = await stub.RunPrediction(predictions_pb2.RunPredictionRequest(model=DEMO, input=exactly(12, seed=3)))
    assert "".join(output_of(again.prediction)) == "".join(output_of(done))  # greedy: the same text


async def test_model_and_version_forms(stub: PredictionServiceAsyncStub) -> None:
    version = (
        (await stub.RunPrediction(predictions_pb2.RunPredictionRequest(model=DEMO, input=exactly(1)))).prediction
    ).version
    for model, ref in (("", version), ("", f"{DEMO}:{version}"), ("", DEMO), (DEMO, version)):
        run = await stub.RunPrediction(predictions_pb2.RunPredictionRequest(model=model, version=ref, input=exactly(2)))
        assert (run.prediction.status, run.prediction.model, run.prediction.version) == (SUCCEEDED, DEMO, version)
    for model, ref, field in (("", "", "version"), ("", "0" * 64, "version"), ("someone/else", "", "model")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RunPrediction(predictions_pb2.RunPredictionRequest(model=model, version=ref, input=exactly(1)))
        reason, fields, resource = error_of(err.value)
        if err.value.code() == grpc.StatusCode.NOT_FOUND:
            assert (reason, resource) == ("MODEL_NOT_FOUND", ("model", model or ref))
        else:
            assert (err.value.code(), fields) == (grpc.StatusCode.INVALID_ARGUMENT, [field])


async def test_wait_and_list(stub: PredictionServiceAsyncStub) -> None:
    request = predictions_pb2.CreatePredictionRequest(model=DEMO, input=exactly(3), wait_seconds=30)
    waited = (await stub.CreatePrediction(request)).prediction
    assert waited.status == SUCCEEDED
    assert len(output_of(waited)) > 0
    newer = (await stub.CreatePrediction(request)).prediction

    first = await stub.ListPredictions(predictions_pb2.ListPredictionsRequest(page_size=1))
    assert [p.id for p in first.predictions] == [newer.id]  # newest first
    assert first.next_cursor
    second = await stub.ListPredictions(predictions_pb2.ListPredictionsRequest(cursor=first.next_cursor, page_size=1))
    assert [p.id for p in second.predictions] == [waited.id]
    everything = await stub.ListPredictions(predictions_pb2.ListPredictionsRequest())
    ids = [p.id for p in everything.predictions]
    assert ids[:2] == [newer.id, waited.id]
    assert len(set(ids)) == len(ids)
    assert not everything.next_cursor


async def test_cancel(app: App, stub: PredictionServiceAsyncStub) -> None:
    request = predictions_pb2.CreatePredictionRequest(model=DEMO, input=exactly(5000))
    created = (await stub.CreatePrediction(request)).prediction
    stream = stub.StreamPrediction(predictions_pb2.StreamPredictionRequest(id=created.id))
    async for event in stream:
        if event.HasField("output"):
            break
    stream.cancel()  # only a reader went away: the prediction runs on
    assert (await stub.GetPrediction(predictions_pb2.GetPredictionRequest(id=created.id))).prediction.status == (
        predictions_pb2.PREDICTION_STATUS_PROCESSING
    )
    canceled = (await stub.CancelPrediction(predictions_pb2.CancelPredictionRequest(id=created.id))).prediction
    assert canceled.status == CANCELED
    assert canceled.complete_time.seconds > 0
    assert 0 < len(output_of(canceled)) < 5000
    assert (await events_of(stub, created.id))[-1].done.status == CANCELED
    assert await slots_free(app)
    again = (await stub.CancelPrediction(predictions_pb2.CancelPredictionRequest(id=created.id))).prediction
    assert again == canceled  # an ended prediction is returned unchanged


async def test_a_cancelled_run_cancels_its_prediction(app: App, stub: PredictionServiceAsyncStub) -> None:
    run = stub.RunPrediction(predictions_pb2.RunPredictionRequest(model=DEMO, input=exactly(5000)), timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await slots_free(app)
    latest = (await stub.ListPredictions(predictions_pb2.ListPredictionsRequest(page_size=1))).predictions[0]
    for _ in range(100):  # the cancel lands as the call ends
        if latest.status == CANCELED:
            break
        await asyncio.sleep(0.02)
        latest = (await stub.GetPrediction(predictions_pb2.GetPredictionRequest(id=latest.id))).prediction
    assert latest.status == CANCELED


async def test_bad_input(stub: PredictionServiceAsyncStub) -> None:
    def create(**fields: Any) -> Any:
        return stub.CreatePrediction(predictions_pb2.CreatePredictionRequest(model=DEMO, **fields))

    cases: list[tuple[Any, str, list[str]]] = [
        (create(input=struct(prompt=5)), "INVALID_INPUT", ["input.prompt"]),
        (create(input=struct(prompt="x", max_tokens="ten")), "INVALID_INPUT", ["input.max_tokens"]),
        (create(input=struct(prompt="x", max_tokens=5.5)), "INVALID_INPUT", ["input.max_tokens"]),
        (create(input=struct(prompt="x", max_tokens=-1)), "INVALID_INPUT", ["input.max_tokens"]),
        (create(input=struct(prompt="x", temperature=True)), "INVALID_INPUT", ["input.temperature"]),
        (create(input=struct(prompt="x", top_p=1.5)), "INVALID_INPUT", ["input.top_p"]),
        (create(input=struct(prompt="x", colour="red")), "INVALID_INPUT", ["input.colour"]),
        (create(input=struct()), "INVALID_INPUT", ["input.prompt"]),
        (create(input=struct(prompt="x " * MAX_PROMPT_TOKENS)), "PROMPT_TOO_LONG", ["input.prompt"]),
        (create(input=exactly(1), wait_seconds=0), "INVALID_ARGUMENT", ["wait_seconds"]),
        (create(input=exactly(1), wait_seconds=61), "INVALID_ARGUMENT", ["wait_seconds"]),
        (create(input=exactly(1), webhook="ftp://x"), "INVALID_ARGUMENT", ["webhook"]),
        (create(input=exactly(1), webhook_events_filter=[9]), "INVALID_ARGUMENT", ["webhook_events_filter"]),
        (
            stub.ListPredictions(predictions_pb2.ListPredictionsRequest(cursor="nonsense")),
            "INVALID_ARGUMENT",
            ["cursor"],
        ),
    ]
    for call, reason, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert error_of(err.value)[:2] == (reason, fields), err.value.details()

    for call in (
        stub.GetPrediction(predictions_pb2.GetPredictionRequest(id="nope")),
        stub.CancelPrediction(predictions_pb2.CancelPredictionRequest(id="nope")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_of(err.value)[0] == "PREDICTION_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await events_of(stub, "nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    ok = (await stub.RunPrediction(predictions_pb2.RunPredictionRequest(model=DEMO, input=exactly(1)))).prediction
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await events_of(stub, ok.id, after="x")
    assert error_of(err.value)[1] == ["last_event_id"]
