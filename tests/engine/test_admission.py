"""Admission: the waiting queue counts only requests beyond the free slots."""

from __future__ import annotations

import pytest

from service.engine.config import EngineConfig
from service.engine.local import build_engine
from service.engine.protocol import Finished, GenerationRequest, SamplingParams
from service.errors import ResourceExhausted


async def test_no_queue_still_runs_what_fits_in_the_free_slots() -> None:
    client = build_engine(EngineConfig(max_batch_size=2, max_batch_tokens=16, max_queued=0))
    try:
        long = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0.0)
        streams = [client.generate(GenerationRequest(f"r{i}", (1, 2, 3), long)) for i in range(2)]
        with pytest.raises(ResourceExhausted) as full:
            client.generate(GenerationRequest("r2", (1, 2, 3), long))  # a third would have to wait: no queue
        assert full.value.reason == "QUEUE_FULL"
        for i, stream in enumerate(streams):
            await client.abort(f"r{i}")
            events = [e async for e in stream]
            assert isinstance(events[-1], Finished)
        short = SamplingParams(max_tokens=1)
        assert [e async for e in client.generate(GenerationRequest("r3", (1,), short))]
    finally:
        client.shutdown()
