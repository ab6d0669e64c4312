"""CUDA graphs for decode steps: one graph per batch-size bucket, captured on first use, replayed padded.

A decode step (every row one token) of B rows runs as the graph of the smallest bucket >= B. The graph
reads static inputs: the bucket's token ids and slots, written into one device buffer before each
replay. Rows past B are padding: token 0 in the pool's scratch slot, a slot no sequence ever holds, so
padding never reads or writes a live state (padding rows share that slot; what they leave in it is
garbage nobody reads, and rows do not mix in the forward: every op is per row or per token). The
graph computes the logits of all its rows; the caller gets the real rows' (a view when every row
samples, else a gather). Sampling stays outside the graph.

The model's forward is a black box `forward(batch, pool) -> logits` that must be capturable for a
fixed StepBatch: no host syncs, no host-side branching on device values (branching on shapes and on
the host tuple `batch.lengths` is fine: they are fixed per bucket). If a capture raises anyway, that
bucket runs eager from then on (one warning), and the step still runs.

Captures happen lazily in the engine thread: a warm-up on a side stream (compiles and autotunes
Triton kernels, as torch.cuda.graphs asks), then the capture. Warm-up and capture run with every row
in the scratch slot. All graphs share one memory pool; they never run concurrently and each graph's
output is consumed before the next replay.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .backend import ModelBackend, StepBatch
from .state_pool import StatePool

log = logging.getLogger("rwkvd.engine")

SETTINGS = ("auto", "on", "off")


def graphs_enabled(setting: str, device: torch.device) -> bool:
    """Whether decode steps use CUDA graphs: auto = on a CUDA device; on without one is an error."""
    if setting not in SETTINGS:
        raise ValueError(f"cuda_graphs must be auto, on or off, not {setting!r}")
    if setting == "off":
        return False
    if device.type == "cuda":
        return True
    if setting == "on":
        raise ValueError(f"cuda_graphs=on needs a CUDA device (the engine runs on {device})")
    return False


def buckets(max_rows: int) -> tuple[int, ...]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then 16, 24, 32, 48, 64, 96, ... (x1.5, x4/3), and max_rows.

    Beyond 16 rows padding wastes at most a third of a step's rows; decode cost grows slowly with rows while
    the weights dominate, and each bucket costs one capture (lazily, the first time it is used).
    """
    if max_rows < 1:
        raise ValueError("max_rows must be at least 1")
    sizes = {1, 2, 4, 8}
    p = 16
    while p < max_rows:
        sizes.update((p, p + p // 2))
        p *= 2
    return tuple(sorted({s for s in sizes if s < max_rows} | {max_rows}))


def bucket_for(rows: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest bucket holding `rows` rows, or None when none does."""
    i = bisect.bisect_left(sizes, rows)
    return sizes[i] if i < len(sizes) else None


def pad_rows(tokens: list[int], slots: list[int], size: int, scratch: int) -> tuple[list[int], list[int]]:
    """The step's token ids and slots padded to `size` rows: token 0 in the scratch slot."""
    if not len(tokens) == len(slots) <= size:
        raise ValueError(f"{len(tokens)} tokens and {len(slots)} slots do not pad to {size} rows")
    pad = size - len(tokens)
    return tokens + [0] * pad, slots + [scratch] * pad


def decode_batch(tokens: torch.Tensor, slots: torch.Tensor) -> StepBatch:
    """The StepBatch of a bucket over static `tokens` and `slots` [n]: n rows of one token, every row's logits."""
    n = tokens.shape[0]
    index = torch.arange(n + 1, dtype=torch.long, device=tokens.device)
    rows = index[:n]
    return StepBatch(
        tokens=tokens,
        slots=slots,
        starts=rows,
        ends=rows,
        cu_seqlens=index,
        lengths=(1,) * n,
        logit_rows=rows,
    )


class Graph(Protocol):
    """A captured step: replay() reruns it, leaving its result in `output` (the same tensor every time)."""

    output: torch.Tensor

    def replay(self) -> None: ...


Capture = Callable[[Callable[[], torch.Tensor]], Graph]


@dataclass
class _CudaGraph:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor

    def replay(self) -> None:
        self.graph.replay()


class CudaCapture:
    """Captures steps into CUDA graphs on `device`, all in one memory pool."""

    def __init__(self, device: torch.device, warmup: int = 2) -> None:
        self.device = device
        self.warmup = warmup
        self._pool: Any = None  # torch's opaque pool handle, shared by every capture

    def __call__(self, step: Callable[[], torch.Tensor]) -> Graph:
        with torch.cuda.device(self.device):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.current_stream()
            side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    step()
            stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: other threads (the event loop reading allocator counters) may go on.
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    output = step()
            except BaseException:
                # torch.cuda.graph does not leave its capture stream when ending the capture raises.
                torch.cuda.set_stream(stream)
                raise
            return _CudaGraph(graph, output)


@dataclass
class _Bucket:
    graph: Graph
    batch: StepBatch  # the graph reads these tensors' memory: they live as long as it does


class DecodeGraphs:
    """Runs decode steps of up to `max_rows` rows through per-bucket graphs; see the module docstring."""

    def __init__(self, model: ModelBackend, pool: StatePool, max_rows: int, capture: Capture | None = None) -> None:
        if pool.scratch_slot is None:
            raise ValueError("CUDA-graph decode needs a state pool with a scratch slot")
        self.model = model
        self.pool = pool
        self.scratch = pool.scratch_slot
        self.sizes = buckets(max_rows)
        self.device = model.device
        self._capture = capture if capture is not None else CudaCapture(model.device)
        # Row 0: token ids, row 1: slots; a bucket of n rows reads [:, :n].
        self._io = torch.zeros(2, self.sizes[-1], dtype=torch.long, device=model.device)
        self._buckets: dict[int, _Bucket] = {}
        self.failed: set[int] = set()  # buckets whose capture raised: they run eager
        self._warned = False

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self._buckets))

    def run(self, tokens: list[int], slots: list[int], logit_rows: list[int]) -> torch.Tensor | None:
        """Logits [len(logit_rows), V] of one decode step (row i reads tokens[i] in slots[i]).

        None when the step has no graph (too many rows, or its bucket's capture failed): the caller
        runs it eager. The result may be a view of the graph's output, valid until the next run.
        """
        size = bucket_for(len(tokens), self.sizes)
        if not tokens or size is None or size in self.failed:
            return None
        bucket = self._buckets.get(size) or self._capture_bucket(size)
        if bucket is None:
            return None
        padded_tokens, padded_slots = pad_rows(tokens, slots, size, self.scratch)
        # One host-to-device copy; the stream orders it after the previous replay's reads.
        self._io[:, :size].copy_(torch.tensor([padded_tokens, padded_slots], dtype=torch.long), non_blocking=True)
        bucket.graph.replay()
        out = bucket.graph.output
        if logit_rows == list(range(len(logit_rows))):
            return out[: len(logit_rows)]
        return out.index_select(0, torch.tensor(logit_rows, dtype=torch.long).to(self.device, non_blocking=True))

    def _capture_bucket(self, size: int) -> _Bucket | None:
        tokens, slots = self._io[0, :size], self._io[1, :size]
        tokens.zero_()
        slots.fill_(self.scratch)  # warm-up and capture read and write the scratch slot only
        batch = decode_batch(tokens, slots)

        def step() -> torch.Tensor:
            return self.model.forward(batch, self.pool)

        started = time.perf_counter()
        try:
            graph = self._capture(step)
        except Exception as exc:  # any failure: this bucket runs eager, the request goes on
            self.failed.add(size)
            if not self._warned:
                self._warned = True
                log.warning(
                    "CUDA graph capture of %d-row decode steps failed (%s: %s); those steps run eager "
                    "(further capture failures are logged at debug level)",
                    size,
                    type(exc).__name__,
                    exc,
                )
            else:
                log.debug("CUDA graph capture of %d-row decode steps failed: %r", size, exc)
            return None
        bucket = _Bucket(graph, batch)
        self._buckets[size] = bucket
        log.info("captured a CUDA graph for %d-row decode steps in %.2fs", size, time.perf_counter() - started)
        return bucket
