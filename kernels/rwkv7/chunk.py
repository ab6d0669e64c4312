"""Chunked Triton WKV-7 prefill: packed rows of any lengths, states read from and written back to the slot pool.

Same contract as `wkv7_prefill` in fused_recurrent.py (its reference is `wkv7_varlen` in naive.py), for long
prompts: the recurrent kernel walks the tokens one by one (a chain of T dependent steps of N x N vector
work); this one walks chunks of C tokens, doing each chunk's work as a few small matrix products.

Math. Per head, with S the N x N state (row i = value, column j = key) and w the log decay (< 0):

    S_t = S_{t-1} (D_t + a_t b_t^T) + v_t k_t^T ,   D_t = diag(exp(w_t)) ,   y_t = S_t r_t .

Inside a chunk starting from state S_0, let g_t = w_1 + ... + w_t (cumulative log decay, per key column;
g_0 = 0) and u_t = S_{t-1} a_t (the "delta" read-out, a value-space vector). Unrolling the recurrence:

    S_t = S_0 diag(e^{g_t}) + sum_{s<=t} (u_s b_s^T + v_s k_s^T) diag(e^{g_t - g_s})

so every quantity is linear in S_0, the v's and the u's, and the u's themselves solve a triangular system:

    u_t = S_0 (a_t e^{g_{t-1}}) + sum_{s<t} u_s A_ab[t,s] + v_s A_ak[t,s]
    A_ab[t,s] = sum_j a_tj e^{g_{t-1,j} - g_{s,j}} b_sj ,   A_ak likewise with k_s   (s < t: strictly lower)

In matrix form, one chunk (C tokens as rows; S^T is held in registers as [N key, BV value]):

    U     = (I - A_ab)^{-1} ((a * e^{g_prev}) S_0^T + A_ak V)                          [C, BV]
    Y     = (r * e^{g}) S_0^T + A_rb U + A_rk V                                        [C, BV]
    S_C^T = diag(e^{g_C}) S_0^T + (b * e^{g_C - g})^T U + (k * e^{g_C - g})^T V         [N, BV]

with A_rb[t,s] = sum_j r_tj e^{g_tj - g_sj} b_sj for s <= t (A_rk likewise with k). (I - A_ab) is unit lower
triangular, A_ab nilpotent (A^C = 0), so its inverse is the finite Neumann series, computed as the product
(I + A)(I + A^2)(I + A^4)...(I + A^{C/2}): 2 log2(C) - 2 C x C products, no sequential substitution.
Programs are (row, head, block of BV value rows), as in the recurrent kernel: everything above is separable over the
value dimension, so each program needs only its BV value rows of the state (the C x C matrices are key-side
and are recomputed by each value block).

Why chunked this way, and stability. The state is touched once per chunk instead of once per token, and
all per-chunk work is C x N, C x C and N x BV products (tl.dot). Decays are kept relative to the chunk start
(e^{g}, e^{g_C - g}: exponents <= 0, never overflow). The intra-chunk pair terms e^{g_t - g_s} (s <= t) are
factored through a per-column reference point m = g_C / 2 in the middle of the chunk's decay range:
(x_t e^{g_t - m}) . (z_s e^{m - g_s}), so each factor is within e^{+-|g_C|/2} and the pair products are
plain matrix products; entries with s > t (whose factors' product may overflow) are discarded with
tl.where. This is exact in fp32 while C * max|w| / 2 stays well inside fp32's exponent range (e^{+-87}):
C * max|w| <= 150, i.e. |w| <= 9 at C = 16, 4.5 at C = 32, 2.3 at C = 64. RWKV-7's log decay is
-exp(-0.5) * sigmoid(.) in (-0.607, 0), far inside that at every supported chunk size.
Products are fp32 (`precision`: "ieee" by default, or "tf32x3"; never plain tf32), inputs any float dtype cast
right after loading (the CPU interpreter computes bf16 on raw bits otherwise). The pool may hold the state in
fp32, fp16 or bf16: it is converted to fp32 when loaded, stays fp32 across all of a row's chunks, and is rounded
to the pool's dtype once, when stored (as in fused_recurrent.py: one rounding per prefill, not per token).
Tail chunks are masked: loads past a row's end read w = 0 and zeros elsewhere, an identity step that adds
nothing, so the final state is exact; a row of 1 token costs one (mostly masked) chunk.

Cost. Per chunk a program does ~250k FMAs (C = 16, N = 64, BV = 32), about 40% of them the key-side C x C
matrices and their inverse, which the two value blocks of a head both compute. Compiled for sm_90 with
C = 16 it fits 8 warps (next to no register spills); C = 32 spills ~1 KB a thread and C = 64 ~25 KB: correct
but likely slower (bench/kernels.py measures all three). C = 64 also takes 208 KB of shared memory with fp16/bf16
inputs but 272 KB with fp32 ones (triton 3.6 and 3.9, sm_90): over the 227 KB a block may have on H100/H200, so
fp32 inputs at C = 64 do not launch (OutOfResources); C <= 32 fits with any input dtype (at most 120 KB).
A further step, not taken here, is fla's split: the key-side work of all chunks in a parallel kernel (the WY form
W = (I - A_ab)^{-1} (a e^{g_prev}) and friends, kept in HBM), leaving the sequential kernel two C x N x BV and
two N x C x BV products per chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_recurrent import INTERPRETED, _check

# Default tokens per chunk: the smallest size tl.dot takes on a GPU, and the widest decay range (|w| <= 9).
CHUNK_SIZE = 16
# Operand precision of the fp32 products on GPUs with tensor cores: "ieee" (fp32 FMAs on the CUDA cores) or
# "tf32x3" (three tf32 tensor-core products, ~fp32 accuracy). Plain "tf32" (10-bit mantissas) is refused: it
# would round the state itself. The interpreter computes every product in fp32 whatever this says.
DOT_PRECISION = "ieee"
PRECISIONS = ("ieee", "tf32x3")
# Warps per program. Compiled for sm_90 (C = 16, BV = 32, ieee), 4 warps need more than 255 registers a
# thread and spill; 8 warps fit: 234 registers and no spills with fp16 inputs (fp32 inputs: 64 bytes).
NUM_WARPS = 8


@triton.jit
def _wkv7_chunk_kernel(
    s_ptr,  # [P, H, N, N] fp32/fp16/bf16 state pool of one layer (row i = value, column j = key), in place
    slots_ptr,  # [B] int64 slot of each row
    cu_ptr,  # [B + 1] int64 packed start of each row (cu_seqlens)
    r_ptr,  # [T, H, N] packed tokens, row after row: receptance
    w_ptr,  # log decay (< 0)
    k_ptr,  # key
    v_ptr,  # value
    a_ptr,  # (-kk)
    b_ptr,  # (kk * in-context learning rate)
    y_ptr,  # [T, H, N] out, fp32
    H: tl.constexpr,
    N: tl.constexpr,
    BV: tl.constexpr,  # value rows of the state per program
    C: tl.constexpr,  # tokens per chunk (a power of two >= 16)
    LOG2C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_v = tl.program_id(1)
    row = pid_bh // H
    head = pid_bh % H
    slot = tl.load(slots_ptr + row)
    bos = tl.load(cu_ptr + row)
    eos = tl.load(cu_ptr + row + 1)
    c = tl.arange(0, C)  # position in the chunk
    j = tl.arange(0, N)  # key / column of the state
    i = pid_v * BV + tl.arange(0, BV)  # value / row of the state
    strict = c[:, None] > c[None, :]  # [C, C] s < t
    causal = c[:, None] >= c[None, :]  # [C, C] s <= t
    eye = tl.where(c[:, None] == c[None, :], 1.0, 0.0)  # [C, C]
    # S^T: [N key, BV value], the transposed tile of this program's value rows.
    tile = s_ptr + ((slot * H + head) * N + i[None, :]) * N + j[:, None]
    st = tl.load(tile).to(tl.float32)
    for t0 in range(bos, eos, C):
        tok = t0 + c  # [C] packed token index
        live = (tok < eos)[:, None]  # [C, 1]
        key_at = (tok[:, None] * H + head) * N + j[None, :]  # [C, N]
        val_at = (tok[:, None] * H + head) * N + i[None, :]  # [C, BV]
        r = tl.load(r_ptr + key_at, mask=live, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + key_at, mask=live, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + key_at, mask=live, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + key_at, mask=live, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + key_at, mask=live, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + val_at, mask=live, other=0.0).to(tl.float32)  # [C, BV]

        g = tl.cumsum(w, axis=0)  # [C, N] log decay from the chunk start through token t
        g_prev = g - w  # ... through token t - 1
        g_end = tl.sum(w, axis=0)  # [N] through the chunk's last token
        mid = 0.5 * g_end[None, :]  # [1, N] reference point of the pair factors

        # Pair interactions, factored through the reference point; only s < t (s <= t) entries are kept.
        a_in = a * tl.exp(g_prev - mid)  # [C, N] a_t e^{g_{t-1} - m}
        r_in = r * tl.exp(g - mid)  # r_t e^{g_t - m}
        from_mid = tl.exp(mid - g)  # e^{m - g_s}
        b_out = b * from_mid
        k_out = k * from_mid
        half = tl.exp(mid)  # [1, N] e^{m} = e^{g_C - m}: moves the factors to the chunk's start and end
        a_ab = tl.where(strict, tl.dot(a_in, tl.trans(b_out), input_precision=PRECISION), 0.0)  # [C, C]
        a_ak = tl.where(strict, tl.dot(a_in, tl.trans(k_out), input_precision=PRECISION), 0.0)
        a_rb = tl.where(causal, tl.dot(r_in, tl.trans(b_out), input_precision=PRECISION), 0.0)
        a_rk = tl.where(causal, tl.dot(r_in, tl.trans(k_out), input_precision=PRECISION), 0.0)

        # (I - A_ab)^{-1} = (I + A)(I + A^2)...(I + A^{C/2}), A nilpotent.
        inv = eye + a_ab
        power = a_ab
        for _ in tl.static_range(LOG2C - 1):
            power = tl.dot(power, power, input_precision=PRECISION)
            inv = inv + tl.dot(inv, power, input_precision=PRECISION)

        # u_t = S_{t-1} a_t for the chunk's tokens, then the outputs and the state at the chunk's end.
        rhs = tl.dot(a_in * half, st, input_precision=PRECISION)  # [C, BV] (a e^{g_prev}) S_0^T
        rhs += tl.dot(a_ak, v, input_precision=PRECISION)
        u = tl.dot(inv, rhs, input_precision=PRECISION)  # [C, BV]
        y = tl.dot(r_in * half, st, input_precision=PRECISION)  # (r e^{g}) S_0^T
        y += tl.dot(a_rb, u, input_precision=PRECISION)
        y += tl.dot(a_rk, v, input_precision=PRECISION)
        tl.store(y_ptr + val_at, y, mask=live)

        # b_s e^{g_C - g_s} = b_out * e^{g_C - m}; likewise k.
        st = st * tl.exp(g_end)[:, None]
        st += tl.dot(tl.trans(b_out * half), u, input_precision=PRECISION)  # [N, BV]
        st += tl.dot(tl.trans(k_out * half), v, input_precision=PRECISION)
    tl.store(tile, st.to(s_ptr.dtype.element_ty))  # rounded once, after the row's last chunk


def wkv7_chunk_prefill(
    pool: torch.Tensor,
    slots: torch.Tensor,
    cu_seqlens: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    chunk_size: int = CHUNK_SIZE,
    precision: str = DOT_PRECISION,
) -> torch.Tensor:
    """Packed rows of different lengths, each from and back to its slot's state, chunk by chunk.

    Args:
        pool: [P, H, N, N] fp32, fp16 or bf16, one layer of the slot pool (fp32 math; rounded to the pool's
            dtype once per row, when stored).
        slots: [B] int64, the slot of each row (distinct).
        cu_seqlens: [B + 1] int64, row i is tokens cu_seqlens[i]:cu_seqlens[i + 1] (each row >= 1 token).
        r, w, k, v, a, b: [T, H, N] packed (w is the log decay; exact while chunk_size * max|w| <= 150).
        chunk_size: tokens per chunk, a power of two >= 16.
        precision: operand precision of the fp32 products on a GPU, one of PRECISIONS.
    Returns:
        y: [T, H, N] fp32.
    """
    H, N = _check(pool, slots, r, w, k, v, a, b)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if N < 16 or N & (N - 1):
        raise ValueError(f"the head size must be a power of two >= 16, got {N}")
    B = slots.shape[0]
    y = torch.empty((r.shape[0], H, N), device=r.device, dtype=torch.float32)
    # One program per (row, head) under the interpreter (programs are what cost there); on a GPU two value
    # blocks per head, as in the recurrent kernel.
    bv = N if INTERPRETED else max(16, N // 2)
    _wkv7_chunk_kernel[(B * H, N // bv)](
        pool,
        slots,
        cu_seqlens,
        r,
        w,
        k,
        v,
        a,
        b,
        y,
        H=H,
        N=N,
        BV=bv,
        C=chunk_size,
        LOG2C=chunk_size.bit_length() - 1,
        PRECISION=precision,
        num_warps=NUM_WARPS,
    )
    return y
