"""Sampler on hand-made logits: greedy, truncation, seeds, bans, frequencies, penalties and logprobs."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Any

import pytest
import torch

from service.engine.protocol import SamplingParams
from service.engine.sampler import CANDIDATES, Sampler, SampleRow, uniform

V = 64
CPU = torch.device("cpu")


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def random_logits(rows: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * scale


def row(slot: int = 0, seed: int = 1, position: int = 0, banned: tuple[int, ...] = (), **params: Any) -> SampleRow:
    return SampleRow(slot, SamplingParams(**params), seed, position, banned)


def one(sampler: Sampler, logits: torch.Tensor, spec: SampleRow) -> int:
    return sampler.sample(logits.view(1, -1), [spec]).tokens[0]


@pytest.fixture
def sampler() -> Sampler:
    return Sampler(8, V, CPU)


def test_uniform_is_in_range_and_deterministic() -> None:
    values = [uniform(seed, pos) for seed in range(20) for pos in range(50)]
    assert all(0.0 <= u < 1.0 for u in values)
    assert uniform(7, 3) == uniform(7, 3)
    assert len(set(values)) == len(values)  # 1000 distinct draws of 23 bits: a collision would be a hashing bug
    assert 0.45 < sum(values) / len(values) < 0.55


def test_temperature_zero_is_argmax(sampler: Sampler) -> None:
    logits = random_logits(6, 0)
    specs = [row(slot=i, seed=i, position=i, temperature=0.0) for i in range(6)]
    assert sampler.sample(logits, specs).tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5}])
def test_top_k_1_and_tiny_top_p_are_argmax(sampler: Sampler, params: dict[str, Any]) -> None:
    logits = random_logits(1, 1, scale=0.5)[0]  # flat: a plain draw would rarely be the argmax
    best = int(logits.argmax())
    for position in range(100):
        assert one(sampler, logits, row(seed=11, position=position, temperature=1.5, **params)) == best


def test_same_seed_and_position_same_token_different_seeds_vary(sampler: Sampler) -> None:
    logits = random_logits(1, 2, scale=0.3)[0]  # nearly uniform over 64 tokens
    for position in range(10):
        a = one(sampler, logits, row(seed=123, position=position))
        assert a == one(sampler, logits, row(seed=123, position=position))
    by_seed = {one(sampler, logits, row(seed=s, position=0)) for s in range(40)}
    by_position = {one(sampler, logits, row(seed=5, position=p)) for p in range(40)}
    assert len(by_seed) > 10
    assert len(by_position) > 10


@pytest.mark.parametrize(
    "other",
    [{"temperature": 0.0}, {"top_k": 5}, {"top_p": 0.3}, {"presence_penalty": 1.0}, {"temperature": 0.7}],
)
def test_a_rows_token_does_not_depend_on_the_other_rows(sampler: Sampler, other: dict[str, Any]) -> None:
    # The sampler's contract: one uniform per (seed, position), so batching never changes a row's token.
    logits = random_logits(2, 3, scale=1.0)
    for position in range(100):
        mine = row(slot=0, seed=77, position=position)
        alone = one(sampler, logits[0], mine)
        batched = sampler.sample(logits, [mine, row(slot=1, seed=5, position=position, **other)]).tokens[0]
        assert batched == alone, position


def test_banned_tokens_are_never_chosen(sampler: Sampler) -> None:
    logits = random_logits(1, 4)[0]
    order = logits.argsort(descending=True).tolist()
    banned = tuple(order[:3])
    assert one(sampler, logits, row(temperature=0.0, banned=banned)) == order[3]
    drawn = Counter(one(sampler, logits, row(seed=9, position=p, temperature=2.0, banned=banned)) for p in range(300))
    assert not set(drawn) & set(banned)
    assert len(drawn) > 5
    # Truncation applies after the ban: top_k=1 picks the best allowed token.
    assert one(sampler, logits, row(seed=9, top_k=1, banned=banned)) == order[3]


def frequencies(sampler: Sampler, logits: list[float], n: int, **params: Any) -> list[float]:
    x = torch.full((n, V), float("-inf"))
    x[:, : len(logits)] = torch.tensor(logits)
    specs = [row(slot=0, seed=2024, position=p, **params) for p in range(n)]
    counts = Counter(sampler.sample(x, specs).tokens)
    assert set(counts) <= set(range(len(logits)))
    return [counts[i] / n for i in range(len(logits))]


# 4000 draws: a frequency's standard deviation is at most sqrt(0.25 / 4000) = 0.008, so 0.03 is ~4 sigma.
# The draws are a fixed hash of (seed, position), so the outcome is deterministic, not flaky.
N_DRAWS = 4000
FREQ_TOL = 0.03
SMALL = [2.0, 1.0, 0.5, 0.0, -1.0]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_match_softmax(sampler: Sampler, temperature: float) -> None:
    expected = torch.softmax(torch.tensor(SMALL) / temperature, -1).tolist()
    got = frequencies(sampler, SMALL, N_DRAWS, temperature=temperature)
    assert got == pytest.approx(expected, abs=FREQ_TOL)


def test_frequencies_with_top_k(sampler: Sampler) -> None:
    p = torch.softmax(torch.tensor(SMALL[:2]), -1).tolist()
    got = frequencies(sampler, SMALL, N_DRAWS, top_k=2)
    assert got == pytest.approx([*p, 0.0, 0.0, 0.0], abs=FREQ_TOL)
    assert got[2:] == [0.0, 0.0, 0.0]


def test_frequencies_with_top_p(sampler: Sampler) -> None:
    # softmax(SMALL) = [0.53, 0.20, 0.12, 0.07, 0.03]: top_p 0.7 keeps tokens while the mass before them is
    # under 0.7, i.e. the first two (mass before the third is 0.73).
    probs = torch.softmax(torch.tensor(SMALL), -1)
    assert probs[:2].sum() > 0.7 > probs[:1].sum()
    kept = (probs[:2] / probs[:2].sum()).tolist()
    got = frequencies(sampler, SMALL, N_DRAWS, top_p=0.7)
    assert got == pytest.approx([*kept, 0.0, 0.0, 0.0], abs=FREQ_TOL)
    assert got[2:] == [0.0, 0.0, 0.0]


def expected_penalties(
    tokens: list[int], presence: float, frequency: float, repetition: float, decay: float
) -> tuple[list[float], set[int]]:
    """The sampler docstring's rule, in float64: penalty *= decay; penalty[x] += f + (p if x is new else r)."""
    pen = [0.0] * V
    seen: set[int] = set()
    for x in tokens:
        pen = [v * decay for v in pen]
        pen[x] += frequency + (repetition if x in seen else presence)
        seen.add(x)
    return pen, seen


@pytest.mark.parametrize(
    ("presence", "frequency", "repetition", "decay"),
    [(0.5, 0.0, 0.0, 1.0), (0.0, 0.3, 0.0, 1.0), (0.4, 0.2, 0.0, 1.0), (0.5, 0.5, 0.25, 0.996), (1.0, 0.0, 0.7, 0.5)],
)
def test_penalty_state_follows_the_documented_formula(
    sampler: Sampler, presence: float, frequency: float, repetition: float, decay: float
) -> None:
    # A few strong tokens so repeats happen; greedy so we can also predict each choice from the penalties.
    base = torch.full((V,), -5.0)
    base[[3, 7, 11, 20]] = torch.tensor([3.0, 2.9137, 2.7071, 2.4823])  # gaps that penalty sums rarely tie
    params: dict[str, Any] = {
        "presence_penalty": presence,
        "frequency_penalty": frequency,
        "repetition_penalty": repetition,
        "penalty_decay": decay,
    }
    sampler.penalties[2].fill_(123.0)  # stale values from an earlier sequence in this slot
    sampler.reset(2)
    chosen: list[int] = []
    for position in range(25):
        pen, _ = expected_penalties(chosen, presence, frequency, repetition, decay)
        adjusted = base.double() - torch.tensor(pen, dtype=torch.float64)
        token = one(sampler, base, row(slot=2, position=position, temperature=0.0, **params))
        # Greedy picks the best penalised logit; within 1e-4 of the best (an fp32 rounding tie) either may win.
        assert adjusted[token] >= adjusted.max() - 1e-4, position
        chosen.append(token)
    pen, seen = expected_penalties(chosen, presence, frequency, repetition, decay)
    # fp32 accumulation of 25 steps against float64: 1e-5 absolute on values of order 1-10.
    torch.testing.assert_close(sampler.penalties[2], torch.tensor(pen, dtype=torch.float32), atol=1e-5, rtol=0)
    assert sampler.seen[2].nonzero().flatten().tolist() == sorted(seen)
    assert len(set(chosen)) > 1  # the penalties made it move
    # Other slots are untouched.
    assert sampler.penalties[[0, 1, 3, 4, 5, 6, 7]].abs().max() == 0
    assert not sampler.seen[[0, 1, 3, 4, 5, 6, 7]].any()


def test_openai_style_penalty_is_count_times_frequency_plus_presence(sampler: Sampler) -> None:
    base = torch.full((V,), -10.0)
    base[5] = 10.0  # always chosen despite the penalties
    for position in range(4):
        one(
            sampler, base, row(slot=1, position=position, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
        )
    assert sampler.penalties[1, 5].item() == pytest.approx(4 * 0.25 + 0.5)


def test_no_penalty_params_leave_penalty_state_alone(sampler: Sampler) -> None:
    logits = random_logits(1, 5)[0]
    for position in range(5):
        one(sampler, logits, row(slot=0, position=position, penalty_decay=0.5))
    assert sampler.penalties.abs().max() == 0
    assert not sampler.seen.any()


def test_snapshot_and_restore(sampler: Sampler) -> None:
    base = random_logits(1, 6)[0]
    for position in range(6):
        one(sampler, base, row(slot=3, position=position, seed=4, presence_penalty=0.6, frequency_penalty=0.1))
    pen, seen = sampler.snapshot(3)
    sampler.reset(3)
    assert sampler.penalties[3].abs().max() == 0
    sampler.restore(5, pen, seen)
    assert torch.equal(sampler.penalties[5], pen)
    assert torch.equal(sampler.seen[5], seen)
    pen.zero_()  # a snapshot is a copy
    assert sampler.penalties[5].abs().max() > 0


def test_logprobs_are_log_softmax_of_raw_logits(sampler: Sampler) -> None:
    logits = random_logits(4, 7)
    ref = torch.log_softmax(logits.double(), -1)  # before sampling: the sampler must not change the logits
    specs = [
        row(slot=0, temperature=0.0, logprobs=True, top_logprobs=5),
        # Temperature, truncation and penalties change the draw, never the reported logprobs.
        row(slot=1, seed=3, temperature=1.7, top_k=10, presence_penalty=2.0, logprobs=True, top_logprobs=3),
        row(slot=2, seed=4, logprobs=True, top_logprobs=0),
        row(slot=3, temperature=0.0, multiplicative_repetition_penalty=3.0, logprobs=True, top_logprobs=2),
    ]
    sampler.sample(logits, specs)  # once, so slots 1 and 3 have penalties the second time
    out = sampler.sample(logits, [SampleRow(s.slot, s.params, s.seed, 1) for s in specs])
    assert torch.equal(torch.log_softmax(logits.double(), -1), ref)
    for i, (token, lp) in enumerate(zip(out.tokens, out.logprobs, strict=True)):
        assert lp is not None
        picked, top = lp
        # fp32 log_softmax vs float64: 1e-5 on values around -4.
        assert picked == pytest.approx(ref[i, token].item(), abs=1e-5)
        n = specs[i].params.top_logprobs
        assert len(top) == n
        want_v, want_i = ref[i].topk(n) if n else (ref[i, :0], ref[i, :0].long())
        assert [t for t, _ in top] == want_i.tolist()
        assert [v for _, v in top] == pytest.approx(want_v.tolist(), abs=1e-5)
        assert all(a >= b for (_, a), (_, b) in itertools.pairwise(top))
    assert out.logprobs[0] is not None
    assert out.tokens[0] == out.logprobs[0][1][0][0]  # greedy picked the top alternative
    assert out.logprobs[3] is not None
    assert out.tokens[3] != out.logprobs[3][1][0][0]  # the penalty moved greedy off the model's top token


def test_a_multiplicative_penalty_alone_leaves_the_logits_and_logprobs_alone(sampler: Sampler) -> None:
    logits = logits_of([3.0, 2.5, -2.0] + [-9.0] * (V - 3))
    ref = torch.log_softmax(logits.double(), -1)
    spec = row(temperature=0.0, multiplicative_repetition_penalty=4.0, logprobs=True, top_logprobs=1)
    assert one(sampler, logits, spec) == 0
    out = sampler.sample(logits, [SampleRow(0, spec.params, spec.seed, 1)])
    assert out.tokens == [1]  # 3.0 / 4 < 2.5
    assert torch.equal(torch.log_softmax(logits.double(), -1), ref)  # the caller's logits are untouched
    assert out.logprobs[0] is not None
    assert out.logprobs[0][0] == pytest.approx(ref[0, 1].item(), abs=1e-5)  # under the model itself


def test_no_logprobs_unless_asked(sampler: Sampler) -> None:
    out = sampler.sample(random_logits(2, 8), [row(slot=0), row(slot=1, logprobs=True, top_logprobs=2)])
    assert out.logprobs[0] is None
    assert out.logprobs[1] is not None
    assert math.isfinite(out.logprobs[1][0])


def full_sort_choice(
    logits: torch.Tensor, seed: int, position: int, temperature: float, top_p: float, top_k: int
) -> int:
    """The truncated inverse-CDF draw computed over a full sort of the vocabulary: the specification."""
    values, order = (logits / temperature).sort(descending=True)
    probs = torch.softmax(values, dim=-1)
    keep = (probs.cumsum(-1) - probs) < top_p
    if top_k > 0:
        keep &= torch.arange(len(probs)) < top_k
    cdf = (probs * keep).cumsum(-1)
    pos = int(torch.searchsorted(cdf, torch.tensor([uniform(seed, position) * float(cdf[-1])]), right=True))
    return int(order[min(pos, len(probs) - 1)])


@pytest.mark.parametrize(
    ("scale", "top_p", "top_k"),
    [
        (8.0, 0.9, 0),  # peaked: the nucleus fits the top candidates (partial sort)
        (8.0, 1.0, 40),  # top-k within the candidates
        (0.5, 0.9, 0),  # flat: the nucleus is wider than the candidates (full sort)
        (0.5, 0.95, 3000),  # top-k wider than the candidates, nucleus too
    ],
)
def test_truncated_draw_matches_a_full_sort(scale: float, top_p: float, top_k: int) -> None:
    vocab = 4 * CANDIDATES
    wide = Sampler(8, vocab, CPU)
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(3)) * scale
    mass_in_candidates = torch.softmax(logits, -1).topk(CANDIDATES).values.sum(-1)
    partial = 0 < top_k <= CANDIDATES or bool((mass_in_candidates >= top_p).all())
    assert partial == (scale > 1), "each case must exercise the path it names"
    for position in range(20):
        specs = [row(slot=i, seed=100 + i, position=position, top_p=top_p, top_k=top_k) for i in range(6)]
        got = wide.sample(logits, specs).tokens
        want = [full_sort_choice(logits[i], 100 + i, position, 1.0, top_p, top_k) for i in range(6)]
        assert got == want


def test_multiplicative_repetition_penalty_scales_seen_tokens(sampler: Sampler) -> None:
    # Token 0 has the highest logit; once generated, its logit 3.0 is divided by 4 -> 0.75 < 1.0 of token 1.
    logits = logits_of([3.0, 1.0, -2.0] + [-9.0] * (V - 3))
    spec = row(temperature=0.0, multiplicative_repetition_penalty=4.0)
    assert one(sampler, logits, spec) == 0
    assert one(sampler, logits, spec) == 1
    # Negative logits are multiplied: a seen token with -2.0 would become -8.0 (checked via the penalty alone).
    sampler.reset(0)
    neg = logits_of([-2.0, -3.0, -5.0] + [-9.0] * (V - 3))
    assert one(sampler, neg, spec) == 0
    assert one(sampler, neg, spec) == 1  # -2.0 * 4 = -8.0 < -3.0
    assert one(sampler, logits_of([3.0, 1.0] + [-9.0] * (V - 2)), row(temperature=0.0)) == 0  # off by default


def test_top_p_zero_keeps_only_the_most_likely_token(sampler: Sampler) -> None:
    logits = random_logits(1, seed=5, scale=0.3)
    best = int(logits[0].argmax())
    assert {one(sampler, logits, row(seed=s, top_p=0.0)) for s in range(20)} == {best}


def test_a_batch_mixing_narrow_and_wide_nuclei_draws_each_as_a_full_sort_would() -> None:
    # Peaked rows keep their draw from the candidates; flat rows are drawn again from a full sort.
    vocab = 4 * CANDIDATES
    sampler = Sampler(8, vocab, CPU)
    scales = torch.tensor([8.0, 0.5, 8.0, 0.5, 0.5, 8.0]).unsqueeze(1)
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(4)) * scales
    fits = (torch.softmax(logits, -1).topk(CANDIDATES).values.sum(-1) >= 0.9).tolist()
    assert fits == [True, False, True, False, False, True]
    for position in range(10):
        specs = [row(slot=i, seed=7 + i, position=position, top_p=0.9, temperature=1.0) for i in range(6)]
        got = sampler.sample(logits, specs).tokens
        assert got == [full_sort_choice(logits[i], 7 + i, position, 1.0, 0.9, 0) for i in range(6)]
