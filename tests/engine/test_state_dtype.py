"""--state-dtype float16 end to end on the tiny checkpoint (torch backend, CPU fp32 weights): the pool, generation
against the fp32 state, snapshots and resume, the prefix cache, and exported states moving between engines of
different state dtypes (what sessions, persisted tasks and templates do through export_state / import_state).

Greedy comparisons across state dtypes (and across rounding points) want the same tokens with logprobs within
LOGPROB_TOL = 1e-3, or a divergence only at a near tie (GAP_TOL, 1e-2 nats). Observed: an fp16 state moves this
model's logprobs by at most 5e-5 over 16 greedy tokens, and the same tokens come out; reading a prompt in other
pieces (so rounding it at other points) by 9e-6. Within one fp16 engine a run and its resumption round the state
at the same points, so they are compared exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from service.engine.config import EngineConfig
from service.engine.local import LocalEngineClient, build_engine
from service.engine.protocol import Delta, Finished, GenerationRequest, SamplingParams, Started, TokenLogprob
from service.engine.snapshot import StateSnapshot, to_bytes
from service.engine.state_pool import RnnState
from service.errors import InvalidArgument

GAP_TOL = 1e-2
# Largest |logprob| difference between two greedy runs before they diverge, if ever.
LOGPROB_TOL = 1e-3
CACHE_MIN = 16

_ids = itertools.count()


@pytest.fixture(scope="module")
def engines(tiny_checkpoint: Path) -> Iterator[dict[str, LocalEngineClient]]:
    built = {
        name: build_engine(
            EngineConfig(
                model_path=str(tiny_checkpoint),
                state_dtype=name,
                max_batch_size=4,
                max_batch_tokens=64,
                prefill_chunk=16,
                prefix_cache_entries=8,
                prefix_cache_min_tokens=CACHE_MIN,
            )
        )
        for name in ("float32", "float16")
    }
    yield built
    for engine in built.values():
        engine.shutdown()


@pytest.fixture(scope="module")
def fp16(engines: dict[str, LocalEngineClient]) -> LocalEngineClient:
    return engines["float16"]


@pytest.fixture(scope="module")
def fp32(engines: dict[str, LocalEngineClient]) -> LocalEngineClient:
    return engines["float32"]


class Run:
    def __init__(self, events: list[object]) -> None:
        assert isinstance(events[0], Started)
        assert isinstance(events[-1], Finished)
        assert events[-1].error is None, events[-1].error
        self.started = events[0]
        self.finished = events[-1]
        self.ids = [t for e in events if isinstance(e, Delta) for t in e.token_ids]
        self.logprobs: list[TokenLogprob] = [lp for e in events if isinstance(e, Delta) for lp in e.logprobs]

    @property
    def state(self) -> StateSnapshot:
        assert isinstance(self.finished.state, StateSnapshot)
        return self.finished.state


async def run(engine: LocalEngineClient, prompt: list[int] | tuple[int, ...], **kw: object) -> Run:
    sampling: dict[str, object] = {
        "max_tokens": 16,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 5,
        "ignore_eos": True,
    }
    sampling.update(kw.pop("sampling", {}))  # type: ignore[call-overload]
    request = GenerationRequest(f"s-{next(_ids)}", tuple(prompt), SamplingParams(**sampling), **kw)  # type: ignore[arg-type]
    return Run([ev async for ev in engine.generate(request)])


def assert_close_greedy(ref: Run, other: Run) -> None:
    """Same tokens with logprobs within LOGPROB_TOL, or a divergence only at a near tie (GAP_TOL)."""
    for i, (a, b) in enumerate(zip(ref.ids, other.ids, strict=True)):
        if a != b:
            top = {t: v for t, _, v in ref.logprobs[i].top}
            assert a in top, (i, a, b)
            assert b in top, (i, a, b)
            assert abs(top[a] - top[b]) < GAP_TOL, f"diverge at {i}: {a} vs {b}, not a near tie"
            return
        assert abs(ref.logprobs[i].logprob - other.logprobs[i].logprob) < LOGPROB_TOL, i


def prompt(engine: LocalEngineClient, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def test_the_pool_holds_the_state_in_fp16(fp16: LocalEngineClient, fp32: LocalEngineClient) -> None:
    assert (fp16.model.state_dtype, fp32.model.state_dtype) == ("float16", "float32")
    assert fp16.model.dtype == "float32"  # the weights and token-shift vectors keep their dtype
    pool, pool32 = fp16._runner.pool, fp32._runner.pool
    assert pool.wkv.dtype == torch.float16
    assert pool.att_x.dtype == pool.ffn_x.dtype == torch.float32
    assert pool.wkv.nbytes * 2 == pool32.wkv.nbytes


async def test_generation_stays_close_to_the_fp32_state(fp16: LocalEngineClient, fp32: LocalEngineClient) -> None:
    text = "User: What is the capital of France?\n\nAssistant: The capital of France is"
    a = await run(fp32, prompt(fp32, text))
    b = await run(fp16, prompt(fp16, text))
    assert_close_greedy(a, b)


async def test_snapshots_keep_the_state_dtype_and_resume_exactly(fp16: LocalEngineClient) -> None:
    ids = prompt(fp16, "Once upon a time, in a land far away, there lived")
    whole = await run(fp16, ids, sampling={"max_tokens": 20})
    first = await run(fp16, ids, sampling={"max_tokens": 8}, keep_state=True)
    assert first.state.rnn.wkv.dtype == torch.float16
    assert first.state.rnn.att_x.dtype == torch.float32
    rest = await run(fp16, (), sampling={"max_tokens": 12}, start_state=first.state)
    # Resuming copies the snapshot (the slot's rounded state) back: the same rounding points as one run.
    assert first.ids + rest.ids == whole.ids
    # Two forks of one snapshot agree, and leave it alone.
    before = first.state.rnn.wkv.clone()
    again = await run(fp16, (), sampling={"max_tokens": 12}, start_state=first.state)
    assert again.ids == rest.ids
    assert torch.equal(first.state.rnn.wkv, before)


async def test_the_prefix_cache_serves_fp16_states(fp16: LocalEngineClient) -> None:
    ids = prompt(fp16, "A long and unique system prompt for the fp16 prefix cache test, repeated twice. " * 2)
    assert len(ids) > CACHE_MIN
    first = await run(fp16, ids, sampling={"max_tokens": 8})
    second = await run(fp16, ids, sampling={"max_tokens": 8})
    uncached = await run(fp16, ids, sampling={"max_tokens": 8}, use_prefix_cache=False)
    assert first.started.cached_tokens == 0
    assert second.started.cached_tokens == len(ids) - 1
    # The first run was split at the cache point too: the same rounding points, the same tokens.
    assert second.ids == first.ids
    # Without the cache the prompt is read in other pieces, so the state is rounded at other points.
    assert_close_greedy(uncached, second)


async def test_an_fp16_export_loads_into_an_fp32_engine(fp16: LocalEngineClient, fp32: LocalEngineClient) -> None:
    base = await run(fp16, prompt(fp16, "Exported from a float16 state"), sampling={"max_tokens": 4}, keep_state=True)
    data = await fp16.export_state(base.state)
    assert load(data)["wkv"].dtype == torch.float16  # the file records the dtype it holds (safetensors)
    imported = await fp32.import_state(data)
    assert isinstance(imported, StateSnapshot)
    assert imported.rnn.wkv.dtype == torch.float32
    assert torch.equal(imported.rnn.wkv, base.state.rnn.wkv.float())  # widening is exact
    # It continues on the fp32 engine like on the fp16 one, up to the state dtype's numerics.
    here = await run(fp16, (), start_state=base.state)
    there = await run(fp32, (), start_state=imported)
    assert_close_greedy(there, here)


async def test_an_fp32_export_loads_into_an_fp16_engine(fp16: LocalEngineClient, fp32: LocalEngineClient) -> None:
    base = await run(fp32, prompt(fp32, "Exported from a float32 state"), sampling={"max_tokens": 4}, keep_state=True)
    data = await fp32.export_state(base.state)
    assert load(data)["wkv"].dtype == torch.float32
    imported = await fp16.import_state(data)
    assert isinstance(imported, StateSnapshot)
    assert imported.rnn.wkv.dtype == torch.float16
    assert torch.equal(imported.rnn.wkv, base.state.rnn.wkv.half())  # rounded to nearest, once
    # An fp16 export is half the size of the state part of an fp32 one.
    again = await fp16.export_state(imported)
    assert len(data) - len(again) == base.state.rnn.wkv.numel() * 2
    assert_close_greedy(await run(fp32, (), start_state=base.state), await run(fp16, (), start_state=imported))


def a_state(engine: LocalEngineClient, wkv: torch.Tensor) -> StateSnapshot:
    m = engine.model
    return StateSnapshot(
        rnn=RnnState(torch.zeros(m.n_layer, m.n_embd), wkv, torch.zeros(m.n_layer, m.n_embd)),
        pending_token=1,
        token_count=1,
        penalties=torch.zeros(m.vocab_size),
        seen=torch.zeros(m.vocab_size, dtype=torch.bool),
        seed=0,
        position=0,
        model_version=m.version,
    )


async def test_a_state_beyond_fp16s_range_is_refused_not_turned_into_infinities(
    fp16: LocalEngineClient, fp32: LocalEngineClient
) -> None:
    m = fp16.model
    wkv = torch.zeros(m.n_layer, m.n_head, m.head_size, m.head_size)
    wkv[1, 0, 3, 5] = 1e6  # finite in fp32 and bf16, beyond fp16's 65504
    data = to_bytes(a_state(fp16, wkv))
    with pytest.raises(InvalidArgument, match="beyond float16's range") as info:
        await fp16.import_state(data)
    assert info.value.first_field == "state"
    assert await fp32.import_state(data)  # an fp32 engine takes it
    # A tensor that is no float at all is refused by name.
    with pytest.raises(InvalidArgument, match="wkv is int32"):
        await fp16.import_state(to_bytes(a_state(fp16, wkv.int())))


async def test_a_bf16_export_loads_into_an_fp16_engine(fp16: LocalEngineClient) -> None:
    m = fp16.model
    wkv = torch.randn(m.n_layer, m.n_head, m.head_size, m.head_size, generator=torch.Generator().manual_seed(0))
    imported = await fp16.import_state(to_bytes(a_state(fp16, wkv.bfloat16())))
    assert isinstance(imported, StateSnapshot)
    assert torch.equal(imported.rnn.wkv, wkv.bfloat16().half())
