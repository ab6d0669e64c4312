"""Plain-torch WKV-7 recurrence: the specification every WKV kernel is tested against.

It is also what the torch backend runs. State layout is BlinkDL's: S[h] is N x N with row i the value
dimension and column j the key dimension; `w` is the log decay (fla's convention, w < 0).

Per token and head:  S <- S * exp(w)[None, :] + (S @ a) b^T + v k^T ;  y = S @ r
(RWKV-7 passes a = -kk and b = kk * iclr.)

Below the recurrence: the elementwise stages of a layer around it (token shift and mixes, the WKV
inputs, the WKV output), as the torch backend runs them; kernels/rwkv7/fused_layer.py fuses each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# exp(-0.5): log decay = -exp(-0.5) * sigmoid(w0 + lora), so decay = exp(log decay) lies in (0.545, 1).
DECAY_SCALE = math.exp(-0.5)


def wkv7_step(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
) -> torch.Tensor:
    """One token for a batch of rows, updating `state` in place.

    Args:
        state: [B, H, N, N] fp32, updated in place.
        r, w, k, v, a, b: [B, H, N], any float dtype (computed in fp32).
    Returns:
        y: [B, H, N] fp32.
    """
    r, w, k, v, a, b = (t.float() for t in (r, w, k, v, a, b))
    sa = torch.matmul(state, a.unsqueeze(-1))  # [B, H, N, 1]
    state.mul_(torch.exp(w).unsqueeze(-2))
    state.add_(sa * b.unsqueeze(-2))
    state.add_(v.unsqueeze(-1) * k.unsqueeze(-2))
    return torch.matmul(state, r.unsqueeze(-1)).squeeze(-1)


def wkv7_varlen(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
    lengths: Sequence[int],
) -> torch.Tensor:
    """Packed variable-length rows, each from its own initial state (updated in place to its final state).

    Args:
        r, w, k, v, a, b: [T, H, N] packed row after row; row i has lengths[i] tokens, sum = T.
        state: [B, H, N, N] fp32, B = len(lengths); row i's initial state, overwritten with its final one.
        lengths: tokens per row, each >= 1.
    Returns:
        y: [T, H, N] fp32.
    """
    T, H, N = r.shape
    B = len(lengths)
    if B == T:  # every row has one token: a decode step
        return wkv7_step(state, r, w, k, v, a, b)
    # Rows sorted by length, longest first: at time t the rows still running are a prefix of that order,
    # so each time step works on a contiguous slice.
    order = sorted(range(B), key=lambda i: -lengths[i])
    starts = [0] * B
    acc = 0
    for i, n in enumerate(lengths):
        starts[i] = acc
        acc += n
    t_max = lengths[order[0]]
    # pad_index[j, t] = packed index of row order[j]'s token t, or T (a zero pad row) past its end.
    pad_index = torch.full((B, t_max), T, dtype=torch.long)
    for j, i in enumerate(order):
        pad_index[j, : lengths[i]] = torch.arange(starts[i], starts[i] + lengths[i])
    pad_index = pad_index.to(r.device)
    packed = torch.stack([t.float() for t in (r, w, k, v, a, b)], dim=1)  # [T, 6, H, N]
    packed = torch.cat([packed, packed.new_zeros(1, 6, H, N)])
    padded = packed[pad_index]  # [B, t_max, 6, H, N]
    order_t = torch.tensor(order, device=state.device)
    s = state[order_t]  # [B, H, N, N] in length order
    y_pad = padded.new_zeros(B, t_max, H, N)
    sorted_lengths = [lengths[i] for i in order]
    active = B
    for t in range(t_max):
        while sorted_lengths[active - 1] <= t:
            active -= 1
        x = padded[:active, t]
        y_pad[:active, t] = wkv7_step(s[:active], x[:, 0], x[:, 1], x[:, 2], x[:, 3], x[:, 4], x[:, 5])
    state[order_t] = s
    y = r.new_empty((T + 1, H, N), dtype=torch.float32)
    y[pad_index.reshape(-1)] = y_pad.reshape(-1, H, N)
    return y[:T]


def layer_norm_shift_mix(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mix: torch.Tensor,
    store: torch.Tensor,
    slots: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """LayerNorm, token shift through the slots' shift states, and the token-shift mixes of one block.

    xa = LN(x); prev = the previous token's xa in its row (the slot's stored xa for a row's first
    token); out[m] = xa + (prev - xa) * mix[m]. Each row's last xa is stored back to its slot.

    Args:
        x: [T, C] packed rows.
        weight, bias: [C] LayerNorm affine.
        mix: [M, C] mix coefficients (6 for the time mix, 1 for the channel mix).
        store: [P, C] shift state of this layer, by slot; rows' slots updated in place.
        slots, starts, ends: [B] int64 slot, first and last packed index of each row.
    Returns:
        [M, T, C], dtype of x.
    """
    xa = F.layer_norm(x, (x.shape[1],), weight, bias, eps=eps)
    from_state = store.index_select(0, slots)  # [B, C]
    if slots.shape[0] == x.shape[0]:  # decode: every row is one token
        prev = from_state
    else:
        prev = torch.empty_like(xa)
        prev[1:] = xa[:-1]
        prev[starts] = from_state
    store.index_copy_(0, slots, xa.index_select(0, ends))
    return torch.addcmul(xa.unsqueeze(0), (prev - xa).unsqueeze(0), mix.unsqueeze(1))


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

    Args:
        k, v: [T, C] key and value projections.
        v_first: [T, C] layer 0's value (ignored when v_lora is None, i.e. in layer 0).
        w_lora, a_lora, v_lora: [T, C] LoRA outputs (tanh(xw@w1)@w2, (xa@a1)@a2, (xv@v1)@v2).
        w0: [C] fp32; a0, v0, k_k, k_a: [C].
    Returns:
        w [T, C] fp32 log decay, then k (updated), v (value residual applied), a = -kk, b = kk * iclr,
        [T, C] in the dtype of k.
    """
    T, C = k.shape
    w = -DECAY_SCALE * torch.sigmoid(w0 + w_lora.float())
    iclr = torch.sigmoid(a0 + a_lora)  # in-context learning rate
    kk = F.normalize((k * k_k).view(T, heads, C // heads), dim=-1, p=2.0, eps=1e-12).view(T, C)
    k = k * (1 + (iclr - 1) * k_a)
    if v_lora is not None:
        assert v0 is not None
        v = v + (v_first - v) * torch.sigmoid(v0 + v_lora)
    return w, k, v, -kk, kk * iclr


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
    """The input of the output projection: (GroupNorm(y) + bonus) * g, per head.

    Args:
        y: [T, H, N] fp32 WKV output.
        lnx_w, lnx_b: [C] fp32 GroupNorm affine (H groups).
        r, k, v: [T, C] (k updated, v after the value residual, as the recurrence saw them).
        r_k: [H, N] bonus weight.
        g: [T, C] output gate.
    Returns:
        [T, C], dtype of r.
    """
    T, H, N = y.shape
    out = F.group_norm(y.view(T, H * N), H, lnx_w, lnx_b, eps=eps).to(r.dtype)
    bonus = (r.view(T, H, N) * k.view(T, H, N) * r_k).sum(-1, keepdim=True) * v.view(T, H, N)  # [T, H, N]
    return (out + bonus.view(T, H * N)) * g


def relu_square(x: torch.Tensor) -> torch.Tensor:
    """The channel mix's activation: relu(x)^2."""
    return torch.relu(x).square()
