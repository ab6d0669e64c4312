"""Triton kernels for the elementwise work of an RWKV-7 layer between its matrix products (those stay on cuBLAS).

Each kernel replaces a run of torch ops that would each launch a kernel and round-trip [T, C] through
HBM (a decode layer: 62 launches before, 20 with these, 12 of them cuBLAS products). Each sits beside
its plain-torch reference in naive.py, which the torch backend runs: same name, same arguments but the
row bounds (cu_seqlens here), same outputs; where the reference returns new tensors, the kernels may
update their inputs in place (k and v in `wkv_inputs`, the activation in `relu_square_`).
- `layer_norm_shift_mix`: LayerNorm, token shift through the slot pool's shift state, the M mixes
  (6 for the time mix, 1 for the channel mix). One program per token.
- `wkv_inputs`: decay, in-context learning rate, kk normalisation, k update, value residual: all the
  WKV recurrence takes, from the projections and LoRA outputs. One program per (token, block of heads).
- `wkv_output`: GroupNorm of the WKV output, the bonus term, the gate. One program per (token, block of heads).
- `relu_square_`: the channel mix's activation on [T, F] (F = 4C, the widest elementwise tensor of a
  layer): one read and one write instead of torch's relu then square (two of each). cuBLAS has no
  squared-ReLU epilogue, so it cannot ride on the product.
The LoRAs' tanh and sigmoid stay torch ops (in place): each sits between two products and is [T, D]
small. All math is fp32 inside (inputs are cast right after loading: the CPU interpreter computes bf16
on raw bits otherwise); outputs are stored in the activation dtype, except the log decay (fp32, as the
reference keeps it). Tensors are contiguous row-major; the wrappers check.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .naive import DECAY_SCALE

# Under the CPU interpreter (TRITON_INTERPRET=1, tests) a program costs far more than its work, so one
# program covers a whole token (all heads) and big blocks; on a GPU, blocks of a few heads spread a small
# decode batch over more SMs.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _layer_norm_row(x_ptr, out_ptr, t, c, mask, ln_w, ln_b, C, eps):
    """LayerNorm of packed token t (fp32 math), rounded to the dtype of out_ptr as the shift state holds it."""
    x = tl.load(x_ptr + t * C + c, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    d = tl.where(mask, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / C
    return (d * tl.math.rsqrt(var + eps) * ln_w + ln_b).to(out_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _layer_norm_shift_mix_kernel(
    x_ptr,  # [T, C] packed rows
    ln_w_ptr,  # [C]
    ln_b_ptr,  # [C]
    mix_ptr,  # [M, C]
    store_ptr,  # [P, C] shift state of this layer, by slot; each row's last normalized x is written here
    prev_ptr,  # [B, C] the rows' shift states gathered before the launch (prefill; unused in decode)
    slots_ptr,  # [B] int64
    cu_ptr,  # [B + 1] int64 cu_seqlens (prefill; unused in decode)
    out_ptr,  # [M, T, C] out
    T,
    B,
    C,
    eps,
    M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DECODE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < C
    ln_w = tl.load(ln_w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    ln_b = tl.load(ln_b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    xa = _layer_norm_row(x_ptr, out_ptr, t, c, mask, ln_w, ln_b, C, eps)
    if DECODE:
        # Row t is token t: this program alone reads and then writes the slot.
        slot = tl.load(slots_ptr + t)
        prev = tl.load(store_ptr + slot * C + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(store_ptr + slot * C + c, xa.to(store_ptr.dtype.element_ty), mask=mask)
    else:
        # The token's row: the last row whose start is <= t (binary search in cu_seqlens, B + 1 entries).
        lo = t * 0
        hi = lo + B
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            right = tl.load(cu_ptr + mid) <= t
            lo = tl.where(right, mid, lo)
            hi = tl.where(right, hi, mid)
        start = tl.load(cu_ptr + lo)
        end = tl.load(cu_ptr + lo + 1) - 1
        # Inside a row the previous token's normalized x is recomputed (a second read of one row of x)
        # rather than exchanged between programs; rounded like the stored state, so a row split into
        # chunks gives the same values as in one piece.
        before = _layer_norm_row(x_ptr, out_ptr, tl.maximum(t - 1, 0), c, mask, ln_w, ln_b, C, eps)
        from_state = tl.load(prev_ptr + lo * C + c, mask=mask, other=0.0).to(tl.float32)
        prev = tl.where(t == start, from_state, before)
        slot = tl.load(slots_ptr + lo)
        last = (t + c * 0) == end  # as a vector: the interpreter refuses a scalar in a mask
        tl.store(store_ptr + slot * C + c, xa.to(store_ptr.dtype.element_ty), mask=mask & last)
    dx = prev - xa
    for m in tl.static_range(M):
        mix = tl.load(mix_ptr + m * C + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + (m * T + t) * C + c, xa + dx * mix, mask=mask)


@triton.jit
def _wkv_inputs_kernel(
    k_ptr,  # [T, C] key projection; replaced in place by the updated key
    v_ptr,  # [T, C] value projection; replaced in place by the value after the residual (HAS_VRES)
    v_first_ptr,  # [T, C] layer 0's value (HAS_VRES)
    w_lora_ptr,  # [T, C] tanh(xw @ w1) @ w2
    a_lora_ptr,  # [T, C] (xa @ a1) @ a2
    v_lora_ptr,  # [T, C] (xv @ v1) @ v2 (HAS_VRES)
    w0_ptr,  # [C] fp32
    a0_ptr,  # [C]
    v0_ptr,  # [C] (HAS_VRES)
    k_k_ptr,  # [C]
    k_a_ptr,  # [C]
    w_ptr,  # [T, C] out, fp32 log decay
    a_ptr,  # [T, C] out, -kk
    b_ptr,  # [T, C] out, kk * iclr
    decay_scale,
    H,
    C,
    N: tl.constexpr,
    BH: tl.constexpr,
    HAS_VRES: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    n = tl.arange(0, N)
    chan = h[:, None] * N + n[None, :]  # [BH, N] channel index
    mask = (h < H)[:, None] & (n < N)[None, :]
    off = t * C + chan
    k = tl.load(k_ptr + off, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w0_ptr + chan, mask=mask, other=0.0) + tl.load(w_lora_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + off, -decay_scale * tl.sigmoid(w), mask=mask)
    a0 = tl.load(a0_ptr + chan, mask=mask, other=0.0).to(tl.float32)
    iclr = tl.sigmoid(a0 + tl.load(a_lora_ptr + off, mask=mask, other=0.0).to(tl.float32))
    kk = k * tl.load(k_k_ptr + chan, mask=mask, other=0.0).to(tl.float32)
    kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, axis=1)), 1e-12)[:, None]  # F.normalize per head
    tl.store(a_ptr + off, -kk, mask=mask)
    tl.store(b_ptr + off, kk * iclr, mask=mask)
    k_a = tl.load(k_a_ptr + chan, mask=mask, other=0.0).to(tl.float32)
    tl.store(k_ptr + off, k * (1 + (iclr - 1) * k_a), mask=mask)
    if HAS_VRES:
        v = tl.load(v_ptr + off, mask=mask, other=0.0).to(tl.float32)
        v_first = tl.load(v_first_ptr + off, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(v0_ptr + chan, mask=mask, other=0.0).to(tl.float32)
        gate = tl.sigmoid(gate + tl.load(v_lora_ptr + off, mask=mask, other=0.0).to(tl.float32))
        tl.store(v_ptr + off, v + (v_first - v) * gate, mask=mask)


@triton.jit
def _wkv_output_kernel(
    y_ptr,  # [T, H, N] fp32 WKV output
    lnx_w_ptr,  # [C] fp32
    lnx_b_ptr,  # [C] fp32
    r_ptr,  # [T, C]
    k_ptr,  # [T, C]
    v_ptr,  # [T, C]
    r_k_ptr,  # [H, N]
    g_ptr,  # [T, C]
    out_ptr,  # [T, C] out
    eps,
    H,
    C,
    N: tl.constexpr,
    BH: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    n = tl.arange(0, N)
    chan = h[:, None] * N + n[None, :]
    mask = (h < H)[:, None] & (n < N)[None, :]
    off = t * C + chan
    y = tl.load(y_ptr + off, mask=mask, other=0.0)
    mean = tl.sum(y, axis=1) / N
    d = y - mean[:, None]
    var = tl.sum(d * d, axis=1) / N
    y = d * tl.math.rsqrt(var + eps)[:, None] * tl.load(lnx_w_ptr + chan, mask=mask, other=0.0)
    y += tl.load(lnx_b_ptr + chan, mask=mask, other=0.0)
    r = tl.load(r_ptr + off, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + off, mask=mask, other=0.0).to(tl.float32)
    r_k = tl.load(r_k_ptr + chan, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + off, mask=mask, other=0.0).to(tl.float32)
    bonus = tl.sum(r * k * r_k, axis=1)[:, None] * v
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, (y + bonus) * g, mask=mask)


@triton.jit
def _relu_square_kernel(
    x_ptr,  # [numel], replaced in place
    numel,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    x = tl.maximum(tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32), 0.0)
    tl.store(x_ptr + i, x * x, mask=mask)


def _check_rows(rows: int, width: int, *tensors: torch.Tensor) -> None:
    for x in tensors:
        if x.shape != (rows, width) or not x.is_contiguous():
            raise ValueError(f"expected contiguous [{rows}, {width}] tensors, got {tuple(x.shape)}")


def _check_vectors(width: int, *tensors: torch.Tensor) -> None:
    for x in tensors:
        if x.numel() != width or not x.is_contiguous():
            raise ValueError(f"expected contiguous vectors of {width}, got {tuple(x.shape)}")


def _head_block(heads: int, head_size: int) -> int:
    """Heads per program: all of a token's under the interpreter; ~256 channels per program on a GPU."""
    if head_size & (head_size - 1):
        raise ValueError(f"head size must be a power of two, got {head_size}")
    all_heads = int(triton.next_power_of_2(heads))  # a block is a power of two; heads past H are masked
    return all_heads if INTERPRETED else min(all_heads, max(1, 256 // head_size))


def layer_norm_shift_mix(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mix: torch.Tensor,
    store: torch.Tensor,
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """LayerNorm, token shift through the slots' shift states, and the token-shift mixes of one block.

    xa = LN(x); prev = the previous token's xa in its row (the slot's stored xa for a row's first
    token); out[m] = xa + (prev - xa) * mix[m]. Each row's last xa is stored back to its slot.

    Args:
        x: [T, C] packed rows.
        weight, bias: [C] LayerNorm affine.
        mix: [M, C] mix coefficients (6 for the time mix, 1 for the channel mix).
        store: [P, C] shift state of this layer, by slot, dtype of x; the rows' slots updated in place.
        slots: [B] int64 slot of each row (distinct).
        cu_seqlens: [B + 1] int64, row i is tokens cu_seqlens[i]:cu_seqlens[i + 1].
        eps: LayerNorm epsilon.
    Returns:
        [M, T, C], dtype of x.
    """
    T, C = x.shape
    B, M = slots.shape[0], mix.shape[0]
    _check_rows(T, C, x)
    _check_rows(M, C, mix)
    _check_vectors(C, weight, bias)
    if store.dim() != 2 or store.shape[1] != C or not store.is_contiguous() or store.dtype != x.dtype:
        raise ValueError(f"the shift state must be a contiguous [P, {C}] tensor of the dtype of x")
    if slots.dtype != torch.int64 or cu_seqlens.dtype != torch.int64:
        raise ValueError("slots and cu_seqlens must be int64")
    out = torch.empty((M, T, C), device=x.device, dtype=x.dtype)
    decode = B == T  # every row is one token
    # In prefill a row's first token reads its slot while its last token, another program, writes it:
    # the rows' states are read before the launch (one small gather) so that no program races another.
    prev = store if decode else store.index_select(0, slots)
    block_c = triton.next_power_of_2(C)
    _layer_norm_shift_mix_kernel[(T,)](
        x,
        weight,
        bias,
        mix,
        store,
        prev,
        slots,
        cu_seqlens,
        out,
        T,
        B,
        C,
        eps,
        M=M,
        BLOCK_C=block_c,
        DECODE=decode,
        # Unused in decode: a constant there, so that decode steps of every batch size share one compiled
        # kernel (each CUDA-graph bucket would otherwise compile its own variant while serving).
        SEARCH_STEPS=1 if decode else max(1, (B - 1).bit_length()),
        num_warps=min(16, max(4, block_c // 512)),
    )
    return out


def wkv_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    v_first: torch.Tensor,
    w_lora: torch.Tensor,
    a_lora: torch.Tensor,
    v_lora: torch.Tensor | None,
    w0: torch.Tensor,
    a0: torch.Tensor,
    v0: torch.Tensor | None,
    k_k: torch.Tensor,
    k_a: torch.Tensor,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the WKV recurrence takes, from the projections of one layer's time mix.

    log decay w = -exp(-0.5) * sigmoid(w0 + w_lora) (fp32); iclr = sigmoid(a0 + a_lora);
    kk = normalize(k * k_k) per head; k <- k * (1 + (iclr - 1) * k_a);
    v <- v + (v_first - v) * sigmoid(v0 + v_lora) (not in layer 0: v_lora None); a = -kk; b = kk * iclr.

    Args:
        k, v: [T, C] key and value projections, updated in place.
        v_first: [T, C] layer 0's value (ignored when v_lora is None).
        w_lora, a_lora, v_lora: [T, C] LoRA outputs (tanh(xw@w1)@w2, (xa@a1)@a2, (xv@v1)@v2).
        w0: [C] fp32; a0, v0, k_k, k_a: [C].
        heads: H (C = H * N, N a power of two).
    Returns:
        w [T, C] fp32, then k and v (the arguments, updated), a and b [T, C] in the dtype of k.
    """
    T, C = k.shape
    N = C // heads
    _check_rows(T, C, k, v, w_lora, a_lora)
    _check_vectors(C, w0, a0, k_k, k_a)
    if w0.dtype != torch.float32:
        raise ValueError("w0 must be fp32")
    has_vres = v_lora is not None
    if v_lora is not None:
        if v0 is None:
            raise ValueError("v0 is needed with v_lora")
        _check_rows(T, C, v_first, v_lora)
        _check_vectors(C, v0)
    w = torch.empty((T, C), device=k.device, dtype=torch.float32)
    a, b = torch.empty_like(k), torch.empty_like(k)
    bh = _head_block(heads, N)
    _wkv_inputs_kernel[(T, triton.cdiv(heads, bh))](
        k,
        v,
        v_first if has_vres else v,  # unread without the value residual
        w_lora,
        a_lora,
        v_lora if v_lora is not None else v,
        w0,
        a0,
        v0 if v0 is not None else a0,
        k_k,
        k_a,
        w,
        a,
        b,
        DECAY_SCALE,
        heads,
        C,
        N=N,
        BH=bh,
        HAS_VRES=has_vres,
    )
    return w, k, v, a, b


def wkv_output(
    y: torch.Tensor,
    lnx_w: torch.Tensor,
    lnx_b: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r_k: torch.Tensor,
    g: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """The input of the output projection: (GroupNorm(y) + (sum over the head of r * k * r_k) * v) * g.

    Args:
        y: [T, H, N] fp32 WKV output.
        lnx_w, lnx_b: [C] fp32 GroupNorm affine (H groups).
        r, k, v: [T, C] (k updated, v after the value residual, as the recurrence saw them).
        r_k: [H, N] bonus weight.
        g: [T, C] output gate.
        eps: GroupNorm epsilon (N * 1e-5 in RWKV-7).
    Returns:
        [T, C], dtype of r.
    """
    T, H, N = y.shape
    C = H * N
    if y.dtype != torch.float32 or not y.is_contiguous() or lnx_w.dtype != torch.float32:
        raise ValueError("y must be a contiguous fp32 [T, H, N] tensor, the GroupNorm affine fp32")
    _check_rows(T, C, r, k, v, g)
    _check_vectors(C, lnx_w, lnx_b, r_k)
    out = torch.empty_like(r)
    bh = _head_block(H, N)
    _wkv_output_kernel[(T, triton.cdiv(H, bh))](y, lnx_w, lnx_b, r, k, v, r_k, g, out, eps, H, C, N=N, BH=bh)
    return out


def relu_square_(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 in place (one read and one write instead of torch's two of each); returns x.

    Args:
        x: any contiguous float tensor ([T, F] after the channel mix's key projection).
    """
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    block = 4096 if INTERPRETED else 1024
    _relu_square_kernel[(triton.cdiv(x.numel(), block),)](x, x.numel(), BLOCK=block)
    return x
