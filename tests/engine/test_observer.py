"""The engine's observer hooks: what each step and each request end report, the API label, and isolation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from service.engine.config import EngineConfig
from service.engine.local import LocalEngineClient, build_engine
from service.engine.observer import ObserverGroup, RequestSample, StepSample, request_api
from service.engine.protocol import Finished, FinishReason, GenerationRequest, SamplingParams
from service.errors import ResourceExhausted
from tests.support import eventually


class Recorder:
    wants_origin = True

    def __init__(self) -> None:
        self.steps: list[StepSample] = []
        self.ends: list[RequestSample] = []
        self.rejected: list[tuple[str, str]] = []

    def on_step(self, step: StepSample) -> None:
        self.steps.append(step)

    def on_request_end(self, request: RequestSample) -> None:
        self.ends.append(request)

    def on_rejected(self, api: str, kind: str) -> None:
        self.rejected.append((api, kind))


class Broken:
    wants_origin = False

    def on_step(self, step: StepSample) -> None:
        raise RuntimeError("observer bug")

    def on_request_end(self, request: RequestSample) -> None:
        raise RuntimeError("observer bug")

    def on_rejected(self, api: str, kind: str) -> None:
        raise RuntimeError("observer bug")


@pytest.fixture
def engine() -> Iterator[LocalEngineClient]:
    client = build_engine(EngineConfig(max_batch_size=2, max_batch_tokens=64, max_queued=0, threads=1))
    try:
        yield client
    finally:
        client.shutdown()


async def run(client: LocalEngineClient, request: GenerationRequest) -> Finished:
    events = [e async for e in client.generate(request)]
    last = events[-1]
    assert isinstance(last, Finished)
    return last


async def test_steps_and_the_request_end_describe_the_run(engine: LocalEngineClient) -> None:
    recorder = Recorder()
    engine.observe(recorder)
    prompt = tuple(range(100, 120))
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0)

    async def from_openai() -> Finished:
        request_api.set("openai")  # as the HTTP middleware does for the call's task
        return await run(engine, GenerationRequest("r1", prompt, params))

    finished = await asyncio.create_task(from_openai())
    assert request_api.get() == "internal"  # the label stayed in that task
    [end] = recorder.ends
    assert end.request_id == "r1"
    assert end.api == "openai"
    assert end.reason is FinishReason.LENGTH
    assert end.usage == finished.usage
    assert end.error is None
    ttft, prefill, decode = end.ttft_seconds, end.prefill_seconds, end.decode_seconds
    assert ttft is not None
    assert prefill is not None
    assert decode is not None
    assert 0 <= end.queue_seconds <= ttft <= end.e2e_seconds
    assert prefill <= ttft
    assert end.tokens_per_second > 0
    assert end.origin is not None
    assert end.origin.run(request_api.get) == "openai"  # the submitting context, for tracing

    steps = recorder.steps
    assert sum(s.prefill_tokens for s in steps) == len(prompt)
    assert sum(s.decode_tokens for s in steps) == 5  # the 6th token is sampled, never read
    assert [api for s in steps for api, _ in s.first_tokens] == ["openai"]
    gaps = [seconds for s in steps for api, seconds in s.token_gaps]
    assert len(gaps) == 5
    assert all(g > 0 for g in gaps)
    assert all(s.rows == 1 and s.seconds >= s.forward_seconds for s in steps)


async def test_a_refused_submission_is_reported_with_its_kind(engine: LocalEngineClient) -> None:
    recorder = Recorder()
    engine.observe(recorder)
    long = SamplingParams(max_tokens=100_000, ignore_eos=True)
    streams = [engine.generate(GenerationRequest(f"busy{i}", (1, 2), long)) for i in range(2)]
    with pytest.raises(ResourceExhausted):
        engine.generate(GenerationRequest("refused", (1, 2), long))
    assert recorder.rejected == [("internal", "resource_exhausted")]
    for stream in streams:
        await stream.aclose()
    assert await eventually(lambda: len(recorder.ends) == 2)
    assert {e.reason for e in recorder.ends} == {FinishReason.CANCELLED}


async def test_a_failing_observer_does_not_stop_the_engine_or_the_others(engine: LocalEngineClient) -> None:
    recorder = Recorder()
    engine.observe(ObserverGroup([Broken(), recorder]))
    finished = await run(engine, GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=3, ignore_eos=True)))
    assert finished.reason is FinishReason.LENGTH
    assert [e.request_id for e in recorder.ends] == ["r"]
    assert recorder.steps
