"""The chunked WKV-7 prefill kernel (kernels/rwkv7/chunk.py) against the reference recurrence, in place in a pool.

On a CPU it runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), at tiny sizes: rows of
1 token, less than a chunk, exactly a chunk, a chunk and one token, and several chunks with a tail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kernels.rwkv7.chunk import wkv7_chunk_prefill
from kernels.rwkv7.fused_recurrent import wkv7_prefill
from kernels.rwkv7.naive import wkv7_varlen
from kernels.rwkv7.testing import MODEL_W_MIN, wkv_inputs
from service.engine import triton_backend
from service.engine.backend import StepBatch
from service.engine.checkpoint import load_checkpoint
from service.engine.model import TorchRwkv7
from service.engine.state_pool import StatePool
from service.engine.triton_backend import CHUNK_PREFILL_MIN_TOKENS, TritonRwkv7

# Under the interpreter the intra-chunk products of the harsh decay range overflow where they are masked
# out (s > t, by design: see the module docstring); numpy warns about it. The kept entries are finite.
pytestmark = pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)

H, N, P = 2, 64, 7
LENGTHS = [1, 5, 16, 17, 40]
SLOTS = [4, 0, 6, 2, 3]
HARSH_W_MIN = -8.0  # decay e^-8 per token: a chunk of 16 spans e^-128
# Inputs are rounded to their dtype before both sides see them, so this compares the arithmetic alone.
# Observed: max |dy| ~1.1e-5 to 1.8e-5 with |y| up to ~40 (about 5e-7 relative), max |dS| ~1e-6 to 7e-6.
TOLERANCE_Y = 5e-5
TOLERANCE_STATE = 2e-5


def inputs(rows: int, dtype: torch.dtype, seed: int, w_min: float = MODEL_W_MIN) -> list[torch.Tensor]:
    return wkv_inputs(rows, H, N, dtype=dtype, seed=seed, w_min=w_min, w_spread=3.0)  # both ends of the range hit


def pool(seed: int) -> torch.Tensor:
    return torch.randn(P, H, N, N, generator=torch.Generator().manual_seed(seed)) * 0.5


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def reference(states: torch.Tensor, slots: torch.Tensor, x: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """wkv7_varlen on the rows' states gathered from `states`, scattered back in place; returns y."""
    gathered = states[slots].clone()
    y = wkv7_varlen(*x, gathered, lengths)
    states[slots] = gathered
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_min", [MODEL_W_MIN, HARSH_W_MIN])
def test_chunk_prefill_matches_the_reference(dtype: torch.dtype, w_min: float) -> None:
    slots = torch.tensor(SLOTS)
    x = inputs(sum(LENGTHS), dtype, seed=1, w_min=w_min)
    states = pool(2)
    expected_states = states.clone()
    expected_y = reference(expected_states, slots, x, LENGTHS)

    y = wkv7_chunk_prefill(states, slots, cu_seqlens(LENGTHS), *x, chunk_size=16)
    assert (y - expected_y).abs().max() < TOLERANCE_Y
    assert (states - expected_states).abs().max() < TOLERANCE_STATE
    untouched = [s for s in range(P) if s not in SLOTS]
    assert torch.equal(states[untouched], pool(2)[untouched])


@pytest.mark.parametrize("chunk_size", [32, 64])
def test_larger_chunks_at_the_models_decay_range(chunk_size: int) -> None:
    slots = torch.tensor(SLOTS)
    x = inputs(sum(LENGTHS), torch.float16, seed=3)
    states = pool(4)
    expected_states = states.clone()
    expected_y = reference(expected_states, slots, x, LENGTHS)

    y = wkv7_chunk_prefill(states, slots, cu_seqlens(LENGTHS), *x, chunk_size=chunk_size)
    assert (y - expected_y).abs().max() < TOLERANCE_Y
    assert (states - expected_states).abs().max() < TOLERANCE_STATE


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16])
def test_chunk_prefill_on_a_reduced_precision_pool(state_dtype: torch.dtype) -> None:
    # fp32 math from the stored (rounded) state, rounded once per row when stored: the reference runs in fp32
    # from the same rounded states, and a stored value may differ from it by its own rounding, at most one ulp
    # (2^-10 relative for fp16, 2^-7 for bf16: the interpreter truncates fp32 to bf16), plus TOLERANCE_STATE.
    # Observed: fp16 max |dS| 1.7e-3, bf16 2.7e-2 (|S| up to ~4.7); y as in fp32, 1e-5 (it reads the unrounded state).
    slots = torch.tensor(SLOTS)
    x = inputs(sum(LENGTHS), torch.float16, seed=8)
    states = pool(9).to(state_dtype)
    before = states.clone()
    exact = states.float()
    expected_y = reference(exact, slots, x, LENGTHS)

    y = wkv7_chunk_prefill(states, slots, cu_seqlens(LENGTHS), *x, chunk_size=16)
    assert (y - expected_y).abs().max() < TOLERANCE_Y
    assert states.dtype == state_dtype
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[state_dtype]
    excess = (states.float() - exact).abs() - (exact.abs() * ulp + TOLERANCE_STATE)
    assert excess.max() <= 0
    untouched = [s for s in range(P) if s not in SLOTS]
    assert torch.equal(states[untouched], before[untouched])


def test_a_prompt_split_across_calls_equals_the_recurrent_kernel_in_one_pass() -> None:
    x = inputs(40, torch.float32, seed=5)
    slot = torch.tensor([1])
    whole, split = pool(6), pool(6)
    y_whole = wkv7_prefill(whole, slot, torch.tensor([0, 40]), *x)
    y_a = wkv7_chunk_prefill(split, slot, torch.tensor([0, 23]), *(t[:23].contiguous() for t in x))
    y_b = wkv7_chunk_prefill(split, slot, torch.tensor([0, 17]), *(t[23:].contiguous() for t in x))
    assert (torch.cat([y_a, y_b]) - y_whole).abs().max() < TOLERANCE_Y
    assert (split - whole).abs().max() < TOLERANCE_STATE


def test_bad_chunk_sizes_and_precisions_are_refused() -> None:
    x = inputs(2, torch.float32, seed=7)
    slots, cu = torch.tensor([0, 1]), torch.tensor([0, 1, 2])
    for size in (8, 24):
        with pytest.raises(ValueError, match="power of two"):
            wkv7_chunk_prefill(pool(0), slots, cu, *x, chunk_size=size)
    with pytest.raises(ValueError, match="precision"):
        wkv7_chunk_prefill(pool(0), slots, cu, *x, precision="tf32")


def test_the_triton_backend_prefills_long_rows_with_the_chunk_kernel(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return wkv7_chunk_prefill(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "wkv7_chunk_prefill", counted)
    ckpt = load_checkpoint(tiny_checkpoint)
    cpu = torch.device("cpu")
    reference_model, kernels = TorchRwkv7(ckpt, cpu, torch.float32), TritonRwkv7(ckpt, cpu, torch.float32)
    pools = [StatePool(ckpt.shape, 3, cpu, torch.float32) for _ in range(2)]
    long_row = [(i * 7919) % 65000 + 1 for i in range(CHUNK_PREFILL_MIN_TOKENS + 3)]
    batch = StepBatch.build([long_row, [5, 6]], [2, 0], [0, 1], cpu)
    expected = reference_model.forward(batch, pools[0])
    got = kernels.forward(batch, pools[1])
    assert len(calls) == ckpt.shape.n_layer
    assert (got - expected).abs().max() < 1e-4  # fp32 weights on both sides, as in test_triton_backend.py
    assert (pools[0].wkv - pools[1].wkv).abs().max() < 1e-4
