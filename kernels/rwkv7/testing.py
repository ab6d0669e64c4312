"""Random WKV-7 inputs shaped and ranged as the model makes them, for kernel tests and benchmarks."""

from __future__ import annotations

import math

import torch

# RWKV-7's log decay is -exp(-0.5) * sigmoid(.): it lies in (-0.607, 0).
MODEL_W_MIN = -math.exp(-0.5)


def wkv_inputs(
    rows: int,
    heads: int,
    head_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    w_min: float = MODEL_W_MIN,
    w_spread: float = 2.0,
) -> list[torch.Tensor]:
    """r, w (log decay in (w_min, 0)), k, v, a = -kk, b = kk * lr: each [rows, heads, head_size], contiguous.

    `w_spread` scales the logits of the decay's sigmoid: larger reaches both ends of (w_min, 0) more often.
    Rounded to `dtype` once, so a kernel and its reference see the same values.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (rows, heads, head_size)

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device)

    r = randn()
    w = w_min * torch.sigmoid(randn() * w_spread)
    k = randn() * 0.5
    v = randn()
    kk = torch.nn.functional.normalize(randn(), dim=-1)
    lr = torch.sigmoid(randn())
    return [t.to(dtype).contiguous() for t in (r, w, k, v, -kk, kk * lr)]
