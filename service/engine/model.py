"""The torch backend: RWKV-7 (x070) forward over packed variable-length rows, exactly as the reference.

Math per token is BlinkDL's (see kernels/rwkv7/naive.py for the WKV recurrence). Weights are prepared
once at load (squeezed, ln0 folded into the embedding, cast to the compute dtype); the decay, the WKV
state and the output GroupNorm are computed in fp32 whatever the weight dtype. Runs on CPU or GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.rwkv7 import wkv7_step, wkv7_varlen

from .backend import StepBatch
from .checkpoint import Checkpoint, ModelShape
from .progress import Progress
from .state_pool import StatePool

LN_EPS = 1e-5
# exp(-0.5): log decay = -exp(-0.5) * sigmoid(w0 + lora), so decay = exp(log decay) lies in (0.545, 1).
DECAY_SCALE = math.exp(-0.5)


@dataclass(frozen=True)
class _Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    mix: torch.Tensor  # [6, C]: x_r, x_w, x_k, x_v, x_a, x_g
    w0: torch.Tensor  # [C] fp32
    w1: torch.Tensor  # [C, Dw]
    w2: torch.Tensor  # [Dw, C]
    a0: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    g1: torch.Tensor
    g2: torch.Tensor
    v0: torch.Tensor | None
    v1: torch.Tensor | None
    v2: torch.Tensor | None
    k_k: torch.Tensor
    k_a: torch.Tensor
    r_k: torch.Tensor  # [H, N]
    w_r: torch.Tensor  # [C, C] nn.Linear layout [out, in]
    w_k: torch.Tensor
    w_v: torch.Tensor
    w_o: torch.Tensor
    lnx_w: torch.Tensor  # fp32
    lnx_b: torch.Tensor  # fp32
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    ffn_x_k: torch.Tensor
    ffn_key: torch.Tensor  # [F, C]
    ffn_value: torch.Tensor  # [C, F]


class TorchRwkv7:
    name = "torch"

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        self.shape: ModelShape = checkpoint.shape
        self.device = device
        self.dtype = dtype
        t = checkpoint.tensors
        C = self.shape.n_embd
        # Lazily loaded (mmap) files are read here, as tensors reach the device: the slow part of a load.
        progress = Progress("loading weights", len(t))

        def w(key: str, *, fp32: bool = False) -> torch.Tensor:
            progress.advance(1, t[key].nbytes)
            return t[key].squeeze().to(device=device, dtype=torch.float32 if fp32 else dtype).contiguous()

        progress.advance(1, t["emb.weight"].nbytes)
        emb = t["emb.weight"].to(device=device, dtype=torch.float32)
        ln0_w, ln0_b = w("blocks.0.ln0.weight", fp32=True), w("blocks.0.ln0.bias", fp32=True)
        self.emb = F.layer_norm(emb, (C,), ln0_w, ln0_b, eps=LN_EPS).to(dtype).contiguous()  # [V, C]
        self.layers: list[_Layer] = []
        for i in range(self.shape.n_layer):
            p, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
            has_v = i > 0
            self.layers.append(
                _Layer(
                    ln1_w=w(p + "ln1.weight"),
                    ln1_b=w(p + "ln1.bias"),
                    mix=torch.stack([w(a + n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]),
                    w0=w(a + "w0", fp32=True),
                    w1=w(a + "w1"),
                    w2=w(a + "w2"),
                    a0=w(a + "a0"),
                    a1=w(a + "a1"),
                    a2=w(a + "a2"),
                    g1=w(a + "g1"),
                    g2=w(a + "g2"),
                    v0=w(a + "v0") if has_v else None,
                    v1=w(a + "v1") if has_v else None,
                    v2=w(a + "v2") if has_v else None,
                    k_k=w(a + "k_k"),
                    k_a=w(a + "k_a"),
                    r_k=w(a + "r_k").view(self.shape.n_head, self.shape.head_size),
                    w_r=w(a + "receptance.weight"),
                    w_k=w(a + "key.weight"),
                    w_v=w(a + "value.weight"),
                    w_o=w(a + "output.weight"),
                    lnx_w=w(a + "ln_x.weight", fp32=True),
                    lnx_b=w(a + "ln_x.bias", fp32=True),
                    ln2_w=w(p + "ln2.weight"),
                    ln2_b=w(p + "ln2.bias"),
                    ffn_x_k=w(f + "x_k"),
                    ffn_key=w(f + "key.weight"),
                    ffn_value=w(f + "value.weight"),
                )
            )
        self.ln_out_w = w("ln_out.weight")
        self.ln_out_b = w("ln_out.bias")
        self.head = w("head.weight")  # [V, C]
        progress.close()

    @torch.inference_mode()
    def forward(self, batch: StepBatch, pool: StatePool) -> torch.Tensor:
        C, H, N = self.shape.n_embd, self.shape.n_head, self.shape.head_size
        x = self.emb[batch.tokens]  # [T, C]
        T = x.shape[0]
        v_first = x  # replaced by layer 0's v before use
        for i, ly in enumerate(self.layers):
            xa = F.layer_norm(x, (C,), ly.ln1_w, ly.ln1_b, eps=LN_EPS)
            dx = _token_shift(xa, pool.att_x[i], batch) - xa
            xr, xw, xk, xv, xia, xg = torch.addcmul(xa.unsqueeze(0), dx.unsqueeze(0), ly.mix.unsqueeze(1))  # 6 x [T, C]
            r = F.linear(xr, ly.w_r)
            k = F.linear(xk, ly.w_k)
            v = F.linear(xv, ly.w_v)
            log_decay = -DECAY_SCALE * torch.sigmoid(ly.w0 + (torch.tanh(xw @ ly.w1) @ ly.w2).float())  # [T, C] fp32
            iclr = torch.sigmoid(ly.a0 + (xia @ ly.a1) @ ly.a2)  # in-context learning rate
            g = torch.sigmoid(xg @ ly.g1) @ ly.g2
            kk = F.normalize((k * ly.k_k).view(T, H, N), dim=-1, p=2.0, eps=1e-12)
            k = k * (1 + (iclr - 1) * ly.k_a)
            if ly.v0 is None:
                v_first = v
            else:
                assert ly.v1 is not None
                assert ly.v2 is not None
                v = v + (v_first - v) * torch.sigmoid(ly.v0 + (xv @ ly.v1) @ ly.v2)
            r3, k3, v3 = r.view(T, H, N), k.view(T, H, N), v.view(T, H, N)
            iclr3 = iclr.view(T, H, N)
            y = self._wkv(pool.wkv[i], batch, r3, log_decay.view(T, H, N), k3, v3, -kk, kk * iclr3)  # [T, H, N] fp32
            y = F.group_norm(y.view(T, C), H, ly.lnx_w, ly.lnx_b, eps=N * 1e-5).to(self.dtype)
            bonus = (r3 * k3 * ly.r_k).sum(-1, keepdim=True) * v3  # [T, H, N]
            x = x + F.linear((y + bonus.view(T, C)) * g, ly.w_o)

            xf = F.layer_norm(x, (C,), ly.ln2_w, ly.ln2_b, eps=LN_EPS)
            xk_f = torch.addcmul(xf, _token_shift(xf, pool.ffn_x[i], batch) - xf, ly.ffn_x_k)
            x = x + F.linear(torch.relu(F.linear(xk_f, ly.ffn_key)).square(), ly.ffn_value)
        if batch.logit_rows.numel() == 0:
            return x.new_empty((0, self.shape.vocab_size), dtype=torch.float32)
        last = x.index_select(0, batch.ends.index_select(0, batch.logit_rows))  # [R, C]
        last = F.layer_norm(last, (C,), self.ln_out_w, self.ln_out_b, eps=LN_EPS)
        return F.linear(last, self.head).float()  # [R, V]

    def _wkv(
        self,
        store: torch.Tensor,
        batch: StepBatch,
        r: torch.Tensor,
        w: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
    ) -> torch.Tensor:
        """WKV over the step's rows (the reference recurrence): gathers their states from `store`
        [P, H, N, N], runs, writes them back. Kernel backends override this with in-place kernels."""
        state = store.index_select(0, batch.slots)  # [B, H, N, N]
        if batch.is_decode:
            y = wkv7_step(state, r, w, k, v, a, b)
        else:
            y = wkv7_varlen(r, w, k, v, a, b, state, batch.lengths)
        store.index_copy_(0, batch.slots, state)
        return y


def _token_shift(x: torch.Tensor, store: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    """The previous token's x for every packed token, taking row starts from `store` [P, C]; stores row ends."""
    from_state = store.index_select(0, batch.slots)  # [B, C]
    if batch.is_decode:
        prev = from_state
    else:
        prev = torch.empty_like(x)
        prev[1:] = x[:-1]
        prev[batch.starts] = from_state
    store.index_copy_(0, batch.slots, x.index_select(0, batch.ends))
    return prev
