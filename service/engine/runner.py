"""Executes engine steps on the device: slots in, model forward, batch sampling, states and caches out.

Owns every tensor of the engine apart from the weights: the state pool, the sampler's per-slot
penalties and the prefix-state cache. Called only from the engine thread. With CUDA graphs on, decode
steps (every row one token) replay a captured graph (service/engine/cuda_graphs.py); prefill and mixed
steps, and any decode step without a graph, run the model eager.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .backend import ModelBackend, StepBatch
from .cuda_graphs import Capture, DecodeGraphs
from .prefix_cache import PrefixCache
from .sampler import PendingSample, Sampled, Sampler, SampleRow
from .scheduler import StepPlan
from .sequence import Sequence, feed_for
from .snapshot import StateSnapshot
from .state_pool import StatePool


@dataclass(frozen=True)
class StepResult:
    sampled: Sampled
    sample_rows: list[int]  # plan row index of each sampled token
    # Host seconds spent issuing the forward, and sampling (on a GPU the wait for the forward to finish
    # lands in sample_seconds, at its one host sync).
    forward_seconds: float
    sample_seconds: float


@dataclass
class LaunchedStep:
    """A step in flight on the device; result() waits for its sampled tokens."""

    pending: PendingSample | None  # None when no row samples
    sample_rows: list[int]
    forward_seconds: float  # host seconds issuing the forward
    launch_seconds: float  # host seconds issuing the sampling
    runner: Runner | None = None  # told when the step is no longer in flight

    def result(self) -> StepResult:
        t0 = time.perf_counter()
        try:
            sampled = self.pending.result() if self.pending is not None else Sampled([], [])
        finally:
            if self.runner is not None:
                self.runner.in_flight = None
        return StepResult(
            sampled, self.sample_rows, self.forward_seconds, self.launch_seconds + time.perf_counter() - t0
        )


class Runner:
    def __init__(
        self,
        model: ModelBackend,
        slots: int,
        model_version: str,
        prefix_cache: PrefixCache,
        *,
        cuda_graphs: bool = False,
        capture: Capture | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        """`cuda_graphs`: decode steps through DecodeGraphs (`capture` replaces CUDA capture in tests);
        `state_dtype`: what the pool stores the WKV state in (--state-dtype)."""
        self.model = model
        self.device = model.device
        self.model_version = model_version
        self.pool = StatePool(
            model.shape, slots, model.device, model.dtype, state_dtype=state_dtype, scratch=cuda_graphs
        )
        self.graphs = DecodeGraphs(model, self.pool, slots, capture) if cuda_graphs else None
        self.sampler = Sampler(slots, model.shape.vocab_size, model.device)
        self.prefix_cache = prefix_cache
        # The step launched and not yet read back. While it is in flight the device is rewriting the states
        # of its rows: nothing may launch, copy or load a state (the engine's overlap depends on this).
        self.in_flight: LaunchedStep | None = None

    @property
    def free_slots(self) -> int:
        return self.pool.capacity - self.pool.in_use

    def _settled(self, what: str) -> None:
        if self.in_flight is not None:
            raise RuntimeError(f"{what} while a step is in flight (its states are being rewritten)")

    def admit(self, seq: Sequence, start: StateSnapshot | None) -> None:
        """Gives `seq` a slot holding its start state: a snapshot, a cached prefix, or zero."""
        self._settled("admitting a sequence")
        slot = self.pool.allocate()
        if slot is None:
            raise RuntimeError("admit() without a free slot")
        seq.slot = slot
        req = seq.request
        if start is not None:
            self.pool.restore(slot, start.rnn)
            seq.feed = feed_for(req.prompt, start.pending_token)
            seq.base_token_count = start.token_count
            if req.inherit_sampler:
                self.sampler.restore(slot, start.penalties, start.seen)
                seq.position = start.position
            else:
                self.sampler.reset(slot)
        else:
            seq.feed = feed_for(req.prompt, None)
            seq.from_zero = True
            self.sampler.reset(slot)
            hit = self.prefix_cache.lookup(seq.feed) if req.use_prefix_cache else None
            if hit is not None:
                n, cached = hit
                self.pool.restore(slot, cached)
                seq.fed = seq.cached_tokens = n
        seq.prompt_end = len(seq.feed)
        shift = len(seq.feed) - len(req.prompt)  # request offsets are prompt offsets
        points = {p + shift for p in req.cache_points if 0 < p + shift < seq.prompt_end}
        if seq.from_zero and req.use_prefix_cache and self.prefix_cache.worth_caching(seq.prompt_end - 1):
            points.add(seq.prompt_end - 1)  # the whole prompt but its last token: serves repeats of it
        seq.cache_points = sorted(p for p in points if p > seq.fed)

    def release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.pool.release(seq.slot)
            seq.slot = None

    def launch(self, plan: StepPlan) -> LaunchedStep:
        """Issues a step's forward and sampling to the device without waiting for them (on a CPU they run
        here). Nothing else may run on the device before the result is read (a graph's logits are reused)."""
        self._settled("launching a step")
        rows = plan.rows
        slots = [r.seq.slot for r in rows]
        assert all(s is not None for s in slots)
        sample_rows = [i for i, r in enumerate(rows) if r.sample]
        t0 = time.perf_counter()
        logits = None
        if self.graphs is not None and all(r.end - r.start == 1 for r in rows):
            logits = self.graphs.run([r.seq.feed[r.start] for r in rows], slots, sample_rows)  # type: ignore[arg-type]
        if logits is None:
            batch = StepBatch.build([r.tokens for r in rows], slots, sample_rows, self.device)  # type: ignore[arg-type]
            logits = self.model.forward(batch, self.pool)  # [R, V]
        t1 = time.perf_counter()
        sample_specs = [
            SampleRow(
                slot=rows[i].seq.slot,  # type: ignore[arg-type]
                params=rows[i].seq.params,
                seed=rows[i].seq.seed,
                position=rows[i].seq.position,
                banned=rows[i].seq.banned_now,
            )
            for i in sample_rows
        ]
        pending = self.sampler.launch(logits, sample_specs) if sample_specs else None
        self.in_flight = LaunchedStep(pending, sample_rows, t1 - t0, time.perf_counter() - t1, self)
        return self.in_flight

    def cache_prefix(self, seq: Sequence) -> None:
        """Puts the slot's state (after feed[:fed]) into the prefix cache, if it is a from-zero state."""
        if seq.from_zero and seq.slot is not None and seq.request.use_prefix_cache:
            self._settled("caching a state")
            self.prefix_cache.insert(seq.feed[: seq.fed], self.pool.snapshot(seq.slot))

    def snapshot(self, seq: Sequence) -> StateSnapshot:
        """The sequence's state as it stands after the latest step."""
        assert seq.slot is not None
        self._settled("copying a state")
        penalties, seen = self.sampler.snapshot(seq.slot)
        return StateSnapshot(
            rnn=self.pool.snapshot(seq.slot),
            pending_token=seq.pending_token,
            token_count=seq.token_count,
            penalties=penalties,
            seen=seen,
            seed=seq.seed,
            position=seq.position,
            model_version=self.model_version,
            generated_tokens=len(seq.generated),
        )
