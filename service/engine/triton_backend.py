"""The triton backend: the torch model with the WKV recurrence replaced by the in-place Triton kernels.

Same weights preparation, same math, same state pool as the torch backend (so results match it
within fp tolerance); only the WKV step differs: the kernels read and write each row's state in
the slot pool by slot index instead of gathering the batch's states into a copy and scattering
them back. Selected automatically on CUDA; on a CPU only under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import torch

from kernels.rwkv7.fused_recurrent import wkv7_decode, wkv7_prefill

from .backend import StepBatch
from .model import TorchRwkv7


class TritonRwkv7(TorchRwkv7):
    name = "triton"

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
        return wkv7_prefill(store, batch.slots, batch.cu_seqlens, r, w, k, v, a, b)
