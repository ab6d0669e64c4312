"""The preallocated pool of per-sequence RNN states, one slot per running sequence.

Layout is layer-major so a layer's forward reads one contiguous tensor: att_x [L, P, C] and ffn_x
[L, P, C] (token-shift inputs, activation dtype), wkv [L, P, H, N, N] in the state dtype (fp32 by
default; fp16 or bf16 with --state-dtype, which halves the pool and the state traffic of every step:
the WKV math stays fp32, each step loads the state, converts it and rounds it once when storing it).
A snapshot is a copy of one slot (`RnnState`), in the pool's dtypes; restoring, forking and zeroing are
copies inside this pool, and restoring a state of other dtypes (an import) converts it. No other module
writes these tensors except the model forward, in place, by slot index.

With `scratch=True` the pool holds one more slot that is never handed out: the rows that pad a decode
step up to a CUDA graph's batch size read and write it (service/engine/cuda_graphs.py), so padding
never touches a live sequence's state. Its contents are garbage and nothing reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import ModelShape


@dataclass(frozen=True)
class RnnState:
    """One sequence's state, detached from the pool."""

    att_x: torch.Tensor  # [L, C]
    wkv: torch.Tensor  # [L, H, N, N] in the pool's state dtype
    ffn_x: torch.Tensor  # [L, C]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.att_x, self.wkv, self.ffn_x))

    def to(self, device: torch.device | str) -> RnnState:
        return RnnState(self.att_x.to(device), self.wkv.to(device), self.ffn_x.to(device))


STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class StatePool:
    def __init__(
        self,
        shape: ModelShape,
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        state_dtype: torch.dtype = torch.float32,
        scratch: bool = False,
    ) -> None:
        """`dtype`: the token-shift vectors' (the activation dtype); `state_dtype`: the WKV state's."""
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"the WKV state dtype must be float32, float16 or bfloat16, not {state_dtype}")
        L, C, H, N = shape.n_layer, shape.n_embd, shape.n_head, shape.head_size
        self.shape = shape
        self.device = device
        self.dtype = dtype
        self.state_dtype = state_dtype
        P = slots + 1 if scratch else slots
        self.att_x = torch.zeros(L, P, C, device=device, dtype=dtype)  # [L, P, C]
        self.wkv = torch.zeros(L, P, H, N, N, device=device, dtype=state_dtype)  # [L, P, H, N, N]
        self.ffn_x = torch.zeros(L, P, C, device=device, dtype=dtype)  # [L, P, C]
        self._slots = slots
        # The last slot, never allocated: padding rows of CUDA-graph decode steps (None without one).
        self.scratch_slot: int | None = slots if scratch else None
        # Handed out lowest first, so a lightly loaded engine touches few slots.
        self._free = list(range(slots - 1, -1, -1))

    @property
    def capacity(self) -> int:
        """Slots that sequences can hold (the scratch slot is not one)."""
        return self._slots

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self) -> int | None:
        """A zeroed slot, or None when all are taken."""
        if not self._free:
            return None
        slot = self._free.pop()
        self.zero(slot)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def zero(self, slot: int) -> None:
        for t in (self.att_x, self.wkv, self.ffn_x):
            t[:, slot].zero_()

    def snapshot(self, slot: int) -> RnnState:
        return RnnState(self.att_x[:, slot].clone(), self.wkv[:, slot].clone(), self.ffn_x[:, slot].clone())

    def restore(self, slot: int, state: RnnState) -> None:
        """Copies `state` into the slot, converting it to the pool's dtypes if it has others."""
        self.att_x[:, slot].copy_(state.att_x)
        self.wkv[:, slot].copy_(state.wkv)
        self.ffn_x[:, slot].copy_(state.ffn_x)

    def zero_state(self) -> RnnState:
        """A zero state of this pool's shape and dtypes (not tied to a slot)."""
        L, C, H, N = self.shape.n_layer, self.shape.n_embd, self.shape.n_head, self.shape.head_size
        return RnnState(
            torch.zeros(L, C, device=self.device, dtype=self.dtype),
            torch.zeros(L, H, N, N, device=self.device, dtype=self.state_dtype),
            torch.zeros(L, C, device=self.device, dtype=self.dtype),
        )
