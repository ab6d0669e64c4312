"""The contract between the engine and a model backend: one packed step in, logits out.

A step packs rows of different lengths (decode rows of one token, prefill chunks of many) one after
another; each row reads and writes its own state slot. Backends (torch now, triton on GPU) implement
`ModelBackend`; the runner builds `StepBatch` and never looks inside a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .checkpoint import ModelShape
from .state_pool import StatePool


@dataclass(frozen=True)
class StepBatch:
    """One engine step, packed.

    tokens: [T] int64 token ids, row after row.
    slots: [B] int64 state slot of each row.
    starts / ends: [B] int64 packed index of each row's first / last token; cu_seqlens [B + 1] the starts and T.
    lengths: tokens per row (host ints, sum = T).
    logit_rows: [R] int64 rows whose last-token logits are wanted (R may be 0).
    """

    tokens: torch.Tensor
    slots: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    cu_seqlens: torch.Tensor  # [B + 1] int64: starts, then T
    lengths: tuple[int, ...]
    logit_rows: torch.Tensor

    @property
    def is_decode(self) -> bool:
        """Every row is one token: the shape decode kernels and CUDA graphs are built for."""
        return len(self.lengths) == self.tokens.shape[0]

    @classmethod
    def build(cls, rows: list[list[int]], slots: list[int], logit_rows: list[int], device: torch.device) -> StepBatch:
        lengths = tuple(len(r) for r in rows)
        starts: list[int] = []
        acc = 0
        for n in lengths:
            starts.append(acc)
            acc += n
        flat = [t for r in rows for t in r]

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

        return cls(
            tokens=as_tensor(flat),
            slots=as_tensor(slots),
            starts=as_tensor(starts),
            ends=as_tensor([s + n - 1 for s, n in zip(starts, lengths, strict=True)]),
            cu_seqlens=as_tensor([*starts, acc]),
            lengths=lengths,
            logit_rows=as_tensor(logit_rows),
        )


class ModelBackend(Protocol):
    shape: ModelShape
    device: torch.device
    dtype: torch.dtype
    name: str

    def forward(self, batch: StepBatch, pool: StatePool) -> torch.Tensor:
        """Runs the step, updating the rows' slots in `pool`; returns fp32 logits [R, V] of batch.logit_rows."""
        ...
