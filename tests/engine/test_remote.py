"""The engine in a process of its own (service/engine/remote.py and worker.py), on the tiny checkpoint.

Each test starts a real engine process (about two seconds: it imports torch and loads the model). What
an in-process engine does is the reference: the same requests give the same events.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import gc
import os
import pickle
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.engine.config import EngineConfig
from service.engine.local import build_engine, coalesce
from service.engine.observer import RequestSample, StepSample, request_api
from service.engine.pipe import RemoteState
from service.engine.protocol import Finished, FinishReason, GenerationRequest, SamplingParams
from service.engine.remote import EngineStartError, ProcessEngineClient, start_engine_process
from service.errors import AlreadyExists, InvalidArgument, ResourceExhausted, Unavailable
from tests.engine.test_engine import (
    Run,
    assert_same_run,
    check_events,
    greedy,
    make_config,
    prompt_of,
    request,
    seeded,
)
from tests.support import eventually

LONG = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)


async def start(config: EngineConfig) -> ProcessEngineClient:
    return await start_engine_process(config, "warning", "text")


@pytest.fixture
async def remote(tiny_checkpoint: Path) -> AsyncIterator[ProcessEngineClient]:
    client = await start(make_config(tiny_checkpoint, threads=1))
    yield client
    await asyncio.to_thread(client.shutdown)


async def collect(client: ProcessEngineClient, req: GenerationRequest) -> Run:
    result = Run(req, [ev async for ev in client.generate(req)])
    check_events(result)
    return result


async def test_requests_give_the_events_of_an_in_process_engine(
    remote: ProcessEngineClient, tiny_checkpoint: Path
) -> None:
    local = build_engine(make_config(tiny_checkpoint, threads=1))
    try:
        assert dataclasses.replace(remote.model, load_time=0) == dataclasses.replace(local.model, load_time=0)
        prompt = prompt_of(local, 40, offset=3)
        asked = [
            request(prompt, greedy(max_tokens=12), keep_state=True),
            request(prompt[:9], seeded(7, max_tokens=20, logprobs=True, top_logprobs=3), keep_state=True),
            request(prompt[5:], seeded(11, max_tokens=8, stop=("e",))),
        ]
        # One at a time on each side: alone, the two engines compute the same numbers.
        for req in asked:
            here, there = await collect(local, req), await collect(remote, req)
            # The deltas (tokens, text, logprobs), merged: how a stream's tokens fall into reads depends on timing.
            assert coalesce(there.events[1:-1]) == coalesce(here.events[1:-1])
            assert (there.reason, there.finished.usage) == (here.reason, here.finished.usage)
            if req.sampling.seed is not None:
                assert there.finished.seed == here.finished.seed == req.sampling.seed
            if req.keep_state:
                kept = there.state
                assert isinstance(kept, RemoteState)
                assert (kept.token_count, kept.pending_token, kept.generated_tokens, kept.nbytes) == (
                    here.state.token_count,
                    here.state.pending_token,
                    here.state.generated_tokens,
                    here.state.nbytes,
                )
                # Going on from each side's state, and from the remote state carried over as bytes.
                again = request([], seeded(3, max_tokens=10), start_state=here.state, inherit_sampler=True)
                moved = await local.import_state(await remote.export_state(kept))
                from_here = await collect(local, again)
                from_there = await collect(remote, dataclasses.replace(again, request_id="there", start_state=kept))
                from_bytes = await collect(local, dataclasses.replace(again, request_id="moved", start_state=moved))
                assert from_there.ids == from_here.ids == from_bytes.ids
    finally:
        local.shutdown()


async def test_admission_is_decided_at_once_in_the_front_end(tiny_checkpoint: Path) -> None:
    client = await start(make_config(tiny_checkpoint, threads=1, max_batch_size=1, max_queued=1))
    rejected: list[tuple[str, str]] = []

    class Rejections:
        wants_origin = False

        def on_step(self, step: StepSample) -> None: ...

        def on_request_end(self, request: RequestSample) -> None: ...

        def on_rejected(self, api: str, kind: str) -> None:
            rejected.append((api, kind))

    client.observe(Rejections())
    try:
        running = client.generate(GenerationRequest("a", (1, 2, 3), LONG))
        waiting = client.generate(GenerationRequest("b", (1, 2, 3), LONG))
        with pytest.raises(ResourceExhausted) as full:
            client.generate(GenerationRequest("c", (1,), LONG))
        assert full.value.reason == "QUEUE_FULL"
        assert full.value.retry_after
        with pytest.raises(AlreadyExists):
            client.generate(GenerationRequest("a", (1,), LONG))
        with pytest.raises(InvalidArgument) as bad:
            client.generate(GenerationRequest("d", (1,), SamplingParams(temperature=9.0)))
        assert bad.value.first_field == "sampling.temperature"
        with pytest.raises(InvalidArgument) as too_big:
            client.check(GenerationRequest("e", (70_000,), LONG))
        assert too_big.value.reason == "INVALID_TOKEN"
        # A handle of another engine process is not a state of this one.
        stranger = RemoteState(1, "another", client.model.version, 3, 5, 100, 0)
        with pytest.raises(InvalidArgument) as foreign:
            client.generate(GenerationRequest("f", (), LONG, start_state=stranger))
        assert foreign.value.reason == "INVALID_STATE"
        with pytest.raises(InvalidArgument):
            await client.export_state(stranger)
        kinds = ["resource_exhausted", "already_exists", "invalid_argument", "invalid_argument"]
        assert [kind for _, kind in rejected] == kinds  # check() refuses without counting: nothing was submitted
        # The refusals cost the running ones nothing; aborting ends both.
        first = await anext(running)
        assert first.request_id == "a"
        await client.abort("a")
        await client.abort("b")
        ends = [ev async for ev in running][-1], [ev async for ev in waiting][-1]
        assert [e.reason for e in ends if isinstance(e, Finished)] == [FinishReason.CANCELLED] * 2
        # Both ended: the queue has room again.
        assert (await collect(client, request([1, 2], greedy(max_tokens=2)))).reason is FinishReason.LENGTH
    finally:
        await asyncio.to_thread(client.shutdown)


async def test_states_live_in_the_engine_process_until_dropped(remote: ProcessEngineClient) -> None:
    baseline = await remote.states_kept()
    kept = (await collect(remote, request([5, 6, 7], greedy(max_tokens=3), keep_state=True))).state
    stream = remote.generate(GenerationRequest("snap", (1, 2), LONG))
    await anext(stream)  # started: a running request can be snapshotted
    snap = await remote.snapshot("snap")
    await stream.aclose()
    imported = await remote.import_state(await remote.export_state(kept))
    assert isinstance(snap, RemoteState)
    assert isinstance(imported, RemoteState)
    assert imported.token_count == kept.token_count
    assert await remote.states_kept() == baseline + 3
    del kept, snap, imported
    gc.collect()
    kept_now: list[int] = []

    async def released() -> bool:
        kept_now.append(await remote.states_kept())
        return kept_now[-1] == baseline

    for _ in range(200):  # the releases travel after the finalizers ran: a few messages later
        if await released():
            break
        await asyncio.sleep(0.01)
    assert kept_now[-1] == baseline


async def test_observers_get_every_sample_with_its_origin(remote: ProcessEngineClient) -> None:
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker")
    steps: list[StepSample] = []
    ends: list[RequestSample] = []

    class Recorder:
        wants_origin = True

        def on_step(self, step: StepSample) -> None:
            steps.append(step)

        def on_request_end(self, request: RequestSample) -> None:
            ends.append(request)

        def on_rejected(self, api: str, kind: str) -> None: ...

    remote.observe(Recorder())
    marker.set("the caller")
    request_api.set("openai")
    run = await collect(remote, request([1, 2, 3, 4], greedy(max_tokens=5)))
    assert await eventually(lambda: len(ends) == 1)
    (end,) = ends
    assert (end.request_id, end.api, end.reason, end.usage) == (
        run.request.request_id,
        "openai",
        FinishReason.LENGTH,
        run.finished.usage,
    )
    assert end.origin is not None
    assert end.origin.run(marker.get) == "the caller"  # the submitting call's context, kept in this process
    assert sum(s.decode_tokens for s in steps) == 4  # the fifth token is sampled but never read
    assert sum(s.prefill_tokens for s in steps) == 4
    assert [api for s in steps for api, _ in s.first_tokens] == ["openai"]
    assert remote.stats().steps == len(steps)
    assert remote.step_clock()["steps"] == len(steps)


async def test_a_dead_engine_process_ends_every_open_request(remote: ProcessEngineClient) -> None:
    lost: list[bool] = []
    remote.on_lost = lambda: lost.append(True)
    streams = [remote.generate(GenerationRequest(f"doomed-{i}", (1, 2, 3), LONG)) for i in range(3)]
    for s in streams:
        await anext(s)
    os.kill(remote.pid, signal.SIGKILL)
    for s in streams:
        events = [ev async for ev in s]
        end = events[-1]
        assert isinstance(end, Finished)
        assert end.reason is FinishReason.ERROR
        assert end.error is not None
        assert "engine process ended unexpectedly" in end.error
    assert lost == [True]
    with pytest.raises(Unavailable) as refused:
        remote.generate(GenerationRequest("after", (1,), LONG))
    assert refused.value.reason == "ENGINE_UNAVAILABLE"
    with pytest.raises(Unavailable):
        await remote.snapshot("doomed-0")


async def test_an_engine_that_cannot_start_says_why(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint.pth"
    with pytest.raises(EngineStartError, match="no-such-checkpoint"):
        await start(EngineConfig(model_path=str(missing), threads=1))


async def test_a_pipe_that_breaks_fails_every_open_request(remote: ProcessEngineClient) -> None:
    """A frame that cannot be sent whole: the engine process is stopped and what it had ends with the reason."""
    lost: list[bool] = []
    remote.on_lost = lambda: lost.append(True)
    stream = remote.generate(GenerationRequest("open", (1, 2, 3), LONG))
    await anext(stream)

    def broken(message: object) -> None:
        raise BrokenPipeError("injected")

    remote._sender._writer.send = broken  # type: ignore[method-assign]  # a fault, injected
    await remote.abort("open")  # this frame is the one that fails
    end = [ev async for ev in stream][-1]
    assert isinstance(end, Finished)
    assert end.reason is FinishReason.ERROR
    assert end.error is not None
    assert "sending to the engine process failed" in end.error
    assert lost == [True]
    assert await asyncio.to_thread(remote._process.wait, 10) is not None  # stopped, not left computing


async def test_a_corrupt_frame_from_the_engine_process_fails_every_open_request(remote: ProcessEngineClient) -> None:
    lost: list[bool] = []
    remote.on_lost = lambda: lost.append(True)
    stream = remote.generate(GenerationRequest("open", (1, 2, 3), LONG))
    await anext(stream)

    def corrupt(data: bytes) -> list[object]:
        raise pickle.UnpicklingError("injected")

    remote._reader.feed = corrupt  # type: ignore[method-assign]  # a fault, injected
    end = [ev async for ev in stream][-1]  # the next frame (the stream's next tokens) is the corrupt one
    assert isinstance(end, Finished)
    assert end.error is not None
    assert "could not be read" in end.error
    assert lost == [True]
    with pytest.raises(Unavailable):
        remote.generate(GenerationRequest("after", (1,), LONG))


@pytest.mark.gpu
async def test_an_engine_process_on_cuda_gives_the_in_process_engines_tokens(tiny_checkpoint: Path) -> None:
    """On a GPU (bench/gpu_suite.sh): the engine process owns the device; same tokens as in-process, and the
    device memory it reports reaches the front end (rwkvd_gpu_memory_bytes)."""
    config = make_config(tiny_checkpoint, device="cuda", dtype="float32")
    local = build_engine(config)
    remote = await start(config)
    try:
        assert remote.model.device.startswith("cuda")
        prompt = prompt_of(local, 40, offset=9)
        for req in (request(prompt, greedy(max_tokens=24)), request(prompt[:7], seeded(3, max_tokens=24))):
            assert_same_run(await collect(local, req), await collect(remote, req))
        memory = remote.device_memory()
        assert memory["allocated"] > 0
        assert memory["total"] >= memory["reserved"] >= memory["allocated"]
    finally:
        local.shutdown()
        await asyncio.to_thread(remote.shutdown)
