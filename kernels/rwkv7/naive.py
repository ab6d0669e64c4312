"""Plain-torch WKV-7 recurrence: the specification every WKV kernel is tested against.

It is also what the torch backend runs. State layout is BlinkDL's: S[h] is N x N with row i the value
dimension and column j the key dimension; `w` is the log decay (fla's convention, w < 0).

Per token and head:  S <- S * exp(w)[None, :] + (S @ a) b^T + v k^T ;  y = S @ r
(RWKV-7 passes a = -kk and b = kk * iclr.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
