"""Sampling for a whole batch on the device, with per-row parameters and per-slot penalty state.

Penalties are additive and decay (RWKV style). Per slot the sampler keeps an accumulated penalty [V]
and a seen-mask [V]; after a token x is sampled: penalty *= penalty_decay, then penalty[x] +=
frequency_penalty + (presence_penalty if x is new else repetition_penalty). With decay 1 and
repetition 0 this is exactly OpenAI's presence/frequency penalty; with frequency 0 it is RWKV-Server's.
The multiplicative (Hugging Face) repetition penalty, for Replicate-style inputs, then scales the
logits of seen tokens. Only generated tokens count.

Randomness is one uniform number per row and token position, a hash of (seed, position): a row's
choice does not depend on the other rows in the batch, so the same seed, state and parameters give
the same tokens. Sampling is inverse-CDF over the (top-k/top-p truncated) distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .protocol import SamplingParams

_MASK64 = (1 << 64) - 1
# Top-p/top-k rows first look at this many most likely tokens (a partial sort); most nuclei fit.
CANDIDATES = 1024


def _mix64(x: int) -> int:
    # splitmix64 finaliser: a bijection of 64-bit ints with good avalanche.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """A number in [0, 1 - 2^-23] from (seed, position); 23 bits so u * total stays below total in fp32."""
    return (_mix64(_mix64(seed) ^ position) >> 41) / float(1 << 23)


class SampleRow(NamedTuple):  # a tuple: built for every sampled row of every step, so cheaply
    slot: int
    params: SamplingParams
    seed: int
    position: int  # index of the token being sampled in this sequence's random stream
    banned: tuple[int, ...] = ()  # tokens that may not be sampled now (stops before min_tokens)


@dataclass(frozen=True)
class Sampled:
    tokens: list[int]
    # Per row: (logprob of the chosen token, [(id, logprob)] top alternatives) when asked for, else None.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self, slots: int, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.penalties = torch.zeros(slots, vocab_size, device=device)  # [P, V] fp32
        self.seen = torch.zeros(slots, vocab_size, device=device, dtype=torch.bool)  # [P, V]

    def reset(self, slot: int) -> None:
        self.penalties[slot].zero_()
        self.seen[slot].zero_()

    def snapshot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.penalties[slot].clone(), self.seen[slot].clone()

    def restore(self, slot: int, penalties: torch.Tensor, seen: torch.Tensor) -> None:
        self.penalties[slot].copy_(penalties)
        self.seen[slot].copy_(seen)

    def _tensor(self, values: Sequence[float] | Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def sample(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> Sampled:
        """logits: [R, V] fp32, one row per entry of `rows`."""
        return self.launch(logits, rows).result()

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> PendingSample:
        """Enqueues the sampling of logits [R, V] fp32 (one row per entry of `rows`) without waiting for the
        device; result() waits. `logits` must stay unchanged until then (the engine replays no graph between)."""
        R = logits.shape[0]
        slots = self._tensor([r.slot for r in rows], torch.long)
        work = logits
        penalised = [i for i, r in enumerate(rows) if r.params.has_penalties]
        if penalised:
            idx = self._tensor(penalised, torch.long)
            work = work.clone()
            work[idx] -= self.penalties.index_select(0, slots.index_select(0, idx))
        scaled = [i for i, r in enumerate(rows) if r.params.multiplicative_repetition_penalty != 1.0]
        if scaled:
            idx = self._tensor(scaled, torch.long)
            factor = self._tensor([rows[i].params.multiplicative_repetition_penalty for i in scaled], torch.float32)
            sub_logits = work.index_select(0, idx)
            seen = self.seen.index_select(0, slots.index_select(0, idx))
            pushed = torch.where(sub_logits > 0, sub_logits / factor.unsqueeze(1), sub_logits * factor.unsqueeze(1))
            work[idx] = torch.where(seen, pushed, sub_logits)
        bans = [(i, t) for i, r in enumerate(rows) for t in r.banned]
        if bans:
            work = work.clone() if work is logits else work
            work[self._tensor([b[0] for b in bans], torch.long), self._tensor([b[1] for b in bans], torch.long)] = (
                float("-inf")
            )

        greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0.0]
        if len(greedy) == R:  # the common all-greedy batch: no scatter
            tokens = work.argmax(dim=-1)
        else:
            tokens = torch.empty(R, dtype=torch.long, device=self.device)
            if greedy:
                g = self._tensor(greedy, torch.long)
                tokens[g] = work.index_select(0, g).argmax(dim=-1)
        drawn = [i for i, r in enumerate(rows) if r.params.temperature != 0.0]
        # Truncating rows draw over the sorted distribution, the others in vocabulary order; drawing the two
        # groups apart keeps a row's token independent of the other rows' parameters.
        truncating = [i for i in drawn if rows[i].params.top_p < 1.0 or rows[i].params.top_k > 0]
        plain = [i for i in drawn if not (rows[i].params.top_p < 1.0 or rows[i].params.top_k > 0)]
        if plain:
            d = self._tensor(plain, torch.long)
            tokens[d] = self._draw_plain(work.index_select(0, d), [rows[i] for i in plain])
        inside: torch.Tensor | None = None  # [len(truncating)] bool
        if truncating:
            d = self._tensor(truncating, torch.long)
            tokens[d], inside = self._draw_candidates(work.index_select(0, d), [rows[i] for i in truncating])
        # What result() reads back, in one tensor: the tokens and whether each truncating row's kept set lay
        # within its candidates.
        readback = tokens if inside is None else torch.cat([tokens, inside.long()])
        return PendingSample(
            self, rows, work, tokens, readback, truncating, penalised, self._logprobs(logits, rows, tokens)
        )

    @torch.inference_mode()
    def collect(self, pending: PendingSample) -> Sampled:
        """Waits for a launched sampling and reads its tokens (and logprobs) back; updates the penalties."""
        rows = pending.rows
        R = len(rows)
        host = pending.readback.tolist()
        chosen = host[:R]
        # A truncating row whose kept set reaches past its candidates (rare for a trained model) is drawn
        # again from a full sort.
        redo = [i for i, ok in zip(pending.truncating, host[R:], strict=True) if not ok]
        if redo:
            d = self._tensor(redo, torch.long)
            wide = self._draw_sorted(pending.work.index_select(0, d), [rows[i] for i in redo])
            pending.tokens[d] = wide
            for i, token in zip(redo, wide.tolist(), strict=True):
                chosen[i] = token
        self._update_penalties(rows, pending.penalised, chosen)
        logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * R
        if pending.logprobs is not None:
            logprobs = pending.logprobs.read(rows, pending.tokens)
        return Sampled(chosen, logprobs)

    def _scaled(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        return logits / self._tensor([r.params.temperature for r in rows], torch.float32).unsqueeze(1)

    def _draw_plain(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        """Inverse-CDF sampling of [D, V] logits with temperature, in vocabulary order."""
        return self._pick(torch.softmax(self._scaled(logits, rows), dim=-1), None, rows)

    def _draw_candidates(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k/top-p sampling of [D, V] logits in descending-probability order over the top CANDIDATES tokens
        (a partial sort). Returns the tokens [D] and whether each row's kept set lay within the candidates [D]
        bool: where it did (the usual case for a trained model) the token is exactly the full sort's; where it
        did not, the caller draws the row again with _draw_sorted. Nothing here waits for the device."""
        scaled = self._scaled(logits, rows)
        V = scaled.shape[1]
        k = min(V, CANDIDATES)
        values, order = scaled.topk(k, dim=-1)  # [D, k], descending
        probs = torch.exp(values - torch.logsumexp(scaled, dim=-1, keepdim=True))
        keep = self._kept(probs, rows)
        # Kept sets are prefixes of the sorted order: if the last candidate is out, every later token is too.
        return self._pick(probs * keep, order, rows), ~keep[:, -1] | self._top_k(rows, V).squeeze(1).le(k)

    def _draw_sorted(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        """Top-k/top-p sampling of [D, V] logits in descending-probability order over a full sort."""
        sorted_logits, order = self._scaled(logits, rows).sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        return self._pick(probs * self._kept(probs, rows), order, rows)

    def _top_k(self, rows: Sequence[SampleRow], none: int) -> torch.Tensor:
        """[D, 1] int64 each row's top_k, `none` where it sets no limit."""
        return self._tensor([r.params.top_k if r.params.top_k > 0 else none for r in rows], torch.long).unsqueeze(1)

    def _kept(self, probs: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        """[D, n] bool over descending probs [D, n]: a token stays while the mass before it is under top_p and
        it is within top_k; the most likely always stays."""
        n = probs.shape[1]
        top_p = self._tensor([r.params.top_p for r in rows], torch.float32).unsqueeze(1)
        keep = (probs.cumsum(dim=-1) - probs) < top_p
        keep &= torch.arange(n, device=self.device).unsqueeze(0) < self._top_k(rows, n)
        keep[:, 0] = True
        return keep

    def _pick(self, probs: torch.Tensor, order: torch.Tensor | None, rows: Sequence[SampleRow]) -> torch.Tensor:
        """Inverse CDF: the token where the row's uniform number falls in its cumulative distribution."""
        cdf = probs.cumsum(dim=-1)
        u = self._tensor([uniform(r.seed, r.position) for r in rows], torch.float32) * cdf[:, -1]
        pos = torch.searchsorted(cdf, u.unsqueeze(1), right=True).clamp_(max=probs.shape[1] - 1)  # [D, 1]
        return (order.gather(1, pos) if order is not None else pos).squeeze(1)

    def _update_penalties(self, rows: Sequence[SampleRow], penalised: list[int], chosen: list[int]) -> None:
        if not penalised:
            return
        ps = [rows[i].params for i in penalised]
        slots = self._tensor([rows[i].slot for i in penalised], torch.long)
        toks = self._tensor([chosen[i] for i in penalised], torch.long)
        if any(p.penalty_decay != 1.0 for p in ps):
            decay = self._tensor([p.penalty_decay for p in ps], torch.float32).unsqueeze(1)
            self.penalties.index_copy_(0, slots, self.penalties.index_select(0, slots) * decay)
        seen = self.seen[slots, toks]
        presence = self._tensor([p.presence_penalty for p in ps], torch.float32)
        repetition = self._tensor([p.repetition_penalty for p in ps], torch.float32)
        frequency = self._tensor([p.frequency_penalty for p in ps], torch.float32)
        # Slots are distinct within a step, so each (slot, token) pair appears once.
        self.penalties[slots, toks] += torch.where(seen, repetition, presence) + frequency
        self.seen[slots, toks] = True

    def _logprobs(
        self, logits: torch.Tensor, rows: Sequence[SampleRow], tokens: torch.Tensor
    ) -> _LogprobsOnDevice | None:
        """Log-probabilities under the model itself (before penalties, temperature and truncation), on the device."""
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs]
        if not wanted:
            return None
        idx = self._tensor(wanted, torch.long)
        lp = torch.log_softmax(logits.index_select(0, idx), dim=-1)
        n_top = max(rows[i].params.top_logprobs for i in wanted)
        top_v, top_i = lp.topk(n_top, dim=-1) if n_top else (lp[:, :0], lp[:, :0].long())
        return _LogprobsOnDevice(wanted, idx, lp, top_v, top_i)


@dataclass(frozen=True)
class _LogprobsOnDevice:
    wanted: list[int]  # rows that asked for logprobs
    idx: torch.Tensor  # [W] the same, on the device
    lp: torch.Tensor  # [W, V] log-softmax of their logits
    top_v: torch.Tensor  # [W, n] the most likely tokens'
    top_i: torch.Tensor  # [W, n]

    def read(
        self, rows: Sequence[SampleRow], tokens: torch.Tensor
    ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Per row, (logprob of its token, top alternatives) or None; `tokens` [R] as finally chosen."""
        out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(rows)
        picked = self.lp.gather(1, tokens.index_select(0, self.idx).unsqueeze(1)).squeeze(1).tolist()
        top_v, top_i = self.top_v.tolist(), self.top_i.tolist()
        for j, i in enumerate(self.wanted):
            n = rows[i].params.top_logprobs
            out[i] = (picked[j], list(zip(top_i[j][:n], top_v[j][:n], strict=True)))
        return out


@dataclass(frozen=True)
class PendingSample:
    """A batch's sampling, enqueued on the device; result() waits for it (the step's one host sync)."""

    sampler: Sampler
    rows: Sequence[SampleRow]
    work: torch.Tensor  # [R, V] the logits sampled from (penalised, banned)
    tokens: torch.Tensor  # [R]
    readback: torch.Tensor  # [R] tokens, then [T] whether each truncating row kept within its candidates
    truncating: list[int]  # rows drawn with top-p/top-k
    penalised: list[int]  # rows with additive penalties
    logprobs: _LogprobsOnDevice | None

    def result(self) -> Sampled:
        return self.sampler.collect(self)
