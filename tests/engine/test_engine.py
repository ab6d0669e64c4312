"""The batch engine end to end through build_engine / LocalEngineClient, on the tiny checkpoint (cpu fp32).

Comparisons between two runs of the same request:
* seeded sampling must give identical tokens: each token's draw is a hash of (seed, position) and the
  logits differ between a batched and an alone run only by accumulation-order noise (~1e-6), which
  moves an inverse-CDF boundary past the draw with probability ~1e-6 per token;
* greedy runs may legitimately diverge only where the two candidates are a near tie: at the first
  differing position both chosen tokens must be within GAP_TOL (1e-3 nats) of each other in the
  reference run's logprobs. After a divergence the runs are not compared further.
No assertion depends on wall-clock timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from service.config import parse_serve_args
from service.engine.config import EngineConfig
from service.engine.generator import generate_state_dict, model_shape, write_checkpoint
from service.engine.local import LocalEngineClient, build_engine, loop_outlet
from service.engine.protocol import (
    Delta,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    Started,
    StateRef,
    TokenEvent,
    TokenLogprob,
)
from service.engine.runner import Runner
from service.engine.scheduler import PlannedRow, StepPlan
from service.engine.sequence import Sequence as EngineSequence
from service.engine.snapshot import StateSnapshot, to_bytes
from service.engine.state_pool import RnnState
from service.engine.tokenizer import WorldTokenizer
from service.errors import AlreadyExists, InvalidArgument, ResourceExhausted
from tests.engine.test_observer import Recorder

GAP_TOL = 1e-3
MAX_PROMPT = 256
MAX_NEW = 100_000
CACHE_MIN = 16

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    "人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的智能机器。",
    "Emoji time 🙂👍🏽 family 👨‍👩‍👧‍👦 and flags 🏳️‍🌈 🇯🇵, then back to words.",
    "User: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "吾輩は猫である。名前はまだ無い。한국어 문장도 조금 있습니다. Mixed ½ ∑ x² ≠ y.",
]

_ids = itertools.count()


def rid(tag: str) -> str:
    return f"{tag}-{next(_ids)}"


# ---- running requests -----------------------------------------------------------------------------


@dataclass
class Run:
    request: GenerationRequest
    events: list[TokenEvent]

    @property
    def started(self) -> Started:
        ev = self.events[0]
        assert isinstance(ev, Started)
        return ev

    @property
    def finished(self) -> Finished:
        ev = self.events[-1]
        assert isinstance(ev, Finished)
        return ev

    @property
    def deltas(self) -> list[Delta]:
        return [e for e in self.events if isinstance(e, Delta)]

    @property
    def ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return [lp for d in self.deltas for lp in d.logprobs]

    @property
    def reason(self) -> FinishReason:
        return self.finished.reason

    @property
    def state(self) -> StateRef:
        assert self.finished.state is not None
        return self.finished.state


def check_events(run: Run) -> None:
    """What every complete event stream must look like."""
    events, req = run.events, run.request
    assert isinstance(events[0], Started), events[:1]
    assert isinstance(events[-1], Finished), events[-1:]
    assert sum(isinstance(e, Started) for e in events) == 1
    assert sum(isinstance(e, Finished) for e in events) == 1
    assert all(e.request_id == req.request_id for e in events)
    offset = 0
    for d in run.deltas:
        assert d.offset == offset
        offset += len(d.token_ids)
    fin = run.finished
    assert fin.usage.prompt_tokens == len(req.prompt) == run.started.prompt_tokens
    assert fin.usage.completion_tokens == len(run.ids) <= req.sampling.max_tokens
    assert fin.usage.cached_tokens == run.started.cached_tokens
    assert fin.seed == run.started.seed
    if req.sampling.seed is not None:
        assert fin.seed == req.sampling.seed
    assert (fin.state is not None) == (req.keep_state and fin.reason is not FinishReason.ERROR)
    assert fin.error is None, fin.error
    if req.sampling.logprobs:
        assert [lp.token_id for lp in run.logprobs] == run.ids
        assert all(len(lp.top) == req.sampling.top_logprobs for lp in run.logprobs)


async def run(engine: LocalEngineClient, request: GenerationRequest) -> Run:
    events = [ev async for ev in engine.generate(request)]
    result = Run(request, events)
    check_events(result)
    return result


def greedy(**kw: object) -> SamplingParams:
    base: dict[str, object] = {"max_tokens": 16, "temperature": 0.0, "logprobs": True, "top_logprobs": 5}
    base.update(kw)
    return SamplingParams(**base)  # type: ignore[arg-type]


def seeded(seed: int, **kw: object) -> SamplingParams:
    base: dict[str, object] = {"max_tokens": 16, "temperature": 1.0, "seed": seed}
    base.update(kw)
    return SamplingParams(**base)  # type: ignore[arg-type]


def request(prompt: list[int] | tuple[int, ...], sampling: SamplingParams, **kw: object) -> GenerationRequest:
    return GenerationRequest(rid("r"), tuple(prompt), sampling, **kw)  # type: ignore[arg-type]


def assert_same_greedy(ref: Run, other: Run) -> None:
    """Same tokens, or a divergence only at a near tie of the reference's logprobs (GAP_TOL)."""
    for i, (a, b) in enumerate(zip(ref.ids, other.ids, strict=False)):
        if a != b:
            top = {t: v for t, _, v in ref.logprobs[i].top}
            assert a in top, (i, a, b)
            assert b in top, f"greedy runs diverge at {i}: {a} vs {b}, and {b} is not even in the top alternatives"
            gap = abs(top[a] - top[b])
            assert gap < GAP_TOL, f"greedy runs diverge at {i}: {a} vs {b} with a logprob gap of {gap}"
            return
    assert ref.ids == other.ids
    assert ref.reason == other.reason
    assert ref.text == other.text


def assert_same_run(ref: Run, other: Run) -> None:
    if ref.request.sampling.temperature == 0.0:
        assert_same_greedy(ref, other)
    else:
        assert ref.ids == other.ids, (ref.request, ref.ids, other.ids)
        assert ref.reason == other.reason
        assert ref.text == other.text


def clone_request(req: GenerationRequest, **kw: object) -> GenerationRequest:
    return replace(req, request_id=rid("again"), **kw)  # type: ignore[arg-type]


# ---- fixtures -------------------------------------------------------------------------------------


def make_config(path: Path, **kw: object) -> EngineConfig:
    values: dict[str, object] = {
        "model_path": str(path),
        "max_batch_size": 8,  # 64 concurrent requests queue for these
        "max_batch_tokens": 64,
        "prefill_chunk": 16,  # longer prompts take several steps, next to decode rows
        "max_prompt_tokens": MAX_PROMPT,
        "max_new_tokens": MAX_NEW,
        "prefix_cache_entries": 16,
        "prefix_cache_min_tokens": CACHE_MIN,
    }
    values.update(kw)
    return EngineConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(
    scope="module",
    params=[{"overlap": "off"}, {"overlap": "on"}, {"overlap": "on", "stream_interval": 3}],
    ids=["serial", "overlap", "overlap-interval3"],
)
def loop_settings(request: pytest.FixtureRequest) -> dict[str, object]:
    """Every test here runs on each step loop: events out as each step ends, overlapped with the next step,
    and overlapped with tokens handed out three at a time."""
    return dict(request.param)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path, loop_settings: dict[str, object]) -> Iterator[LocalEngineClient]:
    client = build_engine(make_config(tiny_checkpoint, **loop_settings))
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def tok(engine: LocalEngineClient) -> WorldTokenizer:
    return engine.tokenizer


def prompt_of(engine: LocalEngineClient, n: int, offset: int = 0) -> list[int]:
    """n tokens of natural-ish text (cycled), starting at a varying place."""
    ids = [t for text in TEXTS for t in engine.tokenizer.encode(text)]
    ids = ids[offset % len(ids) :] + ids[: offset % len(ids)]
    return (ids * (1 + n // len(ids)))[:n]


async def wait_idle(engine: LocalEngineClient) -> None:
    # Polls the engine thread's counters (it offers no event to wait on); no time bound of our own,
    # pytest-timeout guards against a hang.
    while engine.stats().slots_in_use or engine.stats().running or engine.stats().waiting:  # noqa: ASYNC110
        await asyncio.sleep(0.005)


def test_model_info(engine: LocalEngineClient, tiny_checkpoint: Path) -> None:
    info = engine.model
    assert (info.n_layer, info.n_embd, info.vocab_size, info.architecture) == (2, 128, 65536, "rwkv7")
    assert info.checkpoint_dtype == "bfloat16"
    assert info.dtype == "float32"
    assert info.id == "local/rwkv7-tiny"
    assert not info.demo
    assert info.max_batch_size == 8


# ---- (a) many concurrent requests equal each run alone -----------------------------------------------


async def test_concurrent_requests_equal_alone_runs(engine: LocalEngineClient) -> None:
    kinds = [
        lambda i: greedy(max_tokens=1 + i % 24),
        lambda i: seeded(1000 + i, max_tokens=24),
        lambda i: seeded(2000 + i, temperature=0.8, top_k=20, max_tokens=20),
        lambda i: seeded(3000 + i, temperature=1.3, top_p=0.9, max_tokens=18),
        lambda i: seeded(
            4000 + i,
            presence_penalty=0.5,
            frequency_penalty=0.3,
            repetition_penalty=0.2,
            penalty_decay=0.99,
            max_tokens=24,
        ),
        lambda i: greedy(stop=("e", "\n"), max_tokens=24),  # common characters: these runs stop early
        lambda i: seeded(5000 + i, stop=("a", "o"), top_k=100, max_tokens=24),
        lambda i: greedy(max_tokens=24, logprobs=True, top_logprobs=5),  # + stop_token_ids and min_tokens below
    ]
    requests: list[GenerationRequest] = []
    for i in range(64):
        prompt = prompt_of(engine, 1 + (i * 7) % 50, offset=i * 13)
        params = kinds[i % len(kinds)](i)
        if i % len(kinds) in (1, 7) or i % 5 == 0:
            # stop_token_ids: a token this request really generates (found by a first run without it).
            probe = await run(engine, request(prompt, params))
            if len(probe.ids) > 4:
                params = replace(params, stop_token_ids=(probe.ids[4],), min_tokens=2 if i % 2 else 0)
        requests.append(request(prompt, params))

    alone = [await run(engine, r) for r in requests]
    together = await asyncio.gather(*(run(engine, clone_request(r)) for r in requests))
    for a, b in zip(alone, together, strict=True):
        assert_same_run(a, b)
    # The mix really exercised the features.
    reasons = {a.reason for a in alone}
    assert {FinishReason.LENGTH, FinishReason.STOP, FinishReason.STOP_SEQUENCE} <= reasons
    assert any(a.request.sampling.min_tokens for a in alone)
    await wait_idle(engine)
    assert engine.stats().slots_in_use == 0


# ---- (b) abandoning the iterator aborts the request ----------------------------------------------------


async def abandon(engine: LocalEngineClient, req: GenerationRequest, how: str) -> None:
    gen = engine.generate(req)
    if how == "aclosing":
        async with contextlib.aclosing(gen) as events:
            async for ev in events:
                if isinstance(ev, Delta):
                    break
    elif how == "aclose":
        async for ev in gen:
            if isinstance(ev, Delta):
                break
        await gen.aclose()
    else:  # a plain break: the loop's async-generator finalizer closes it once it is garbage
        async for ev in gen:
            if isinstance(ev, Delta):
                break
        del gen


@pytest.mark.parametrize("how", ["aclosing", "aclose", "break"])
async def test_abandoning_the_iterator_frees_the_slot(engine: LocalEngineClient, how: str) -> None:
    req = request(prompt_of(engine, 5), seeded(1, max_tokens=MAX_NEW))
    await abandon(engine, req, how)
    # With aclose the abort is posted before it returns: the step in flight may finish, then the slot is
    # freed before any further step. (A plain break closes the generator a few loop iterations later.)
    steps_at_close = engine.stats().steps
    await wait_idle(engine)
    if how != "break":
        assert engine.stats().steps - steps_at_close <= 1
    assert engine.stats().slots_in_use == 0
    # The engine goes on, and the request id is free again.
    again = await run(engine, replace(req, sampling=greedy(max_tokens=3)))
    assert again.reason is FinishReason.LENGTH
    assert len(again.ids) == 3


async def test_abort_ends_with_cancelled(engine: LocalEngineClient) -> None:
    req = request(prompt_of(engine, 5), seeded(2, max_tokens=MAX_NEW), keep_state=True)
    events: list[TokenEvent] = []
    aborted = False
    async for ev in engine.generate(req):
        events.append(ev)
        if isinstance(ev, Delta) and not aborted:
            await engine.abort(req.request_id)
            aborted = True
    result = Run(req, events)
    check_events(result)
    assert result.reason is FinishReason.CANCELLED
    assert 0 < len(result.ids) < MAX_NEW
    assert result.finished.state is not None  # state kept on cancel when asked
    assert result.state.token_count == len(req.prompt) + len(result.ids) - 1
    await engine.abort("no-such-request")  # ignored


async def test_duplicate_running_request_id_is_refused(engine: LocalEngineClient) -> None:
    req = request(prompt_of(engine, 3), seeded(3, max_tokens=MAX_NEW))
    async with contextlib.aclosing(engine.generate(req)) as events:
        first = await anext(events)
        assert isinstance(first, Started | Delta)
        with pytest.raises(AlreadyExists):
            await anext(aiter(engine.generate(replace(req, sampling=greedy()))))
    await wait_idle(engine)


# ---- (c) deadlines ------------------------------------------------------------------------------------


async def test_deadline_in_the_past(engine: LocalEngineClient) -> None:
    result = await run(engine, request(prompt_of(engine, 8), greedy(), deadline=time.monotonic() - 1.0))
    assert result.reason is FinishReason.DEADLINE
    assert result.ids == []


async def test_deadline_passing_during_generation(engine: LocalEngineClient) -> None:
    # 100k tokens cannot be generated before the deadline; the run must end with DEADLINE, not LENGTH.
    req = request(prompt_of(engine, 8), seeded(4, max_tokens=MAX_NEW), deadline=time.monotonic() + 0.3)
    result = await run(engine, req)
    assert result.reason is FinishReason.DEADLINE
    assert len(result.ids) < MAX_NEW
    await wait_idle(engine)


# ---- (d) queue full -----------------------------------------------------------------------------------


async def test_queue_full_is_resource_exhausted(tiny_checkpoint: Path) -> None:
    small = build_engine(make_config(tiny_checkpoint, max_batch_size=1, max_queued=2))
    try:

        async def attempt(i: int) -> Run | ResourceExhausted:
            try:
                return await run(small, request(prompt_of(small, 4 + i), greedy(max_tokens=8)))
            except ResourceExhausted as exc:
                return exc

        results = await asyncio.gather(*(attempt(i) for i in range(20)))
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        admitted = [r for r in results if isinstance(r, Run)]
        # At most one running plus max_queued waiting when 20 arrive at once (more only if some finished
        # between submissions).
        assert refused
        assert len(admitted) >= 2
        for exc in refused:
            assert exc.reason == "QUEUE_FULL"
            assert exc.retry_after is not None
        for r in admitted:
            assert r.reason is FinishReason.LENGTH
            assert len(r.ids) == 8
        await wait_idle(small)
        after = await run(small, request([1, 2, 3], greedy(max_tokens=2)))  # nothing leaked from the queue
        assert len(after.ids) == 2
    finally:
        small.shutdown()


# ---- (e) invalid requests -----------------------------------------------------------------------------


async def submit(engine: LocalEngineClient, req: GenerationRequest) -> None:
    async with contextlib.aclosing(engine.generate(req)) as events:
        async for _ in events:
            pass


@pytest.mark.parametrize(
    ("params", "fields"),
    [
        ({"temperature": -0.5}, ["sampling.temperature"]),
        ({"temperature": 5.5}, ["sampling.temperature"]),
        ({"top_p": -0.1}, ["sampling.top_p"]),
        ({"top_p": 1.5}, ["sampling.top_p"]),
        ({"top_k": -2}, ["sampling.top_k"]),
        ({"top_k": 65537}, ["sampling.top_k"]),
        ({"max_tokens": MAX_NEW + 1}, ["sampling.max_tokens"]),
        # An invalid max_tokens is not also blamed on a min_tokens the client did not get wrong.
        ({"max_tokens": -1, "min_tokens": 0}, ["sampling.max_tokens"]),
        ({"max_tokens": -1, "min_tokens": -2}, ["sampling.max_tokens", "sampling.min_tokens"]),
        ({"max_tokens": 4, "min_tokens": 5}, ["sampling.min_tokens"]),
        (
            {"presence_penalty": 11.0, "frequency_penalty": -3.0},
            ["sampling.presence_penalty", "sampling.frequency_penalty"],
        ),
        ({"repetition_penalty": 10.5}, ["sampling.repetition_penalty"]),
        ({"penalty_decay": 1.5}, ["sampling.penalty_decay"]),
        ({"seed": -1}, ["sampling.seed"]),
        ({"stop": ("",)}, ["sampling.stop"]),
        ({"stop": tuple(str(i) for i in range(17))}, ["sampling.stop"]),
        ({"stop": ("x" * 257,)}, ["sampling.stop"]),
        ({"stop_token_ids": (65536,)}, ["sampling.stop_token_ids"]),
        ({"top_logprobs": 21}, ["sampling.top_logprobs"]),
    ],
)
async def test_invalid_sampling_names_the_field(
    engine: LocalEngineClient, params: dict[str, object], fields: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await submit(engine, request([1, 2, 3], SamplingParams(**params)))  # type: ignore[arg-type]
    assert [v.field for v in info.value.violations] == fields
    for f in fields:
        assert f in str(info.value)
    assert engine.stats().waiting == 0


@pytest.mark.parametrize("bad", [65536, -1, 10**9])
async def test_prompt_token_out_of_range(engine: LocalEngineClient, bad: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        await submit(engine, request([1, bad, 3], greedy()))
    assert info.value.first_field == "prompt"
    assert info.value.reason == "INVALID_TOKEN"


async def test_prompt_too_long(engine: LocalEngineClient) -> None:
    with pytest.raises(InvalidArgument) as info:
        await submit(engine, request([5] * (MAX_PROMPT + 1), greedy()))
    assert info.value.first_field == "prompt"
    assert info.value.reason == "PROMPT_TOO_LONG"
    ok = await run(engine, request([5] * MAX_PROMPT, greedy(max_tokens=1)))  # the limit itself is accepted
    assert len(ok.ids) == 1


# ---- (f) max_tokens = 0 ---------------------------------------------------------------------------------


async def test_max_tokens_zero_reads_the_prompt_and_keeps_the_last_token_pending(engine: LocalEngineClient) -> None:
    prompt = prompt_of(engine, 21, offset=5)
    result = await run(engine, request(prompt, greedy(max_tokens=0), keep_state=True, use_prefix_cache=False))
    assert result.reason is FinishReason.LENGTH
    assert result.ids == []
    assert result.deltas == []
    state = result.state
    assert state.pending_token == prompt[-1]
    assert state.token_count == len(prompt) - 1
    # Resuming with an empty prompt reads the pending token: the same as running the prompt directly.
    direct = await run(engine, request(prompt, greedy(max_tokens=12), use_prefix_cache=False))
    resumed = await run(engine, request((), greedy(max_tokens=12), start_state=state))
    assert_same_greedy(direct, resumed)


async def test_max_tokens_zero_with_a_one_token_prompt(engine: LocalEngineClient) -> None:
    result = await run(engine, request([42], greedy(max_tokens=0), keep_state=True))
    assert result.reason is FinishReason.LENGTH
    assert result.state.pending_token == 42
    assert result.state.token_count == 0
    assert isinstance(result.state, StateSnapshot)
    assert result.state.rnn.wkv.abs().max() == 0  # nothing read yet: still the zero state


# ---- (g) keep_state, resume, fork ------------------------------------------------------------------------


async def test_resume_continues_like_one_uninterrupted_generation(engine: LocalEngineClient) -> None:
    prompt = prompt_of(engine, 12, offset=40)
    whole = await run(engine, request(prompt, greedy(max_tokens=20)))
    first = await run(engine, request(prompt, greedy(max_tokens=8), keep_state=True))
    assert first.state.pending_token == first.ids[-1]
    assert first.state.token_count == len(prompt) + 8 - 1
    rest = await run(engine, request((), greedy(max_tokens=12), start_state=first.state))
    joined = Run(whole.request, [*first.events[:-1], *rest.deltas, whole.finished])
    assert_same_greedy(whole, joined)
    assert first.text + rest.text == whole.text


async def test_resume_of_a_seeded_run_with_inherited_sampler(engine: LocalEngineClient) -> None:
    # Penalties and the random stream carry over: the two halves equal one seeded run exactly.
    params = seeded(77, presence_penalty=0.7, frequency_penalty=0.4, penalty_decay=0.95, max_tokens=20)
    prompt = prompt_of(engine, 9, offset=3)
    whole = await run(engine, request(prompt, params))
    first = await run(engine, request(prompt, replace(params, max_tokens=8), keep_state=True))
    rest_params = replace(params, seed=None, max_tokens=12)
    rest = await run(engine, request((), rest_params, start_state=first.state, inherit_sampler=True))
    assert rest.finished.seed == 77
    assert first.ids + rest.ids == whole.ids
    # Without inheriting, the continuation restarts the penalties and the stream: it differs.
    fresh = await run(engine, request((), replace(params, max_tokens=12), start_state=first.state))
    assert fresh.ids != rest.ids


async def test_fork_gives_identical_continuations_and_leaves_the_snapshot_alone(engine: LocalEngineClient) -> None:
    base = await run(engine, request(prompt_of(engine, 10, offset=17), greedy(max_tokens=5), keep_state=True))
    state = base.state
    assert isinstance(state, StateSnapshot)
    before = (state.rnn.att_x.clone(), state.rnn.wkv.clone(), state.rnn.ffn_x.clone(), state.penalties.clone())
    meta = (state.pending_token, state.token_count, state.position, state.seed)
    a, b = await asyncio.gather(
        run(engine, request((), greedy(max_tokens=10), start_state=state)),
        run(engine, request((), greedy(max_tokens=10), start_state=state, keep_state=True)),
    )
    assert_same_greedy(a, b)
    # A fork with extra prompt tokens goes its own way from the same state.
    c = await run(engine, request(prompt_of(engine, 3), greedy(max_tokens=10), start_state=state))
    assert c.ids != a.ids
    after = (state.rnn.att_x, state.rnn.wkv, state.rnn.ffn_x, state.penalties)
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))
    assert (state.pending_token, state.token_count, state.position, state.seed) == meta
    assert b.state is not state
    assert b.state.token_count == state.token_count + 10


async def test_snapshot_of_a_running_request(engine: LocalEngineClient) -> None:
    req = request(prompt_of(engine, 6), seeded(5, max_tokens=MAX_NEW))
    async with contextlib.aclosing(engine.generate(req)) as events:
        async for ev in events:
            if isinstance(ev, Delta):
                break
        snap = await engine.snapshot(req.request_id)
        assert snap.token_count >= 6
        assert snap.pending_token is not None
    await wait_idle(engine)


# ---- (h) export / import -------------------------------------------------------------------------------


async def test_export_import_round_trip(engine: LocalEngineClient) -> None:
    params = seeded(9, presence_penalty=0.5, max_tokens=6)
    base = await run(engine, request(prompt_of(engine, 14, offset=8), params, keep_state=True))
    data = await engine.export_state(base.state)
    assert isinstance(data, bytes)
    imported = await engine.import_state(data)
    assert isinstance(imported, StateSnapshot)
    original = base.state
    assert isinstance(original, StateSnapshot)
    assert (imported.pending_token, imported.token_count, imported.seed, imported.position) == (
        original.pending_token,
        original.token_count,
        original.seed,
        original.position,
    )
    for x, y in zip(
        (imported.rnn.att_x, imported.rnn.wkv, imported.rnn.ffn_x, imported.penalties, imported.seen),
        (original.rnn.att_x, original.rnn.wkv, original.rnn.ffn_x, original.penalties, original.seen),
        strict=True,
    ):
        assert torch.equal(x, y)
    cont = replace(params, seed=None, max_tokens=10)
    a = await run(engine, request((), cont, start_state=original, inherit_sampler=True))
    b = await run(engine, request((), cont, start_state=imported, inherit_sampler=True))
    assert a.ids == b.ids
    assert (await run(engine, request((), greedy(), start_state=imported))).ids == (
        await run(engine, request((), greedy(), start_state=original))
    ).ids


def foreign_state(engine: LocalEngineClient, model_version: str, n_layer: int = 2) -> StateSnapshot:
    s = engine.model
    V = s.vocab_size
    return StateSnapshot(
        rnn=RnnState(
            torch.zeros(n_layer, s.n_embd),
            torch.zeros(n_layer, s.n_head, s.head_size, s.head_size),
            torch.zeros(n_layer, s.n_embd),
        ),
        pending_token=1,
        token_count=1,
        penalties=torch.zeros(V),
        seen=torch.zeros(V, dtype=torch.bool),
        seed=0,
        position=0,
        model_version=model_version,
    )


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"\xff" * 64, b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}'],
    ids=["empty", "text", "ff", "bad-header"],
)
async def test_import_garbage_is_invalid_state(engine: LocalEngineClient, data: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        await engine.import_state(data)
    assert info.value.first_field == "state"


async def test_import_state_of_another_model(engine: LocalEngineClient) -> None:
    other = to_bytes(foreign_state(engine, "0" * 64))
    with pytest.raises(InvalidArgument) as info:
        await engine.import_state(other)
    assert info.value.first_field == "state"
    assert "model version" in str(info.value)
    # Right version, wrong shape (a 3-layer state).
    wrong_shape = to_bytes(foreign_state(engine, engine.model.version, n_layer=3))
    with pytest.raises(InvalidArgument) as info:
        await engine.import_state(wrong_shape)
    assert info.value.first_field == "state"
    # The right version and shape is accepted (the test above is not refusing everything).
    assert await engine.import_state(to_bytes(foreign_state(engine, engine.model.version)))


@pytest.mark.parametrize(
    "change",
    [{"pending_token": 65536}, {"pending_token": -1}, {"token_count": -1}, {"position": -5}],
    ids=["pending-too-big", "pending-negative", "count-negative", "position-negative"],
)
async def test_import_state_with_bad_metadata(engine: LocalEngineClient, change: dict[str, int]) -> None:
    # An out-of-range pending token would be read first on resume and fail every request in that step.
    data = to_bytes(replace(foreign_state(engine, engine.model.version), **change))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as info:
        await engine.import_state(data)
    assert info.value.first_field == "state"


async def test_start_state_of_another_model_is_refused(engine: LocalEngineClient) -> None:
    with pytest.raises(InvalidArgument) as info:
        await submit(engine, request((), greedy(), start_state=foreign_state(engine, "f" * 64)))
    assert info.value.first_field == "state"


# ---- (i) prefix cache -----------------------------------------------------------------------------------


async def test_prefix_cache_serves_a_repeated_prompt(engine: LocalEngineClient) -> None:
    text = "A long and unique system prompt for the prefix cache test, repeated verbatim twice. " * 2
    prompt = engine.tokenizer.encode(text)
    assert len(prompt) > CACHE_MIN
    before = engine.stats()
    first = await run(engine, request(prompt, greedy(max_tokens=10)))
    mid = engine.stats()
    second = await run(engine, request(prompt, greedy(max_tokens=10)))
    after = engine.stats()
    uncached = await run(engine, request(prompt, greedy(max_tokens=10), use_prefix_cache=False))
    assert first.started.cached_tokens == 0
    assert mid.prefix_cache_misses == before.prefix_cache_misses + 1
    assert mid.prefix_cache_hits == before.prefix_cache_hits
    # The whole prompt but its last token was cached (the last one must be read for logits).
    assert second.started.cached_tokens == second.finished.usage.cached_tokens == len(prompt) - 1
    assert after.prefix_cache_hits == mid.prefix_cache_hits + 1
    assert uncached.started.cached_tokens == 0
    assert engine.stats().prefix_cache_hits == after.prefix_cache_hits  # use_prefix_cache=False: no lookup
    assert_same_greedy(uncached, first)
    assert_same_greedy(uncached, second)
    # A longer prompt starting with the cached one reuses it too.
    longer = await run(engine, request([*prompt, *engine.tokenizer.encode(" And more.")], greedy(max_tokens=4)))
    assert longer.started.cached_tokens >= len(prompt) - 1


async def test_cache_points_split_the_prefill(engine: LocalEngineClient) -> None:
    system = engine.tokenizer.encode(
        "System: you are a cache point test, with a system prompt that is long enough.\n\n"
    )
    assert len(system) >= CACHE_MIN
    user1 = engine.tokenizer.encode("User: hi\n\nAssistant:")
    user2 = engine.tokenizer.encode("User: bye\n\nAssistant:")
    await run(engine, request([*system, *user1], greedy(max_tokens=2), cache_points=(len(system),)))
    other = await run(engine, request([*system, *user2], greedy(max_tokens=6)))
    assert other.started.cached_tokens == len(system)
    plain = await run(engine, request([*system, *user2], greedy(max_tokens=6), use_prefix_cache=False))
    assert_same_greedy(plain, other)


# ---- (j) stop strings split across tokens -----------------------------------------------------------------


def clean_boundaries(tok: WorldTokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """(token index k, character offset) where the text of ids[:k] ends on a whole character."""
    out = []
    for k in range(1, len(ids)):
        head = tok.decode_bytes(ids[:k])
        with contextlib.suppress(UnicodeDecodeError):
            out.append((k, len(head.decode("utf-8"))))
    return out


@pytest.mark.parametrize("offset", [0, 25, 61])
async def test_stop_string_across_tokens_is_never_emitted(
    engine: LocalEngineClient, tok: WorldTokenizer, offset: int
) -> None:
    prompt = prompt_of(engine, 12, offset=offset)
    ref = await run(engine, request(prompt, greedy(max_tokens=24)))
    text = ref.text
    assert text == tok.decode(ref.ids)
    # A stop of 4 characters straddling a token boundary, taken from a clean stretch of the text.
    spots = [
        (k, c)
        for k, c in clean_boundaries(tok, ref.ids)
        if 2 <= c <= len(text) - 2 and "\ufffd" not in text[c - 2 : c + 2] and len(tok.decode(ref.ids[k : k + 1])) >= 2
    ]
    assert spots, text
    _, c = spots[len(spots) // 2]
    stop = text[c - 2 : c + 2]
    cut = text.find(stop)
    result = await run(engine, request(prompt, greedy(max_tokens=24, stop=(stop, "never-there-\u2603"))))
    assert result.reason is FinishReason.STOP_SEQUENCE
    assert result.text == text[:cut]
    assert result.ids == ref.ids[: len(result.ids)]
    assert stop in tok.decode(result.ids)  # the tokens that completed the stop were generated...
    emitted = ""
    for d in result.deltas:
        emitted += d.text
        assert stop not in emitted  # ...but its text never went out


# ---- (k) streamed text equals the decode of all ids ----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Once upon a time, in a land far away, there lived",
        "从前有一座山，山里有一座庙，庙里有个老和尚",
        "🙂🙃😉 👩🏽‍🚀👨‍👩‍👧‍👦🏳️‍🌈 🫠",
    ],
    ids=["english", "chinese", "emoji"],
)
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
async def test_streamed_text_is_the_decode_of_the_ids(
    engine: LocalEngineClient, tok: WorldTokenizer, text: str, sampling: str
) -> None:
    params = greedy(max_tokens=24) if sampling == "greedy" else seeded(31, max_tokens=24, temperature=1.5)
    result = await run(engine, request(tok.encode(text), params))
    assert len(result.ids) == 24
    # Streaming holds back split characters; at the end an unfinished one comes out as U+FFFD, exactly as
    # the one-shot decode (errors="replace") renders it, so the two agree for every run.
    assert result.text == tok.decode(result.ids)


# A "scripted" model: every block's output projections are zero, so the logits depend on the current token
# alone, and the head is set up so that greedy decoding cycles through CYCLE. "🫠" is three byte-level tokens
# (b"\xf0\x9f", b"\xab", b"\xa0") that are not valid UTF-8 on their own.
CYCLE_TEXT = "🫠 ok"


@pytest.fixture(scope="module")
def scripted(
    tmp_path_factory: pytest.TempPathFactory, engine: LocalEngineClient, loop_settings: dict[str, object]
) -> Iterator[LocalEngineClient]:
    cycle = engine.tokenizer.encode(CYCLE_TEXT)
    assert len(cycle) == 4
    shape = model_shape(1, 128)
    t = generate_state_dict(shape, seed=5, dtype=torch.float32)
    t["blocks.0.att.output.weight"].zero_()
    t["blocks.0.ffn.value.weight"].zero_()
    for name in ("blocks.0.ln0", "ln_out"):
        t[f"{name}.weight"].fill_(1.0)
        t[f"{name}.bias"].zero_()
    for cur, nxt in zip(cycle, cycle[1:] + cycle[:1], strict=True):
        h = torch.nn.functional.layer_norm(t["emb.weight"][cur], (shape.n_embd,))
        t["head.weight"][nxt] = 0.5 * h  # logit ~0.5 * n_embd = 64 for the successor, ~N(0, 1.5) for others
    path = write_checkpoint(t, tmp_path_factory.mktemp("scripted") / "scripted.pth")
    client = build_engine(make_config(path, max_batch_size=2, **loop_settings))
    yield client
    client.shutdown()


async def test_scripted_model_cycles(scripted: LocalEngineClient) -> None:
    tok = scripted.tokenizer
    cycle = tok.encode(CYCLE_TEXT)
    result = await run(scripted, request(cycle[-1:], greedy(max_tokens=12)))
    assert result.ids == cycle * 3
    assert result.text == CYCLE_TEXT * 3
    # Deltas of the byte pieces carry no text until the character is complete; none carries U+FFFD.
    assert all("\ufffd" not in d.text for d in result.deltas)


async def test_split_character_at_the_end_is_flushed_as_replacement(scripted: LocalEngineClient) -> None:
    tok = scripted.tokenizer
    cycle = tok.encode(CYCLE_TEXT)
    result = await run(scripted, request(cycle[-1:], greedy(max_tokens=5)))
    assert result.ids == [*cycle, cycle[0]]
    assert result.text == CYCLE_TEXT + "\ufffd" == tok.decode(result.ids)
    assert result.reason is FinishReason.LENGTH


@pytest.mark.parametrize(
    ("stop", "text", "tokens"),
    [
        ("🫠", "", 3),  # the stop is exactly one character made of three byte tokens
        ("ok🫠", "🫠 ", 7),  # spans a word token and a split character
        (" ok🫠 o", "🫠", 8),
        ("k🫠", "🫠 o", 7),  # starts inside a token
    ],
)
async def test_stop_made_of_split_characters(scripted: LocalEngineClient, stop: str, text: str, tokens: int) -> None:
    cycle = scripted.tokenizer.encode(CYCLE_TEXT)
    result = await run(scripted, request(cycle[-1:], greedy(max_tokens=20, stop=(stop,))))
    assert result.reason is FinishReason.STOP_SEQUENCE
    assert result.text == text
    assert len(result.ids) == tokens


async def test_abort_releases_text_held_for_a_possible_stop(scripted: LocalEngineClient) -> None:
    # With this stop, the text of the last two cycles is always a possible start of it, so it is held back.
    tok = scripted.tokenizer
    cycle = tok.encode(CYCLE_TEXT)
    req = request(cycle[-1:], greedy(max_tokens=MAX_NEW, stop=(CYCLE_TEXT * 2 + "!",)))
    events: list[TokenEvent] = []
    aborted = False
    async for ev in scripted.generate(req):
        events.append(ev)
        streamed = Run(req, events)
        if not aborted and len(streamed.ids) >= 10:
            assert len(streamed.text) < len(tok.decode(streamed.ids))  # something is held
            await scripted.abort(req.request_id)
            aborted = True
    result = Run(req, events)
    check_events(result)
    assert result.reason is FinishReason.CANCELLED
    # Everything generated came out in the end (an unfinished character as U+FFFD, like decode).
    assert result.text == tok.decode(result.ids)


@pytest.mark.parametrize(("max_tokens", "reason"), [(1, FinishReason.LENGTH), (5, FinishReason.STOP)])
async def test_other_endings_release_held_text(
    scripted: LocalEngineClient, max_tokens: int, reason: FinishReason
) -> None:
    # From "🫠" the model says " ok", which starts the stop " ok!": held. Then max_tokens, or the stop token
    # id of the next piece, ends the run: the held " ok" must come out.
    cycle = scripted.tokenizer.encode(CYCLE_TEXT)
    params = greedy(max_tokens=max_tokens, stop=(" ok!",), stop_token_ids=(cycle[0],))
    result = await run(scripted, request(cycle[:3], params))
    assert result.reason is reason
    assert result.text == " ok"
    assert result.ids == [cycle[3], cycle[0]][:max_tokens]


# ---- (l) min_tokens ----------------------------------------------------------------------------------------


async def test_min_tokens_holds_off_stop_tokens(engine: LocalEngineClient) -> None:
    prompt = prompt_of(engine, 7, offset=11)
    ref = await run(engine, request(prompt, greedy(max_tokens=12)))
    first = ref.ids[0]
    stopped = await run(engine, request(prompt, greedy(max_tokens=12, stop_token_ids=(first,))))
    assert stopped.reason is FinishReason.STOP
    assert stopped.ids == [first]  # the stop token is reported...
    assert stopped.text == ""  # ...but has no text
    held = await run(engine, request(prompt, greedy(max_tokens=12, stop_token_ids=(first,), min_tokens=4)))
    assert held.ids[0] != first
    assert first not in held.ids[:4]
    assert len(held.ids) >= 4
    # The replacement is the best token other than the banned one.
    top = [t for t, _, _ in ref.logprobs[0].top]
    assert held.ids[0] == next(t for t in top if t != first)
    if held.reason is FinishReason.STOP:
        assert held.ids[-1] == first


async def test_min_tokens_bans_every_stop_token_until_reached(engine: LocalEngineClient) -> None:
    # Every token greedy would pick is a stop token here: with min_tokens = max_tokens none of them (nor
    # end-of-text, 0) may appear, and the run ends by length.
    prompt = prompt_of(engine, 5, offset=2)
    ref = await run(engine, request(prompt, greedy(max_tokens=6)))
    result = await run(engine, request(prompt, greedy(max_tokens=6, min_tokens=6, stop_token_ids=tuple(ref.ids))))
    assert result.reason is FinishReason.LENGTH
    assert len(result.ids) == 6
    assert not set(result.ids) & {0, *ref.ids}


# ---- (m) seeds ------------------------------------------------------------------------------------------


async def test_seeds(engine: LocalEngineClient) -> None:
    prompt = prompt_of(engine, 6, offset=30)
    a = await run(engine, request(prompt, seeded(42, max_tokens=16)))
    b = await run(engine, request(prompt, seeded(42, max_tokens=16)))
    c = await run(engine, request(prompt, seeded(43, max_tokens=16)))
    assert a.ids == b.ids
    assert a.ids != c.ids
    # Without a seed the engine picks one and reports it; that seed reproduces the run.
    d = await run(engine, request(prompt, replace(seeded(0, max_tokens=16), seed=None)))
    e = await run(engine, request(prompt, seeded(d.started.seed, max_tokens=16)))
    assert d.ids == e.ids
    assert d.started.seed != 42


# ---- overlap: the same steps, only the host work moved ----------------------------------------------


async def test_overlap_gives_the_same_events_and_states(tiny_checkpoint: Path) -> None:
    """Overlapping moves text decoding and delivery, never a decision: run after run, with nothing else in the
    batch, the two loops give identical tokens, text, logprobs, finish reasons and final states."""
    serial = build_engine(make_config(tiny_checkpoint, overlap="off"))
    overlapped = build_engine(make_config(tiny_checkpoint, overlap="on"))
    try:
        prompt = prompt_of(serial, 40, offset=7)
        emoji = serial.tokenizer.encode(TEXTS[3])
        cases = [
            greedy(max_tokens=24),  # logprobs on
            seeded(7, top_p=0.8, top_k=40, max_tokens=20),
            seeded(8, presence_penalty=0.4, frequency_penalty=0.2, penalty_decay=0.98, max_tokens=20),
            greedy(stop=("e", "a"), max_tokens=24),  # stop strings: text decided at once
            greedy(stop_token_ids=tuple(range(0, 65536, 2)), max_tokens=24),  # an even token stops it
            greedy(min_tokens=3, stop_token_ids=tuple(range(0, 65536, 3)), max_tokens=24),
            seeded(9, temperature=1.5, max_tokens=1),
            greedy(max_tokens=0),
        ]
        for sampling in cases:
            for source in (prompt, emoji):
                a = await run(serial, request(source, sampling, keep_state=True))
                b = await run(overlapped, request(source, sampling, keep_state=True))
                # Not delta by delta: how many tokens one delta carries depends on how fast this test reads.
                assert (a.ids, a.text, a.logprobs) == (b.ids, b.text, b.logprobs), sampling
                assert (a.reason, a.finished.usage) == (b.reason, b.finished.usage)
                sa, sb = a.state, b.state
                assert isinstance(sa, StateSnapshot)
                assert isinstance(sb, StateSnapshot)
                for x, y in (
                    (sa.rnn.att_x, sb.rnn.att_x),
                    (sa.rnn.wkv, sb.rnn.wkv),
                    (sa.rnn.ffn_x, sb.rnn.ffn_x),
                    (sa.penalties, sb.penalties),
                    (sa.seen, sb.seen),
                ):
                    assert torch.equal(x, y), sampling
                assert (sa.pending_token, sa.token_count, sa.position) == (
                    sb.pending_token,
                    sb.token_count,
                    sb.position,
                )
    finally:
        serial.shutdown()
        overlapped.shutdown()


def test_overlap_setting() -> None:
    assert EngineConfig().overlap == "auto"
    assert EngineConfig().overlap_on("cuda")
    assert not EngineConfig().overlap_on("cpu")
    assert EngineConfig(overlap="on").overlap_on("cpu")
    assert not EngineConfig(overlap="off").overlap_on("cuda")
    with pytest.raises(ValueError, match="overlap must be auto, on or off"):
        EngineConfig(overlap="sometimes")
    assert parse_serve_args([], {}).engine.overlap == "auto"
    assert parse_serve_args(["--overlap", "on"], {}).engine.overlap == "on"
    assert parse_serve_args([], {"RWKVD_OVERLAP": "off"}).engine.overlap == "off"


async def test_a_failure_decoding_deferred_text_fails_that_request_alone(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With overlap on, a row's text is decoded after its step; a fault there ends that request with an error
    (its text so far delivered, nothing lost or repeated) and every other request goes on."""
    original = EngineSequence.emit_text
    failed: list[str] = []

    def emit_text(self: EngineSequence) -> None:
        if self.id.startswith("doomed") and self.id not in failed and len(self.generated) >= 3 and self._unemitted:
            failed.append(self.id)
            raise RuntimeError("injected fault decoding text")
        original(self)

    monkeypatch.setattr(EngineSequence, "emit_text", emit_text)
    client = build_engine(make_config(tiny_checkpoint, overlap="on"))
    try:
        prompt = prompt_of(client, 12, offset=3)
        alone = await run(client, request(prompt, greedy(max_tokens=12, ignore_eos=True)))
        doomed = GenerationRequest("doomed-1", tuple(prompt), greedy(max_tokens=12, ignore_eos=True))
        others = [request(prompt, greedy(max_tokens=12, ignore_eos=True)) for _ in range(3)]

        async def events_of(req: GenerationRequest) -> list[TokenEvent]:
            return [ev async for ev in client.generate(req)]

        bad, *good = await asyncio.gather(*(events_of(r) for r in (doomed, *others)))
        assert failed == ["doomed-1"]
        end = bad[-1]
        assert isinstance(end, Finished)
        assert end.reason is FinishReason.ERROR
        assert end.error is not None
        assert "injected fault decoding text" in end.error
        got = [t for e in bad if isinstance(e, Delta) for t in e.token_ids]
        assert got == alone.ids[: len(got)]
        assert len(got) >= 2
        for events, req in zip(good, others, strict=True):
            result = Run(req, events)
            check_events(result)
            assert_same_run(alone, result)
        assert (await run(client, request(prompt, greedy(max_tokens=12, ignore_eos=True)))).ids == alone.ids
    finally:
        client.shutdown()


class RecordingSink:
    """Records each hand-over from the engine as it comes (one list per delivery), and when the end came."""

    def __init__(self) -> None:
        self.outlet = loop_outlet(asyncio.get_running_loop())
        self.deliveries: list[list[TokenEvent]] = []
        self.done = asyncio.Event()

    def deliver(self, events: list[TokenEvent]) -> None:
        self.deliveries.append(list(events))
        if any(isinstance(e, Finished) for e in events):
            self.done.set()


@pytest.mark.parametrize("overlap", ["off", "on"])
async def test_stream_interval_hands_tokens_over_in_groups(tiny_checkpoint: Path, overlap: str) -> None:
    """With --stream-interval 4: the first token at once, then deltas four tokens at a time, the end at once;
    the events themselves are those of an every-token stream."""
    every = build_engine(make_config(tiny_checkpoint, overlap=overlap))
    grouped = build_engine(make_config(tiny_checkpoint, overlap=overlap, stream_interval=4))
    try:
        prompt = prompt_of(every, 10, offset=11)
        sinks = []
        for client in (every, grouped):
            sink = RecordingSink()
            client._engine.submit(request(prompt, seeded(5, max_tokens=19, ignore_eos=True)), sink)
            await asyncio.wait_for(sink.done.wait(), 60)
            sinks.append(sink)
        ones, fours = sinks

        def tokens(delivery: list[TokenEvent]) -> int:
            return sum(len(e.token_ids) for e in delivery if isinstance(e, Delta))

        def deltas(sink: RecordingSink) -> list[tuple[int, tuple[int, ...], str]]:
            return [(e.offset, e.token_ids, e.text) for d in sink.deliveries for e in d if isinstance(e, Delta)]

        assert deltas(ones) == deltas(fours)
        assert {tokens(d) for d in ones.deliveries} <= {0, 1}
        counts = [tokens(d) for d in fours.deliveries if tokens(d)]
        assert counts[0] == 1  # the first token is not held
        assert counts[1:-1] == [4] * (len(counts) - 2)  # then four at a time
        assert 1 <= counts[-1] <= 4  # the rest comes with the end
        assert isinstance(fours.deliveries[-1][-1], Finished)
        assert sum(counts) == 19
    finally:
        every.shutdown()
        grouped.shutdown()


def test_stream_interval_setting() -> None:
    assert EngineConfig().stream_interval == 1
    with pytest.raises(ValueError, match="stream_interval must be at least 1"):
        EngineConfig(stream_interval=0)
    assert parse_serve_args(["--stream-interval", "4"], {}).engine.stream_interval == 4


async def test_a_text_failure_while_the_last_step_runs_ends_the_request_once(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With overlap, a row's text fails in _flush while the step with its last token is already launched: the
    request ends once, with the error, and that step's token for it is dropped (no event after the end)."""
    max_tokens = 6
    original = EngineSequence.emit_text
    failed: list[str] = []

    def emit_text(self: EngineSequence) -> None:
        # The deferred token is the one before the last: the step in flight samples the last one.
        if self.id == "doomed" and not failed and len(self.generated) == max_tokens - 1 and self._unemitted:
            failed.append(self.id)
            raise RuntimeError("injected fault decoding text")
        original(self)

    monkeypatch.setattr(EngineSequence, "emit_text", emit_text)
    client = build_engine(make_config(tiny_checkpoint, overlap="on"))
    observer = Recorder()
    client.observe(observer)
    try:
        sink = RecordingSink()
        sampling = greedy(max_tokens=max_tokens, ignore_eos=True)
        client._engine.submit(GenerationRequest("doomed", tuple(prompt_of(client, 12)), sampling), sink)
        await asyncio.wait_for(sink.done.wait(), 60)
        after = await run(client, request(prompt_of(client, 12), sampling))  # the engine goes on
        assert after.reason is FinishReason.LENGTH
    finally:
        client.shutdown()
    events = [e for d in sink.deliveries for e in d]
    assert failed == ["doomed"]
    assert [type(e) for e in events if not isinstance(e, Delta)] == [Started, Finished]
    end = events[-1]
    assert isinstance(end, Finished)
    assert end.reason is FinishReason.ERROR
    assert [e.offset for e in events if isinstance(e, Delta)] == list(range(max_tokens - 1))
    assert [end.reason for end in observer.ends if end.request_id == "doomed"] == [FinishReason.ERROR]


async def test_a_failure_keeping_the_state_fails_that_request_alone(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copying a finished request's state can fail on a device (out of memory): that request ends with an
    error naming it, whether it ended by itself or was cancelled, and the engine goes on."""
    original = Runner.snapshot

    def snapshot(self: Runner, seq: EngineSequence) -> StateSnapshot:
        if seq.id.startswith("doomed"):
            raise RuntimeError("CUDA out of memory (injected)")
        return original(self, seq)

    monkeypatch.setattr(Runner, "snapshot", snapshot)
    client = build_engine(make_config(tiny_checkpoint))
    try:
        prompt = prompt_of(client, 8)
        sampling = greedy(max_tokens=4, ignore_eos=True)
        doomed = GenerationRequest("doomed-1", tuple(prompt), sampling, keep_state=True)
        ended = [ev async for ev in client.generate(doomed)]
        cancelled = client.generate(
            GenerationRequest("doomed-2", tuple(prompt), greedy(max_tokens=100_000, ignore_eos=True), keep_state=True)
        )
        first = await anext(cancelled)
        assert isinstance(first, Started)
        await client.abort("doomed-2")
        rest = [ev async for ev in cancelled]
        for events in (ended, rest):
            end = events[-1]
            assert isinstance(end, Finished)
            assert end.reason is FinishReason.ERROR
            assert end.state is None
            assert end.error == "keeping the state failed: RuntimeError"
        after = await run(client, request(prompt, sampling, keep_state=True))
        assert after.reason is FinishReason.LENGTH
    finally:
        client.shutdown()


async def test_no_state_is_copied_loaded_or_stepped_while_a_step_is_in_flight(tiny_checkpoint: Path) -> None:
    """The overlap's invariant, enforced by the runner: between launch and result the device rewrites the
    step's states, so a snapshot, an admission or a second launch then is refused, not silently wrong."""
    client = build_engine(make_config(tiny_checkpoint))

    def probe() -> list[str]:  # in the engine thread, between steps
        runner = client._runner

        def sequence(name: str) -> EngineSequence:  # its sink is never used: no event leaves this probe
            request = GenerationRequest(name, (1, 2, 3), greedy(max_tokens=4))
            return EngineSequence(request, None, client.tokenizer, seed=1)  # type: ignore[arg-type]

        seq, other = sequence("probe"), sequence("other")
        runner.admit(seq, None)
        plan = StepPlan([PlannedRow(seq, 0, len(seq.feed), True)])
        step = runner.launch(plan)
        refused: list[str] = []
        for attempt in (lambda: runner.snapshot(seq), lambda: runner.launch(plan), lambda: runner.admit(other, None)):
            try:
                attempt()
            except RuntimeError as exc:
                refused.append(str(exc))
        step.result()
        runner.snapshot(seq)  # settled again
        runner.release(seq)
        assert other.slot is None  # the refused admission took no slot
        return refused

    try:
        refused = await asyncio.wrap_future(client._engine.call(probe))
    finally:
        client.shutdown()
    assert len(refused) == 3
    assert all("while a step is in flight" in message for message in refused)
