"""Triton WKV-7 kernels against the reference recurrence (kernels/rwkv7/naive.py), in place in a slot pool.

On a CPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), at tiny sizes.
"""

from __future__ import annotations

import pytest
import torch

from kernels.rwkv7.fused_recurrent import wkv7_decode, wkv7_prefill
from kernels.rwkv7.naive import wkv7_step, wkv7_varlen
from kernels.rwkv7.testing import wkv_inputs

H, N, P = 2, 64, 6
# Inputs are rounded to their dtype before both sides see them, so the comparison is of the arithmetic
# alone: fp32 accumulations in a different order differ by ~1e-6 here.
TOLERANCE = 2e-5


def inputs(rows: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    return wkv_inputs(rows, H, N, dtype=dtype, seed=seed)


def pool(seed: int) -> torch.Tensor:
    return torch.randn(P, H, N, N, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_updates_the_rows_slots_in_place(dtype: torch.dtype) -> None:
    slots = torch.tensor([4, 0, 2])
    x = inputs(3, dtype, seed=1)
    states = pool(2)
    expected_states = states.clone()
    gathered = expected_states[slots].clone()
    expected_y = wkv7_step(gathered, *x)
    expected_states[slots] = gathered

    y = wkv7_decode(states, slots, *x)
    assert (y - expected_y).abs().max() < TOLERANCE
    assert (states - expected_states).abs().max() < TOLERANCE
    untouched = [s for s in range(P) if s not in slots.tolist()]
    assert torch.equal(states[untouched], pool(2)[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_prefill_matches_the_reference(dtype: torch.dtype) -> None:
    lengths = [5, 1, 3]
    slots = torch.tensor([3, 5, 1])
    cu = torch.tensor([0, 5, 6, 9])
    x = inputs(sum(lengths), dtype, seed=3)
    states = pool(4)
    expected_states = states.clone()
    gathered = expected_states[slots].clone()
    expected_y = wkv7_varlen(*x, gathered, lengths)
    expected_states[slots] = gathered

    y = wkv7_prefill(states, slots, cu, *x)
    assert (y - expected_y).abs().max() < TOLERANCE
    assert (states - expected_states).abs().max() < TOLERANCE


def test_chunked_prefill_equals_one_pass() -> None:
    x = inputs(7, torch.float32, seed=5)
    slot = torch.tensor([0])
    whole, split = pool(6), pool(6)
    y_whole = wkv7_prefill(whole, slot, torch.tensor([0, 7]), *x)
    y_a = wkv7_prefill(split, slot, torch.tensor([0, 4]), *(t[:4].contiguous() for t in x))
    y_b = wkv7_prefill(split, slot, torch.tensor([0, 3]), *(t[4:].contiguous() for t in x))
    assert (torch.cat([y_a, y_b]) - y_whole).abs().max() < TOLERANCE
    assert (split - whole).abs().max() < TOLERANCE


# A reduced-precision pool (--state-dtype): the kernels run the fp32 math on the stored state and round the
# result once when they store it. Compared with the fp32 reference run from the same (already rounded)
# initial states, a stored value may be off by its own rounding: half an ulp when rounded to nearest (GPU,
# and fp16 under the interpreter), under one ulp when truncated (the interpreter's fp32 -> bf16), plus the
# fp32 arithmetic noise above. Bound: one ulp of the value, 2^-10 relative for fp16 (10 fraction bits) and
# 2^-7 for bf16 (7), plus TOLERANCE. Observed here (|S| up to ~4.5): fp16 max |dS| 1e-3 to 2e-3 (half an ulp),
# bf16 1.6e-2 to 3e-2 (one ulp: truncated); y as in fp32 (~6e-6).
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
REDUCED = [torch.float16, torch.bfloat16]


def assert_rounded_from(stored: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """`stored` (a pool of `dtype`) is the fp32 `exact` rounded to `dtype`, up to the bound above."""
    assert stored.dtype == dtype
    excess = (stored.float() - exact).abs() - (exact.abs() * ULP[dtype] + TOLERANCE)
    assert excess.max() <= 0, f"off by {excess.max().item():.3g} beyond one {dtype} ulp"


@pytest.mark.parametrize("state_dtype", REDUCED)
def test_decode_on_a_reduced_precision_pool(state_dtype: torch.dtype) -> None:
    slots = torch.tensor([4, 0, 2])
    x = inputs(3, torch.float16, seed=11)
    states = pool(12).to(state_dtype)
    before = states.clone()
    exact = states.float()  # the reference runs in fp32 from the same rounded states
    gathered = exact[slots].clone()
    expected_y = wkv7_step(gathered, *x)
    exact[slots] = gathered

    y = wkv7_decode(states, slots, *x)
    assert (y - expected_y).abs().max() < TOLERANCE  # y reads the fp32 state, before its rounding
    assert_rounded_from(states, exact, state_dtype)
    untouched = [s for s in range(P) if s not in slots.tolist()]
    assert torch.equal(states[untouched], before[untouched])


@pytest.mark.parametrize("state_dtype", REDUCED)
def test_varlen_prefill_on_a_reduced_precision_pool_rounds_once(state_dtype: torch.dtype) -> None:
    lengths = [6, 1, 3]
    slots = torch.tensor([3, 5, 1])
    cu = torch.tensor([0, 6, 7, 10])
    x = inputs(sum(lengths), torch.float16, seed=13)
    states = pool(14).to(state_dtype)
    exact = states.float()
    gathered = exact[slots].clone()
    expected_y = wkv7_varlen(*x, gathered, lengths)
    exact[slots] = gathered

    stepwise = states.clone()  # the same 6 tokens of row 0 as 6 decode steps: rounded after each
    y = wkv7_prefill(states, slots, cu, *x)
    assert (y - expected_y).abs().max() < TOLERANCE  # the state stays fp32 across a row's tokens
    assert_rounded_from(states, exact, state_dtype)  # ... and is rounded once, at the end
    for t in range(lengths[0]):
        wkv7_decode(stepwise, slots[:1], *(v[t : t + 1].contiguous() for v in x))
    row = int(slots[0])
    once_error = (states[row].float() - exact[row]).abs().mean()
    stepwise_error = (stepwise[row].float() - exact[row]).abs().mean()
    # Why a prefill with a reduced state is closer to fp32 than token-by-token decode: mean |dS| observed
    # 8.8e-5 against 1.4e-4 (fp16), 1.4e-3 against 3.8e-3 (bf16).
    assert once_error < stepwise_error


def test_bad_arguments_are_refused() -> None:
    x = inputs(2, torch.float32, seed=7)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        wkv7_decode(pool(0).double(), torch.tensor([0, 1]), *x)
    with pytest.raises(ValueError, match="int64"):
        wkv7_decode(pool(0), torch.tensor([0, 1], dtype=torch.int32), *x)
    with pytest.raises(ValueError, match="contiguous"):
        wkv7_decode(pool(0), torch.tensor([0, 1]), x[0].transpose(1, 2), *x[1:])
