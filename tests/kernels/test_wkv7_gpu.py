"""The WKV-7 kernels at the real shapes of the released models, on a GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from kernels.rwkv7.chunk import wkv7_chunk_prefill
from kernels.rwkv7.fused_recurrent import wkv7_decode, wkv7_prefill
from kernels.rwkv7.naive import wkv7_step, wkv7_varlen
from kernels.rwkv7.testing import wkv_inputs

pytestmark = pytest.mark.gpu
N = 64


def inputs(rows: int, heads: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return wkv_inputs(rows, heads, N, dtype=dtype, device="cuda")


@pytest.mark.parametrize(("heads", "rows"), [(12, 1), (32, 64), (40, 256), (64, 256)])  # 0.1B, 1.5B, 2.9B, 7.2B
def test_decode_at_real_shapes(heads: int, rows: int) -> None:
    pool = torch.randn(rows + 3, heads, N, N, device="cuda") * 0.1
    slots = torch.randperm(rows + 3, device="cuda")[:rows]
    x = inputs(rows, heads, torch.float16)
    expected = pool.clone()
    gathered = expected[slots].clone()
    y_ref = wkv7_step(gathered, *x)
    expected[slots] = gathered
    y = wkv7_decode(pool, slots, *x)
    torch.cuda.synchronize()
    assert (y - y_ref).abs().max().item() < 1e-3
    assert (pool - expected).abs().max().item() < 1e-3


@pytest.mark.parametrize("heads", [12, 40])
def test_prefill_at_real_shapes(heads: int) -> None:
    lengths = [1024, 1, 300, 77]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    slots = torch.tensor([5, 0, 3, 1], device="cuda")
    pool = torch.randn(6, heads, N, N, device="cuda") * 0.1
    x = inputs(sum(lengths), heads, torch.float16)
    expected = pool.clone()
    gathered = expected[slots].clone()
    y_ref = wkv7_varlen(*x, gathered, lengths)
    expected[slots] = gathered
    y = wkv7_prefill(pool, slots, cu, *x)
    torch.cuda.synchronize()
    assert (y - y_ref).abs().max().item() < 5e-3
    assert (pool - expected).abs().max().item() < 5e-3


@pytest.mark.parametrize(("chunk_size", "precision"), [(16, "ieee"), (16, "tf32x3"), (32, "ieee"), (64, "ieee")])
def test_chunk_prefill_at_real_shapes_matches_the_recurrent_kernel(chunk_size: int, precision: str) -> None:
    heads = 32  # 1.5B
    lengths = [4096, 1, 1000, 63, 2048, 17]  # long rows, a single token, tails of every size
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    slots = torch.tensor([7, 0, 3, 1, 5, 2], device="cuda")
    pool = torch.randn(8, heads, N, N, device="cuda") * 0.1
    x = inputs(sum(lengths), heads, torch.float16)
    recurrent = pool.clone()
    y_ref = wkv7_prefill(recurrent, slots, cu, *x)
    y = wkv7_chunk_prefill(pool, slots, cu, *x, chunk_size=chunk_size, precision=precision)
    torch.cuda.synchronize()
    # Both in fp32 from the same fp16 inputs: on the CPU interpreter they agree to ~2e-5 at 4k tokens (|y| ~60).
    assert (y - y_ref).abs().max().item() < 2e-3
    assert (pool - recurrent).abs().max().item() < 1e-3


# A reduced-precision state pool (--state-dtype) at the real shapes: fp32 math from the stored state, rounded to
# nearest once per launch (per token in decode, per row in prefill). The reference runs in fp32 from the same
# rounded states; a stored value may differ from it by its rounding (half an ulp) plus a flip that the fp32 noise
# above (1e-3 over a long prefill) can cause: bound one ulp of the value (2^-10 relative for fp16, 2^-7 for
# bf16) plus that noise.
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_rounded_from(stored: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, noise: float) -> None:
    assert stored.dtype == dtype
    excess = (stored.float() - exact).abs() - (exact.abs() * ULP[dtype] + noise)
    assert excess.max().item() <= 0


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("heads", "rows"), [(40, 256), (64, 1024)])  # 2.9B at batch 256, 7.2B at 1024
def test_decode_on_a_reduced_precision_pool_at_real_shapes(heads: int, rows: int, state_dtype: torch.dtype) -> None:
    pool = (torch.randn(rows + 3, heads, N, N, device="cuda") * 0.1).to(state_dtype)
    slots = torch.randperm(rows + 3, device="cuda")[:rows]
    x = inputs(rows, heads, torch.float16)
    exact = pool.float()
    gathered = exact[slots].clone()
    y_ref = wkv7_step(gathered, *x)
    exact[slots] = gathered
    before = pool.clone()
    y = wkv7_decode(pool, slots, *x)
    torch.cuda.synchronize()
    assert (y - y_ref).abs().max().item() < 1e-3
    assert_rounded_from(pool, exact, state_dtype, 1e-3)
    untouched = torch.ones(rows + 3, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["recurrent", "chunk"])
def test_prefill_on_a_reduced_precision_pool_at_real_shapes(kernel: str, state_dtype: torch.dtype) -> None:
    heads = 40  # 2.9B
    lengths = [1024, 1, 300, 77]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    slots = torch.tensor([5, 0, 3, 1], device="cuda")
    pool = (torch.randn(6, heads, N, N, device="cuda") * 0.1).to(state_dtype)
    x = inputs(sum(lengths), heads, torch.float16)
    exact = pool.float()
    gathered = exact[slots].clone()
    y_ref = wkv7_varlen(*x, gathered, lengths)
    exact[slots] = gathered
    prefill = wkv7_prefill if kernel == "recurrent" else wkv7_chunk_prefill
    y = prefill(pool, slots, cu, *x)
    torch.cuda.synchronize()
    assert (y - y_ref).abs().max().item() < 5e-3  # as in fp32: the state stays fp32 across a row's tokens
    assert_rounded_from(pool, exact, state_dtype, 5e-3)  # ... and is rounded once, at the end
