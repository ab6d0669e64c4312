"""The fused elementwise kernels of a layer (kernels/rwkv7/fused_layer.py) against their torch references (naive.py).

On a CPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), at tiny sizes.
"""

from __future__ import annotations

import pytest
import torch

from kernels.rwkv7 import fused_layer, naive

P = 7  # slots in the pool
LENGTHS = [1, 3, 1, 7]  # packed prefill rows
SLOTS = [5, 0, 3, 1]
# The references run in fp32 on the inputs as rounded to the dtype, so the comparison is of the arithmetic
# and the kernels' roundings alone. A rounding to bf16 on store costs up to one bf16 step (2^-7 of the
# value) here: the CPU interpreter truncates rather than rounds. fp32: the same formulas in another order.
STEP = {torch.float32: 5e-6, torch.bfloat16: 2**-7}


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, roundings: int = 1) -> bool:
    """Within `roundings` steps of the dtype, relative to the largest value of the row (absolute below 1)."""
    scale = expected.float().abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    return bool(((got.float() - expected.float()).abs() / scale).max() <= roundings * STEP[dtype] + 1e-6)


def fp32(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.float() for t in tensors]


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def packed(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cu_seqlens, starts, ends of packed rows."""
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return cu, cu[:-1], cu[1:] - 1


def norm_inputs(C: int, M: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    weight = (1 + 0.2 * randn(C, seed=1)).to(dtype)
    bias = (0.1 * randn(C, seed=2)).to(dtype)
    mix = torch.rand(M, C, generator=torch.Generator().manual_seed(3)).to(dtype)
    return weight, bias, mix


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("C", "M", "lengths"), [(64, 6, LENGTHS), (32, 1, LENGTHS), (64, 6, [1, 1, 1, 1])])
def test_layer_norm_shift_mix_through_the_slots(dtype: torch.dtype, C: int, M: int, lengths: list[int]) -> None:
    T = sum(lengths)
    x = randn(T, C, seed=4, dtype=dtype) * 2 + 0.5
    weight, bias, mix = norm_inputs(C, M, dtype)
    store = randn(P, C, seed=5, dtype=dtype)
    slots = torch.tensor(SLOTS[: len(lengths)])
    cu, starts, ends = packed(lengths)
    expected_store = store.float().clone()  # .float() of an fp32 tensor is the tensor itself
    expected = naive.layer_norm_shift_mix(*fp32(x, weight, bias, mix), expected_store, slots, starts, ends, 1e-5)

    got_store = store.clone()
    got = fused_layer.layer_norm_shift_mix(x, weight, bias, mix, got_store, slots, cu, 1e-5)
    assert got.shape == (M, T, C)
    assert got.dtype == dtype
    # The mixes round three times: the normalized x and the previous one (as the state holds them), the output.
    assert close(got, expected, dtype, roundings=3)
    assert close(got_store, expected_store, dtype)
    untouched = [s for s in range(P) if s not in slots.tolist()]
    assert torch.equal(got_store[untouched], store[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_in_chunks_or_token_by_token_equals_one_pass(dtype: torch.dtype) -> None:
    """The previous token's x is rounded like the stored state, so how a row is split changes no bit."""
    C, T = 64, 7
    x = randn(T, C, seed=6, dtype=dtype)
    weight, bias, mix = norm_inputs(C, 6, dtype)
    slot = torch.tensor([2])
    whole, split, steps = (randn(P, C, seed=7, dtype=dtype) for _ in range(3))
    one = fused_layer.layer_norm_shift_mix(x, weight, bias, mix, whole, slot, torch.tensor([0, T]), 1e-5)
    chunks = [
        fused_layer.layer_norm_shift_mix(x[a:b], weight, bias, mix, split, slot, torch.tensor([0, b - a]), 1e-5)
        for a, b in ((0, 4), (4, T))
    ]
    tokens = [
        fused_layer.layer_norm_shift_mix(x[t : t + 1], weight, bias, mix, steps, slot, torch.tensor([0, 1]), 1e-5)
        for t in range(T)
    ]
    assert torch.equal(torch.cat(chunks, dim=1), one)
    assert torch.equal(torch.cat(tokens, dim=1), one)
    assert torch.equal(split, whole)
    assert torch.equal(steps, whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "head_size"), [(4, 16), (3, 16)])  # 3: a block of heads partly masked
@pytest.mark.parametrize("value_residual", [False, True])
def test_wkv_inputs(dtype: torch.dtype, heads: int, head_size: int, value_residual: bool) -> None:
    T, C = 5, heads * head_size
    k, v, v_first, w_lora, a_lora, v_lora = (randn(T, C, seed=10 + i, dtype=dtype) for i in range(6))
    w0 = randn(C, seed=20)
    a0, v0, k_k, k_a = (randn(C, seed=21 + i, dtype=dtype) for i in range(4))
    vl = v_lora if value_residual else None
    expected = naive.wkv_inputs(*fp32(k, v, v_first, w_lora, a_lora, vl, w0, a0, v0, k_k, k_a), heads)

    k_in, v_in = k.clone(), v.clone()
    got = fused_layer.wkv_inputs(k_in, v_in, v_first, w_lora, a_lora, vl, w0, a0, v0, k_k, k_a, heads)
    assert got[0].dtype == torch.float32
    assert all(t.dtype == dtype for t in got[1:])
    assert got[1] is k_in  # updated in place
    assert got[2] is v_in
    for name, g, e in zip("wkvab", got, expected, strict=True):
        assert close(g, e, dtype), name
    if not value_residual:
        assert torch.equal(v_in, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "head_size"), [(4, 16), (3, 16)])
def test_wkv_output(dtype: torch.dtype, heads: int, head_size: int) -> None:
    T, C = 5, heads * head_size
    y = randn(T, heads, head_size, seed=30) * 3 + 1
    lnx_w, lnx_b = 1 + 0.2 * randn(C, seed=31), 0.1 * randn(C, seed=32)
    r, k, v, g = (randn(T, C, seed=33 + i, dtype=dtype) for i in range(4))
    r_k = randn(heads, head_size, seed=37, dtype=dtype)
    eps = head_size * 1e-5
    expected = naive.wkv_output(*fp32(y, lnx_w, lnx_b, r, k, v, r_k, g), eps)
    got = fused_layer.wkv_output(y, lnx_w, lnx_b, r, k, v, r_k, g, eps)
    assert got.dtype == dtype
    assert close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_square_in_place(dtype: torch.dtype) -> None:
    h = randn(5, 1000, seed=40, dtype=dtype)  # not a multiple of the block
    expected = naive.relu_square(h.float())
    got = h.clone()
    assert fused_layer.relu_square_(got) is got
    assert close(got, expected, dtype)


def test_bad_arguments_are_refused() -> None:
    x = randn(3, 32, seed=50)
    weight, bias, mix = norm_inputs(32, 6, torch.float32)
    slots, cu = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="dtype of x"):
        fused_layer.layer_norm_shift_mix(x, weight, bias, mix, torch.zeros(4, 32).half(), slots, cu, 1e-5)
    with pytest.raises(ValueError, match="int64"):
        fused_layer.layer_norm_shift_mix(x, weight, bias, mix, torch.zeros(4, 32), slots.int(), cu, 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        fused_layer.layer_norm_shift_mix(x.t().contiguous().t(), weight, bias, mix, torch.zeros(4, 32), slots, cu, 1e-5)
    k = randn(2, 48, seed=51)
    with pytest.raises(ValueError, match="power of two"):
        fused_layer.wkv_inputs(k, k, k, k, k, None, torch.zeros(48), *(torch.zeros(48),) * 4, heads=2)
    with pytest.raises(ValueError, match="fp32"):
        fused_layer.wkv_output(
            torch.zeros(2, 2, 16).half(),
            *(torch.zeros(32),) * 2,
            *(torch.zeros(2, 32),) * 3,
            torch.zeros(2, 16),
            torch.zeros(2, 32),
            1e-5,
        )
