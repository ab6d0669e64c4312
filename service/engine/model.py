"""The torch backend: RWKV-7 (x070) forward over packed variable-length rows, exactly as the reference.

Math per token is BlinkDL's (kernels/rwkv7/naive.py holds the WKV recurrence and the elementwise
stages of a layer). Weights are prepared once at load (squeezed, ln0 folded into the embedding, cast
to the compute dtype); the decay, the WKV state and the output GroupNorm are computed in fp32 whatever
the weight dtype (and whatever dtype the pool stores the WKV state in). Runs on CPU or GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.rwkv7 import wkv7_step, wkv7_varlen
from kernels.rwkv7.naive import layer_norm_shift_mix, relu_square, wkv_inputs, wkv_output

from .backend import StepBatch
from .checkpoint import Checkpoint, ModelShape
from .progress import Progress
from .state_pool import StatePool

LN_EPS = 1e-5


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
        x = self.emb[batch.tokens]  # [T, C]
        v_first = x  # replaced by layer 0's v before use
        for i, ly in enumerate(self.layers):
            x, v_first = self._time_mix(i, ly, x, v_first, batch, pool)
            x = self._channel_mix(i, ly, x, batch, pool)
        if batch.logit_rows.numel() == 0:
            return x.new_empty((0, self.shape.vocab_size), dtype=torch.float32)
        last = x.index_select(0, batch.ends.index_select(0, batch.logit_rows))  # [R, C]
        last = F.layer_norm(last, (self.shape.n_embd,), self.ln_out_w, self.ln_out_b, eps=LN_EPS)
        return F.linear(last, self.head).float()  # [R, V]

    # The stages of a layer below are the plain-torch references (kernels/rwkv7/naive.py) around the matrix
    # products; the triton backend overrides them with fused kernels around the same products.

    def _time_mix(
        self, i: int, ly: _Layer, x: torch.Tensor, v_first: torch.Tensor, batch: StepBatch, pool: StatePool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, C] -> x + attention output; also returns v_first (layer 0's v, [T, C])."""
        T = x.shape[0]
        H, N = self.shape.n_head, self.shape.head_size
        mixed = layer_norm_shift_mix(
            x, ly.ln1_w, ly.ln1_b, ly.mix, pool.att_x[i], batch.slots, batch.starts, batch.ends, eps=LN_EPS
        )
        xr, xw, xk, xv, xia, xg = mixed  # 6 x [T, C]
        r = F.linear(xr, ly.w_r)
        k = F.linear(xk, ly.w_k)
        v = F.linear(xv, ly.w_v)
        w_lora = torch.tanh(xw @ ly.w1) @ ly.w2
        a_lora = (xia @ ly.a1) @ ly.a2
        g = torch.sigmoid(xg @ ly.g1) @ ly.g2
        v_lora = None if ly.v1 is None or ly.v2 is None else (xv @ ly.v1) @ ly.v2
        if v_lora is None:
            v_first = v
        w, k, v, a, b = wkv_inputs(k, v, v_first, w_lora, a_lora, v_lora, ly.w0, ly.a0, ly.v0, ly.k_k, ly.k_a, H)
        y = self._wkv(pool.wkv[i], batch, *(t.view(T, H, N) for t in (r, w, k, v, a, b)))  # [T, H, N] fp32
        return x + F.linear(wkv_output(y, ly.lnx_w, ly.lnx_b, r, k, v, ly.r_k, g, eps=N * 1e-5), ly.w_o), v_first

    def _channel_mix(self, i: int, ly: _Layer, x: torch.Tensor, batch: StepBatch, pool: StatePool) -> torch.Tensor:
        """x [T, C] -> x + FFN output."""
        ffn_mix = ly.ffn_x_k.unsqueeze(0)  # [1, C]
        (xk,) = layer_norm_shift_mix(
            x, ly.ln2_w, ly.ln2_b, ffn_mix, pool.ffn_x[i], batch.slots, batch.starts, batch.ends, eps=LN_EPS
        )
        return x + F.linear(relu_square(F.linear(xk, ly.ffn_key)), ly.ffn_value)

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
        [P, H, N, N], runs, writes them back. Kernel backends override this with in-place kernels.

        A store of fp16/bf16 (--state-dtype) is gathered, converted to fp32, run in fp32 over all of a
        row's tokens and rounded back once when written: where the kernels round it too."""
        state = store.index_select(0, batch.slots)  # [B, H, N, N]
        if state.dtype != torch.float32:
            state = state.float()
        if batch.is_decode:
            y = wkv7_step(state, r, w, k, v, a, b)
        else:
            y = wkv7_varlen(r, w, k, v, a, b, state, batch.lengths)
        store.index_copy_(0, batch.slots, state.to(store.dtype))  # no copy when the store is fp32
        return y
