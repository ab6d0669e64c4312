"""Triton WKV-7 kernels against the reference recurrence (kernels/rwkv7/naive.py), in place in a slot pool.

On a CPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), at tiny sizes.
"""

from __future__ import annotations

import pytest
import torch

from kernels.rwkv7.fused_recurrent import wkv7_decode, wkv7_prefill
from kernels.rwkv7.naive import wkv7_step, wkv7_varlen

H, N, P = 2, 64, 6
# Inputs are rounded to their dtype before both sides see them, so the comparison is of the arithmetic
# alone: fp32 accumulations in a different order differ by ~1e-6 here.
TOLERANCE = 2e-5


def inputs(rows: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(rows, H, N, generator=g)
    w = -0.6065 * torch.sigmoid(torch.randn(rows, H, N, generator=g) * 2)  # log decay, as RWKV-7 makes it
    k = torch.randn(rows, H, N, generator=g) * 0.5
    v = torch.randn(rows, H, N, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(rows, H, N, generator=g), dim=-1)
    lr = torch.sigmoid(torch.randn(rows, H, N, generator=g))
    return [t.to(dtype).contiguous() for t in (r, w, k, v, -kk, kk * lr)]


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


def test_bad_arguments_are_refused() -> None:
    x = inputs(2, torch.float32, seed=7)
    with pytest.raises(ValueError, match="fp32"):
        wkv7_decode(pool(0).half(), torch.tensor([0, 1]), *x)
    with pytest.raises(ValueError, match="int64"):
        wkv7_decode(pool(0), torch.tensor([0, 1], dtype=torch.int32), *x)
    with pytest.raises(ValueError, match="contiguous"):
        wkv7_decode(pool(0), torch.tensor([0, 1]), x[0].transpose(1, 2), *x[1:])
