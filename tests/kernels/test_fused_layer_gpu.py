"""The fused layer kernels at the real shapes of the released models, on a GPU (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels.rwkv7 import fused_layer, naive
from service.engine.backend import StepBatch
from service.engine.checkpoint import load_checkpoint
from service.engine.generator import generate_state_dict, model_shape, write_checkpoint
from service.engine.model import TorchRwkv7
from service.engine.state_pool import StatePool
from service.engine.triton_backend import TritonRwkv7

pytestmark = pytest.mark.gpu
N = 64
# 1.5B (C 2048, H 32) and 2.9B (C 2560: a width that is not a power of two, H 40).
SHAPES = [(2048, 32), (2560, 40)]
# The references run in fp32 on the same rounded inputs: a kernel's rounding to the dtype on store costs up
# to half a step (round to nearest): 2^-8 of the value for bf16, 2^-11 for fp16.
HALF_STEP = {torch.float32: 5e-6, torch.float16: 2**-11, torch.bfloat16: 2**-8}


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, roundings: int = 1) -> bool:
    """Within `roundings` half steps of the dtype, relative to the largest value of the row (absolute below 1)."""
    scale = expected.float().abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    err = ((got.float() - expected.float()).abs() / scale).max().item()
    return bool(err <= roundings * HALF_STEP[dtype] + 1e-5)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("C", "heads"), SHAPES)
@pytest.mark.parametrize("lengths", [[1024, 1, 300, 77], [1] * 64], ids=["prefill", "decode"])
@pytest.mark.parametrize("M", [6, 1])
def test_layer_norm_shift_mix_at_real_shapes(
    dtype: torch.dtype, C: int, heads: int, lengths: list[int], M: int
) -> None:
    torch.manual_seed(0)
    T, P = sum(lengths), len(lengths) + 3
    x = randn(T, C, dtype=dtype) * 2 + 0.5
    weight, bias = (1 + 0.2 * randn(C)).to(dtype), (0.1 * randn(C)).to(dtype)
    mix = torch.rand(M, C, device="cuda").to(dtype)
    store = randn(P, C, dtype=dtype)
    slots = torch.randperm(P, device="cuda")[: len(lengths)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    expected_store = store.float().clone()
    expected = naive.layer_norm_shift_mix(
        x.float(), weight.float(), bias.float(), mix.float(), expected_store, slots, cu[:-1], cu[1:] - 1, 1e-5
    )
    got_store = store.clone()
    got = fused_layer.layer_norm_shift_mix(x, weight, bias, mix, got_store, slots, cu, 1e-5)
    torch.cuda.synchronize()
    # The mixes round three times: the normalized x and the previous one (as the state holds them), the output.
    assert close(got, expected, dtype, roundings=3)
    assert close(got_store, expected_store, dtype)
    untouched = torch.ones(P, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert torch.equal(got_store[untouched], store[untouched])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("C", "heads"), SHAPES)
@pytest.mark.parametrize("rows", [1, 256])
@pytest.mark.parametrize("value_residual", [False, True])
def test_wkv_inputs_at_real_shapes(dtype: torch.dtype, C: int, heads: int, rows: int, value_residual: bool) -> None:
    torch.manual_seed(1)
    k, v, v_first, w_lora, a_lora, v_lora = (randn(rows, C, dtype=dtype) for _ in range(6))
    w0 = randn(C)
    a0, v0, k_k, k_a = (randn(C, dtype=dtype) for _ in range(4))
    vl = v_lora if value_residual else None
    f = [t.float() for t in (k, v, v_first, w_lora, a_lora, v_lora)]
    consts = [t.float() for t in (w0, a0, v0, k_k, k_a)]
    expected = naive.wkv_inputs(*f[:5], f[5] if value_residual else None, *consts, heads)
    got = fused_layer.wkv_inputs(k, v, v_first, w_lora, a_lora, vl, w0, a0, v0, k_k, k_a, heads)
    torch.cuda.synchronize()
    for name, g, e in zip("wkvab", got, expected, strict=True):
        assert close(g, e, dtype), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("C", "heads"), SHAPES)
@pytest.mark.parametrize("rows", [1, 256])
def test_wkv_output_at_real_shapes(dtype: torch.dtype, C: int, heads: int, rows: int) -> None:
    torch.manual_seed(2)
    y = randn(rows, heads, N) * 3 + 1
    lnx_w, lnx_b = 1 + 0.2 * randn(C), 0.1 * randn(C)
    r, k, v, g = (randn(rows, C, dtype=dtype) for _ in range(4))
    r_k = randn(heads, N, dtype=dtype)
    expected = naive.wkv_output(y, lnx_w, lnx_b, r.float(), k.float(), v.float(), r_k.float(), g.float(), N * 1e-5)
    got = fused_layer.wkv_output(y, lnx_w, lnx_b, r, k, v, r_k, g, N * 1e-5)
    torch.cuda.synchronize()
    assert close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_relu_square_at_real_shapes(dtype: torch.dtype) -> None:
    h = randn(257, 4 * 2048, dtype=dtype)
    expected = naive.relu_square(h.float())
    fused_layer.relu_square_(h)
    torch.cuda.synchronize()
    assert close(h, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_backend_matches_the_torch_backend_at_width_2048(tmp_path: Path, dtype: torch.dtype) -> None:
    """Two layers of the 1.5B shape (small vocabulary): prefill rows, a decode step, a mixed step."""
    shape = model_shape(2, 2048, vocab_size=1024)
    ckpt = load_checkpoint(write_checkpoint(generate_state_dict(shape, seed=3), tmp_path / "m.pth"))
    cuda = torch.device("cuda")
    reference, kernels = TorchRwkv7(ckpt, cuda, dtype), TritonRwkv7(ckpt, cuda, dtype)
    pools = [StatePool(ckpt.shape, 6, cuda, dtype) for _ in range(2)]
    steps = [
        ([list(range(1, 300)), [5], list(range(7, 80))], [3, 0, 1], [0, 1, 2]),
        ([[55], [6], [9]], [3, 0, 1], [0, 1, 2]),
        ([[66, 77], [10]], [0, 3], [1]),
    ]
    # fp32: sums in another order. bf16: the torch backend rounds after every elementwise op, the kernels
    # once per stage, through 2 layers (logit std ~1.5).
    tolerance = 2e-3 if dtype == torch.float32 else 0.15
    for rows, slots, wanted in steps:
        batch = StepBatch.build(rows, slots, wanted, cuda)
        expected = reference.forward(batch, pools[0])
        got = kernels.forward(batch, pools[1])
        torch.cuda.synchronize()
        assert (got - expected).abs().max().item() < tolerance
        for name in ("att_x", "wkv", "ffn_x"):
            a, b = (getattr(p, name).float() for p in pools)
            assert (a - b).abs().max().item() < tolerance, name
