"""The triton backend: the torch model with the WKV recurrence and the elementwise stages in Triton kernels.

Same weights preparation, same math, same state pool as the torch backend (so results match it
within fp tolerance). The WKV kernels read and write each row's state in the slot pool by slot index
instead of gathering the batch's states into a copy and scattering them back; around them, the
elementwise work of a layer runs as a few fused kernels (kernels/rwkv7/fused_layer.py) between the
matrix products, which stay on cuBLAS: r, k and v as one batched product, the residual adds folded
into the output products (addmm). Selected automatically on CUDA; on a CPU only under TRITON_INTERPRET=1
(the tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.rwkv7.chunk import wkv7_chunk_prefill
from kernels.rwkv7.fused_layer import layer_norm_shift_mix, relu_square_, wkv_inputs, wkv_output
from kernels.rwkv7.fused_recurrent import wkv7_decode, wkv7_prefill

from .backend import StepBatch
from .checkpoint import Checkpoint
from .model import LN_EPS, TorchRwkv7, _Layer
from .state_pool import StatePool

# Prefill steps whose longest row has at least this many tokens run the chunked WKV kernel (C x C matrix
# products per 16 tokens); shorter ones the recurrent kernel, cheaper when a row is a few chunks at most.
CHUNK_PREFILL_MIN_TOKENS = 64


# The time mix's six mixes in the order the kernel writes them: r, k, v, then w, a, g. r, k, v are then
# one [3, T, C] slice for the batched projection, and v, w, a, g the LoRA inputs.
_MIX_ORDER = (0, 2, 3, 1, 4, 5)  # of the checkpoint's x_r, x_w, x_k, x_v, x_a, x_g


@dataclass(frozen=True)
class _Fused:
    """A layer's weights rearranged for the fused path."""

    mix: torch.Tensor  # [6, C]: x_r, x_k, x_v, x_w, x_a, x_g
    w_rkv: torch.Tensor  # [3, C, C]: receptance, key, value (nn.Linear layout; the layer's w_r, w_k, w_v view it)


class TritonRwkv7(TorchRwkv7):
    name = "triton"

    def __init__(self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(checkpoint, device, dtype)
        self._fused: list[_Fused] = []
        for i, ly in enumerate(self.layers):
            w_rkv = torch.stack([ly.w_r, ly.w_k, ly.w_v])
            # The layer's own weights become views of the stack: the weights are held once.
            self.layers[i] = dataclasses.replace(ly, w_r=w_rkv[0], w_k=w_rkv[1], w_v=w_rkv[2])
            self._fused.append(_Fused(mix=ly.mix[list(_MIX_ORDER)].contiguous(), w_rkv=w_rkv))

    def forward(self, batch: StepBatch, pool: StatePool) -> torch.Tensor:
        if self.device.type != "cuda":
            return super().forward(batch, pool)
        # Triton launches on the current CUDA device (torch.cuda.current_device()) and its stream, not on the
        # device of its arguments: without this guard a model on cuda:1 would run its kernels in device 0's
        # context on device 1's memory. A no-op when the device is already current (or has no index).
        with torch.cuda.device(self.device):
            return super().forward(batch, pool)

    def _time_mix(
        self, i: int, ly: _Layer, x: torch.Tensor, v_first: torch.Tensor, batch: StepBatch, pool: StatePool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, C] -> x + attention output, in place; also returns v_first (layer 0's v, [T, C])."""
        T = x.shape[0]
        H, N = self.shape.n_head, self.shape.head_size
        fused = self._fused[i]
        mixed = layer_norm_shift_mix(  # [6, T, C]: xr, xk, xv, xw, xa, xg
            x, ly.ln1_w, ly.ln1_b, fused.mix, pool.att_x[i], batch.slots, batch.cu_seqlens, eps=LN_EPS
        )
        r, k, v = torch.bmm(mixed[:3], fused.w_rkv.transpose(1, 2))  # one launch for the three projections
        xv, xw, xia, xg = mixed[2:]
        # The LoRAs' inner activations sit between two small products: in place, one launch each.
        w_lora = torch.tanh_(xw @ ly.w1) @ ly.w2
        a_lora = (xia @ ly.a1) @ ly.a2
        g = torch.sigmoid_(xg @ ly.g1) @ ly.g2
        v_lora = None if ly.v1 is None or ly.v2 is None else (xv @ ly.v1) @ ly.v2
        if v_lora is None:
            v_first = v
        w, k, v, a, b = wkv_inputs(k, v, v_first, w_lora, a_lora, v_lora, ly.w0, ly.a0, ly.v0, ly.k_k, ly.k_a, H)
        y = self._wkv(pool.wkv[i], batch, *(t.view(T, H, N) for t in (r, w, k, v, a, b)))  # [T, H, N] fp32
        out = wkv_output(y, ly.lnx_w, ly.lnx_b, r, k, v, ly.r_k, g, eps=N * 1e-5)
        return x.addmm_(out, ly.w_o.t()), v_first  # the residual add is cuBLAS's beta = 1

    def _channel_mix(self, i: int, ly: _Layer, x: torch.Tensor, batch: StepBatch, pool: StatePool) -> torch.Tensor:
        """x [T, C] -> x + FFN output, in place."""
        (xk,) = layer_norm_shift_mix(
            x, ly.ln2_w, ly.ln2_b, ly.ffn_x_k.unsqueeze(0), pool.ffn_x[i], batch.slots, batch.cu_seqlens, eps=LN_EPS
        )
        return x.addmm_(relu_square_(F.linear(xk, ly.ffn_key)), ly.ffn_value.t())

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
        if batch.is_decode:
            return wkv7_decode(store, batch.slots, r, w, k, v, a, b)
        if max(batch.lengths) >= CHUNK_PREFILL_MIN_TOKENS:
            return wkv7_chunk_prefill(store, batch.slots, batch.cu_seqlens, r, w, k, v, a, b)
        return wkv7_prefill(store, batch.slots, batch.cu_seqlens, r, w, k, v, a, b)
