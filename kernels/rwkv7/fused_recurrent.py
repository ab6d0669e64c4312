"""Triton WKV-7 kernels that read and update each row's state in place in the engine's slot pool.

Two kernels, each beside its reference in naive.py (`wkv7_step`, `wkv7_varlen`):
- decode: one token per row, rows of any slots (the batched decode step);
- varlen: packed rows of different lengths (prefill chunks), a loop over time inside the program.
A program owns one (row, head, block of BV value rows) tile of the N x N state, loads it once from the
pool, updates it for every token of the row, and stores it back: the state crosses HBM exactly once
per step, and no gathered copy of the batch's states exists. Inputs any float dtype (cast right after
loading: the CPU interpreter computes bf16 on raw bits otherwise).

The pool holds the state in fp32, fp16 or bf16 (the engine's --state-dtype); the math is fp32 whatever
it holds: a program converts its tile to fp32 when it loads it, keeps it in fp32 registers for every
token of its row, and rounds it to the pool's dtype once, when it stores it. So a prefill of T tokens
rounds a reduced-precision state once, where T decode steps round it T times: with an fp16 state a
prompt read in one prefill lands closer to the fp32 result than the same tokens read one per step.
(Rounding is to nearest even on a GPU; Triton's CPU interpreter truncates fp32 to bf16.) With an fp32
pool the conversions are no-ops: the kernels are the fp32 ones, bit for bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Under the CPU interpreter (TRITON_INTERPRET=1, tests) a program costs far more than its work, so one
# program per (row, head) is fastest; on a GPU two blocks of value rows per head double the parallelism
# of small batches.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _wkv7_token(state, vec, i, j, r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, y_ptr):
    """One token's update of a [BV, N] fp32 state tile (rows i, columns j); stores y, returns the new tile.

    S = S diag(exp(w)) + (S a) b^T + v k^T, y = S r; the token's vectors start at `vec`, inputs any float."""
    r = tl.load(r_ptr + vec + j).to(tl.float32)
    decay = tl.exp(tl.load(w_ptr + vec + j).to(tl.float32))
    k = tl.load(k_ptr + vec + j).to(tl.float32)
    a = tl.load(a_ptr + vec + j).to(tl.float32)
    b = tl.load(b_ptr + vec + j).to(tl.float32)
    v = tl.load(v_ptr + vec + i).to(tl.float32)
    sa = tl.sum(state * a[None, :], axis=1)  # S @ a
    state = state * decay[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :]
    tl.store(y_ptr + vec + i, tl.sum(state * r[None, :], axis=1))
    return state


@triton.jit
def _wkv7_decode_kernel(
    s_ptr,  # [P, H, N, N] fp32/fp16/bf16 state pool of one layer (row i = value, column j = key), in place
    slots_ptr,  # [B] int64 slot of each row
    r_ptr,  # [B, H, N] receptance
    w_ptr,  # [B, H, N] log decay (< 0)
    k_ptr,  # [B, H, N] key
    v_ptr,  # [B, H, N] value
    a_ptr,  # [B, H, N] (-kk)
    b_ptr,  # [B, H, N] (kk * in-context learning rate)
    y_ptr,  # [B, H, N] out, fp32
    H: tl.constexpr,
    N: tl.constexpr,
    BV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    row = pid_bh // H
    head = pid_bh % H
    slot = tl.load(slots_ptr + row)
    j = tl.arange(0, N)  # key / column
    i = pid_v * BV + tl.arange(0, BV)  # value / row of the state
    tile = s_ptr + ((slot * H + head) * N + i[:, None]) * N + j[None, :]
    state = tl.load(tile).to(tl.float32)
    state = _wkv7_token(state, pid_bh * N, i, j, r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, y_ptr)
    tl.store(tile, state.to(s_ptr.dtype.element_ty))  # y was computed from the unrounded fp32 state


@triton.jit
def _wkv7_varlen_kernel(
    s_ptr,  # [P, H, N, N] fp32/fp16/bf16 state pool of one layer, updated in place (fp32 in between)
    slots_ptr,  # [B] int64 slot of each row
    cu_ptr,  # [B + 1] int64 packed start of each row (cu_seqlens)
    r_ptr,  # [T, H, N] packed tokens, row after row
    w_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    b_ptr,
    y_ptr,  # [T, H, N] out, fp32
    H: tl.constexpr,
    N: tl.constexpr,
    BV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    row = pid_bh // H
    head = pid_bh % H
    slot = tl.load(slots_ptr + row)
    bos = tl.load(cu_ptr + row)
    eos = tl.load(cu_ptr + row + 1)
    j = tl.arange(0, N)
    i = pid_v * BV + tl.arange(0, BV)
    tile = s_ptr + ((slot * H + head) * N + i[:, None]) * N + j[None, :]
    state = tl.load(tile).to(tl.float32)
    for t in range(bos, eos):
        state = _wkv7_token(state, (t * H + head) * N, i, j, r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, y_ptr)
    tl.store(tile, state.to(s_ptr.dtype.element_ty))  # rounded once, after the row's last token


def _block_v(n: int) -> int:
    return n if INTERPRETED else max(16, n // 2)


# What a state pool may hold; the math is fp32 for each.
POOL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(pool: torch.Tensor, slots: torch.Tensor, *vectors: torch.Tensor) -> tuple[int, int]:
    if pool.dtype not in POOL_DTYPES or not pool.is_contiguous() or pool.dim() != 4:
        raise ValueError(
            f"the state pool must be a contiguous fp32, fp16 or bf16 [P, H, N, N] tensor, got {pool.dtype} "
            f"{tuple(pool.shape)}"
        )
    _, H, N, _ = pool.shape
    if slots.dtype != torch.int64:
        raise ValueError("slots must be int64")
    for x in vectors:
        if x.dim() != 3 or x.shape[1:] != (H, N) or not x.is_contiguous():
            raise ValueError(f"inputs must be contiguous [rows, {H}, {N}], got {tuple(x.shape)}")
    return H, N


def wkv7_decode(
    pool: torch.Tensor,
    slots: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
) -> torch.Tensor:
    """One token for each of B rows, updating their states in the pool in place.

    Args:
        pool: [P, H, N, N] fp32, fp16 or bf16, one layer of the slot pool (fp32 math, rounded when stored).
        slots: [B] int64, the slot of each row (distinct).
        r, w, k, v, a, b: [B, H, N] (w is the log decay).
    Returns:
        y: [B, H, N] fp32.
    """
    H, N = _check(pool, slots, r, w, k, v, a, b)
    B = r.shape[0]
    y = torch.empty((B, H, N), device=r.device, dtype=torch.float32)
    bv = _block_v(N)
    _wkv7_decode_kernel[(B * H, N // bv)](pool, slots, r, w, k, v, a, b, y, H=H, N=N, BV=bv)
    return y


def wkv7_prefill(
    pool: torch.Tensor,
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
) -> torch.Tensor:
    """Packed rows of different lengths, each from and back to its slot's state.

    Args:
        pool: [P, H, N, N] fp32, fp16 or bf16, one layer of the slot pool (a row's state stays fp32 across
            its tokens and is rounded to the pool's dtype once, at the end).
        slots: [B] int64, the slot of each row (distinct).
        cu_seqlens: [B + 1] int64, row i is tokens cu_seqlens[i]:cu_seqlens[i + 1].
        r, w, k, v, a, b: [T, H, N] packed (w is the log decay).
    Returns:
        y: [T, H, N] fp32.
    """
    H, N = _check(pool, slots, r, w, k, v, a, b)
    B = slots.shape[0]
    y = torch.empty((r.shape[0], H, N), device=r.device, dtype=torch.float32)
    bv = _block_v(N)
    _wkv7_varlen_kernel[(B * H, N // bv)](pool, slots, cu_seqlens, r, w, k, v, a, b, y, H=H, N=N, BV=bv)
    return y
