"""CUDA-graph decode (service/engine/cuda_graphs.py): buckets, padding, fallback, and replay against eager.

On a CPU the graph machinery runs with a stand-in capture whose replay reruns the step eagerly on the
same static buffers: everything but the CUDA capture itself (bucketing, padding into the scratch slot,
static inputs, mapping logits back, the runner's dispatch, the fallback) is exercised here. The
gpu-marked tests capture real graphs (skipped without a GPU).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from service.config import parse_serve_args
from service.engine import cuda_graphs as cg
from service.engine import local
from service.engine.backend import ModelBackend, StepBatch
from service.engine.checkpoint import load_checkpoint
from service.engine.config import EngineConfig
from service.engine.cuda_graphs import (
    DecodeGraphs,
    Graph,
    bucket_for,
    buckets,
    decode_batch,
    graphs_enabled,
    pad_rows,
)
from service.engine.local import LocalEngineClient, build_backend, build_engine
from service.engine.model import TorchRwkv7
from service.engine.protocol import GenerationRequest, SamplingParams
from service.engine.state_pool import StatePool

CPU = torch.device("cpu")
SLOTS = 16


# ---- pure logic -----------------------------------------------------------------------------------


def test_buckets() -> None:
    assert buckets(1) == (1,)
    assert buckets(10) == (1, 2, 4, 8, 10)
    assert buckets(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert buckets(100) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100)
    big = buckets(1024)
    assert big[-4:] == (384, 512, 768, 1024)
    # Beyond 16 rows, padding wastes at most a third of a step's rows.
    assert all((b - a) / b <= 1 / 3 for a, b in itertools.pairwise(big[4:]))
    with pytest.raises(ValueError, match="at least 1"):
        buckets(0)


def test_bucket_for() -> None:
    sizes = buckets(64)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 8, 9, 17, 25, 33, 49, 64)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        24,
        32,
        48,
        64,
        64,
    ]
    assert bucket_for(65, sizes) is None


def test_pad_rows_fills_with_token_zero_in_the_scratch_slot() -> None:
    assert pad_rows([5, 6, 7], [3, 0, 9], 8, 16) == ([5, 6, 7, 0, 0, 0, 0, 0], [3, 0, 9, 16, 16, 16, 16, 16])
    assert pad_rows([5], [2], 1, 16) == ([5], [2])
    with pytest.raises(ValueError, match="do not pad"):
        pad_rows([1, 2, 3], [0, 1, 2], 2, 16)


def test_decode_batch_equals_the_built_batch() -> None:
    tokens, slots = [11, 0, 65535, 7], [2, 5, 16, 16]
    built = StepBatch.build([[t] for t in tokens], slots, [0, 1, 2, 3], CPU)
    static = decode_batch(torch.tensor(tokens), torch.tensor(slots))
    assert static.is_decode
    assert static.lengths == built.lengths == (1, 1, 1, 1)
    for name in ("tokens", "slots", "starts", "ends", "cu_seqlens", "logit_rows"):
        assert torch.equal(getattr(static, name), getattr(built, name)), name


def test_graphs_enabled() -> None:
    cuda = torch.device("cuda", 0)
    assert graphs_enabled("auto", cuda)
    assert graphs_enabled("on", cuda)
    assert not graphs_enabled("off", cuda)
    assert not graphs_enabled("auto", CPU)
    assert not graphs_enabled("off", CPU)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        graphs_enabled("on", CPU)
    with pytest.raises(ValueError, match="auto, on or off"):
        graphs_enabled("yes", cuda)


def test_config_option() -> None:
    assert EngineConfig().cuda_graphs == "auto"
    with pytest.raises(ValueError, match="cuda_graphs"):
        EngineConfig(cuda_graphs="maybe")
    assert parse_serve_args([], {}).engine.cuda_graphs == "auto"
    assert parse_serve_args(["--cuda-graphs", "off"], {}).engine.cuda_graphs == "off"
    assert parse_serve_args([], {"RWKVD_CUDA_GRAPHS": "on"}).engine.cuda_graphs == "on"
    assert parse_serve_args(["--cuda-graphs", "off"], {"RWKVD_CUDA_GRAPHS": "on"}).engine.cuda_graphs == "off"


def test_scratch_slot_is_never_handed_out(tiny_model: TorchRwkv7) -> None:
    pool = StatePool(tiny_model.shape, 3, CPU, torch.float32, scratch=True)
    assert pool.scratch_slot == 3
    assert pool.capacity == 3
    assert pool.att_x.shape[1] == 4
    assert [pool.allocate() for _ in range(4)] == [0, 1, 2, None]
    assert pool.in_use == 3
    plain = StatePool(tiny_model.shape, 3, CPU, torch.float32)
    assert plain.scratch_slot is None
    assert plain.att_x.shape[1] == 3


# ---- replay against eager, with a stand-in capture --------------------------------------------------


class EagerGraph:
    """A 'graph' whose replay reruns the step: the static buffers and padding are real, the capture is not."""

    def __init__(self, step: Callable[[], torch.Tensor]) -> None:
        self.step = step
        self.output = step()
        self.replays = 0

    def replay(self) -> None:
        self.output = self.step()
        self.replays += 1


class FakeCapture:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls = 0

    def __call__(self, step: Callable[[], torch.Tensor]) -> Graph:
        self.calls += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        return EagerGraph(step)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint: Path) -> TorchRwkv7:
    return TorchRwkv7(load_checkpoint(str(tiny_checkpoint)), CPU, torch.float32)


def random_states(pool: StatePool, slots: int, seed: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    for t in (pool.att_x, pool.wkv, pool.ffn_x):
        t[:, :slots] = (torch.randn(t[:, :slots].shape, generator=g) * 0.5).to(device=t.device, dtype=t.dtype)


def live(pool: StatePool, slot: int) -> list[torch.Tensor]:
    return [t[:, slot].clone() for t in (pool.att_x, pool.wkv, pool.ffn_x)]


def compare_replay_with_eager(
    model: ModelBackend,
    capture: Callable[[Callable[[], torch.Tensor]], Graph] | None,
    sizes: list[int],
    steps: int,
    atol: float,
    state_dtype: torch.dtype = torch.float32,
) -> DecodeGraphs:
    """Greedy decode steps of batches of `sizes` rows, eager on one pool and through DecodeGraphs on another.

    Checks logits and states of the batch's rows, the same greedy tokens, and that slots outside the
    batch keep their exact state. Returns the DecodeGraphs."""
    device = model.device
    eager_pool = StatePool(model.shape, SLOTS, device, model.dtype, state_dtype=state_dtype)
    graph_pool = StatePool(model.shape, SLOTS, device, model.dtype, state_dtype=state_dtype, scratch=True)
    random_states(eager_pool, SLOTS, 0)
    random_states(graph_pool, SLOTS, 0)
    graphs = DecodeGraphs(model, graph_pool, SLOTS, capture)
    rng = random.Random(1)
    for n in sizes:
        slots = rng.sample(range(SLOTS), n)
        others = [s for s in range(SLOTS) if s not in slots]
        before = {s: live(graph_pool, s) for s in others}
        tokens = [rng.randrange(model.shape.vocab_size) for _ in range(n)]
        for step in range(steps):
            batch = StepBatch.build([[t] for t in tokens], slots, list(range(n)), device)
            want = model.forward(batch, eager_pool)
            got = graphs.run(tokens, slots, list(range(n)))
            assert got is not None
            assert got.shape == want.shape
            torch.testing.assert_close(
                got, want, atol=atol, rtol=0, msg=lambda m, n=n, s=step: f"{n} rows, step {s}: {m}"
            )
            for s in slots:
                for a, b in zip(live(graph_pool, s), live(eager_pool, s), strict=True):
                    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)
            assert want.argmax(-1).tolist() == got.argmax(-1).tolist(), (n, step)
            tokens = want.argmax(-1).tolist()
        for s in others:
            for a, b in zip(live(graph_pool, s), before[s], strict=True):
                assert torch.equal(a, b), f"slot {s}, outside the {n}-row batch, changed"
    return graphs


def test_padded_replay_equals_eager(tiny_model: TorchRwkv7) -> None:
    capture = FakeCapture()
    graphs = compare_replay_with_eager(tiny_model, capture, [1, 3, 5, 9, 16, 2, 7], steps=3, atol=1e-4)
    assert graphs.captured == (1, 2, 4, 8, 16)
    assert capture.calls == 5  # once per bucket


def test_logit_rows_map_back(tiny_model: TorchRwkv7) -> None:
    eager_pool = StatePool(tiny_model.shape, SLOTS, CPU, torch.float32)
    graph_pool = StatePool(tiny_model.shape, SLOTS, CPU, torch.float32, scratch=True)
    graphs = DecodeGraphs(tiny_model, graph_pool, SLOTS, FakeCapture())
    tokens, slots, wanted = [10, 20, 30, 40, 50], [4, 1, 7, 0, 9], [3, 0, 4]
    want = tiny_model.forward(StepBatch.build([[t] for t in tokens], slots, wanted, CPU), eager_pool)
    got = graphs.run(tokens, slots, wanted)
    assert got is not None
    assert got.shape == (3, tiny_model.shape.vocab_size)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    none = graphs.run(tokens, slots, [])
    assert none is not None
    assert none.shape == (0, tiny_model.shape.vocab_size)


def test_too_many_rows_run_eager(tiny_model: TorchRwkv7) -> None:
    pool = StatePool(tiny_model.shape, 4, CPU, torch.float32, scratch=True)
    graphs = DecodeGraphs(tiny_model, pool, 4, FakeCapture())
    assert graphs.run([1] * 5, [0, 1, 2, 3, 4], [0]) is None
    with pytest.raises(ValueError, match="scratch"):
        DecodeGraphs(tiny_model, StatePool(tiny_model.shape, 4, CPU, torch.float32), 4, FakeCapture())


def test_capture_failure_falls_back_to_eager_with_one_warning(
    tiny_model: TorchRwkv7, caplog: pytest.LogCaptureFixture
) -> None:
    pool = StatePool(tiny_model.shape, SLOTS, CPU, torch.float32, scratch=True)
    random_states(pool, SLOTS, 0)
    kept = [live(pool, s) for s in range(SLOTS)]
    capture = FakeCapture(fail=True)
    graphs = DecodeGraphs(tiny_model, pool, SLOTS, capture)
    with caplog.at_level(logging.DEBUG, logger="rwkvd.engine"):
        assert graphs.run([1, 2, 3], [0, 1, 2], [0, 1, 2]) is None
        assert graphs.run([1, 2, 3], [0, 1, 2], [0, 1, 2]) is None  # not captured again
        assert graphs.run([1], [0], [0]) is None  # another bucket tries, fails quietly
    assert capture.calls == 2
    assert graphs.failed == {1, 4}
    assert graphs.captured == ()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "capture of 4-row decode steps failed" in warnings[0].getMessage()
    # The failed captures left every live slot alone.
    for s in range(SLOTS):
        for a, b in zip(live(pool, s), kept[s], strict=True):
            assert torch.equal(a, b)


# ---- through the engine ---------------------------------------------------------------------------


def engine_config(path: Path, **kw: object) -> EngineConfig:
    values: dict[str, object] = {
        "model_path": str(path),
        "device": "cpu",  # also on a GPU host: these tests are about the CPU behaviour
        "max_batch_size": 8,
        "max_batch_tokens": 64,
        "prefill_chunk": 16,
        "prefix_cache_entries": 0,
    }
    values.update(kw)
    return EngineConfig(**values)  # type: ignore[arg-type]


async def generate_all(client: LocalEngineClient, max_tokens: list[int], seeded: bool) -> list[list[int]]:
    """Concurrent requests that finish at different steps, so decode batches shrink across buckets."""
    prompts = [[(37 * i + 11 * j) % 60000 + 1 for j in range(3 + 2 * i)] for i in range(len(max_tokens))]

    async def one(i: int) -> list[int]:
        params = SamplingParams(
            max_tokens=max_tokens[i], temperature=1.0 if seeded else 0.0, seed=100 + i, ignore_eos=True
        )
        ids: list[int] = []
        async for ev in client.generate(GenerationRequest(f"g{i}-{random.random()}", tuple(prompts[i]), params)):
            ids.extend(getattr(ev, "token_ids", ()))
        return ids

    return list(await asyncio.gather(*(one(i) for i in range(len(max_tokens)))))


@pytest.fixture
def plain_engine(tiny_checkpoint: Path) -> Iterator[LocalEngineClient]:
    client = build_engine(engine_config(tiny_checkpoint))
    yield client
    client.shutdown()


def test_auto_is_off_on_cpu(plain_engine: LocalEngineClient) -> None:
    runner = plain_engine._runner
    assert runner.graphs is None
    assert runner.pool.scratch_slot is None
    assert runner.pool.att_x.shape[1] == 8


def test_on_without_cuda_is_refused(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        build_engine(engine_config(tiny_checkpoint, cuda_graphs="on"))


@pytest.mark.parametrize("fail", [False, True], ids=["replayed", "capture-fails"])
async def test_engine_with_graphs_equals_engine_without(
    tiny_checkpoint: Path,
    plain_engine: LocalEngineClient,
    monkeypatch: pytest.MonkeyPatch,
    fail: bool,
) -> None:
    # The engine as it runs on a GPU with graphs on, the capture replaced by the stand-in.
    monkeypatch.setattr(local, "graphs_enabled", lambda setting, device: True)
    capture = FakeCapture(fail=fail)
    monkeypatch.setattr(cg, "CudaCapture", lambda device: capture)
    graphed = build_engine(engine_config(tiny_checkpoint))
    try:
        graphs = graphed._runner.graphs
        assert graphs is not None
        assert graphed._runner.pool.scratch_slot == 8
        lengths = [9, 3, 6, 1, 12, 5]
        assert await generate_all(graphed, lengths, seeded=True) == await generate_all(
            plain_engine, lengths, seeded=True
        )
        if fail:
            assert graphs.captured == ()
            assert graphs.failed
        else:
            assert len(graphs.captured) >= 3
            assert not graphs.failed
        assert graphed.stats().slots_total == 8
        assert graphed.stats().slots_in_use == 0
    finally:
        graphed.shutdown()


# ---- on a GPU -------------------------------------------------------------------------------------


def cuda_model(path: Path, backend: str, dtype: str) -> ModelBackend:
    config = engine_config(path, device="cuda", dtype=dtype, backend=backend)
    return build_backend(config, load_checkpoint(str(path)))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_decode_equals_eager_on_cuda_fp32(tiny_checkpoint: Path, backend: str) -> None:
    model = cuda_model(tiny_checkpoint, backend, "float32")
    graphs = compare_replay_with_eager(model, None, [1, 2, 3, 5, 8, 12, 16, 7, 1], steps=6, atol=1e-3)
    assert not graphs.failed, "capture failed: the decode forward is not capturable (a host sync?)"
    assert graphs.captured == (1, 2, 4, 8, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_decode_close_to_eager_on_cuda_fp16(tiny_checkpoint: Path, backend: str) -> None:
    model = cuda_model(tiny_checkpoint, backend, "float16")
    device = model.device
    eager_pool = StatePool(model.shape, SLOTS, device, model.dtype)
    graph_pool = StatePool(model.shape, SLOTS, device, model.dtype, scratch=True)
    random_states(eager_pool, SLOTS, 0)
    random_states(graph_pool, SLOTS, 0)
    graphs = DecodeGraphs(model, graph_pool, SLOTS)
    rng = random.Random(2)
    for n in (1, 3, 6, 11, 16):
        slots = rng.sample(range(SLOTS), n)
        tokens = [rng.randrange(model.shape.vocab_size) for _ in range(n)]
        want = model.forward(StepBatch.build([[t] for t in tokens], slots, list(range(n)), device), eager_pool)
        got = graphs.run(tokens, slots, list(range(n)))
        assert got is not None
        torch.testing.assert_close(got, want, atol=5e-2, rtol=0)
        torch.testing.assert_close(graph_pool.wkv[:, slots], eager_pool.wkv[:, slots], atol=1e-2, rtol=0)
    assert not graphs.failed


@pytest.mark.gpu
def test_graph_decode_equals_eager_on_cuda_with_an_fp16_state(tiny_checkpoint: Path) -> None:
    # fp32 weights, the WKV state stored in fp16 (--state-dtype): replay and eager differ only by GEMMs of
    # different row counts (fp32 noise) and the fp16 roundings that noise flips: one fp16 ulp, 2e-3 at |S| < 4.
    model = cuda_model(tiny_checkpoint, "triton", "float32")
    graphs = compare_replay_with_eager(model, None, [1, 3, 8, 12, 16, 2], steps=4, atol=4e-3, state_dtype=torch.float16)
    assert not graphs.failed, "capture failed with an fp16 state pool"


def test_padded_replay_equals_eager_with_a_bf16_state(tiny_model: TorchRwkv7) -> None:
    # The scratch slot and padding work on a reduced-precision pool too (CPU, torch backend, fp32 weights).
    graphs = compare_replay_with_eager(
        tiny_model, FakeCapture(), [1, 3, 6], steps=2, atol=2 * 2.0**-6, state_dtype=torch.bfloat16
    )
    assert graphs.captured == (1, 4, 8)


class SyncingModel:
    """A backend whose forward syncs with the host: not capturable."""

    def __init__(self, inner: ModelBackend) -> None:
        self.inner = inner
        self.shape, self.device, self.dtype, self.name = inner.shape, inner.device, inner.dtype, "syncing"

    def forward(self, batch: StepBatch, pool: StatePool) -> torch.Tensor:
        out = self.inner.forward(batch, pool)
        if out.sum().item() == float("inf"):  # a host sync
            raise AssertionError
        return out


@pytest.mark.gpu
async def test_engine_with_cuda_graphs_equals_eager_on_cuda(tiny_checkpoint: Path) -> None:
    # fp32, seeded sampling: the same tokens unless logits move by more than accumulation-order noise
    # (fp16 logits differ by an ulp between GEMMs of different row counts, which moves draws over a flat
    # random-weight distribution; the fp16 replay is checked against eager on logits above).
    lengths = [17, 3, 9, 1, 12, 5, 30, 2]
    results = []
    for setting in ("off", "on"):
        client = build_engine(engine_config(tiny_checkpoint, device="cuda", dtype="float32", cuda_graphs=setting))
        try:
            results.append(await generate_all(client, lengths, seeded=True))
            graphs = client._runner.graphs
            if setting == "on":
                assert graphs is not None
                assert not graphs.failed
                assert len(graphs.captured) >= 3
            else:
                assert graphs is None
        finally:
            client.shutdown()
    assert results[0] == results[1]


# Last in the file: torch builds without pytorch#180395 / #190348 leave the caching allocator marked as
# capturing after a failed capture, which could disturb any CUDA test run after this one in the process.
@pytest.mark.gpu
def test_capture_failure_on_cuda_falls_back(tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = SyncingModel(cuda_model(tiny_checkpoint, "torch", "float32"))
    pool = StatePool(model.shape, SLOTS, model.device, model.dtype, scratch=True)
    random_states(pool, SLOTS, 0)
    kept = live(pool, 0)
    graphs = DecodeGraphs(model, pool, SLOTS)
    stream = torch.cuda.current_stream()
    with caplog.at_level(logging.WARNING, logger="rwkvd.engine"):
        assert graphs.run([1, 2, 3], [1, 2, 3], [0, 1, 2]) is None
    assert graphs.failed == {4}
    assert any("capture" in r.getMessage() for r in caplog.records)
    assert torch.cuda.current_stream() == stream
    # The device is still usable and the step runs eager.
    out = model.forward(StepBatch.build([[1], [2], [3]], [1, 2, 3], [0, 1, 2], model.device), pool)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    for a, b in zip(live(pool, 0), kept, strict=True):
        assert torch.equal(a, b)
