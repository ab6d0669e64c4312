"""PredictionManager on the real engine and store: input checks, events and replay, cancel, listing,
chunks never starting like a URL, and what survives a new manager (a restart)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.domain.prediction_input import parse_input
from service.domain.predictions import Prediction, PredictionManager, PredictionStatus, WebhookEvent
from service.domain.prompts import CHAT_STOPS
from service.engine.config import EngineConfig
from service.engine.local import LocalEngineClient, build_engine
from service.errors import InvalidArgument, NotFound
from service.store.sqlite import Store

DEMO = "local/rwkv7-demo"


@pytest.fixture(scope="module")
def engine() -> Iterator[LocalEngineClient]:
    client = build_engine(EngineConfig(max_batch_size=4))
    yield client
    client.shutdown()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path)
    yield s
    await s.close()


async def ended(prediction: Prediction) -> Prediction:
    async for _ in prediction.follow():
        pass
    return prediction


def test_inputs_follow_replicate_naming() -> None:
    parsed = parse_input(
        {
            "prompt": "Plan a day",
            "system_prompt": "You are a guide.",
            "max_new_tokens": 8,
            "min_new_tokens": -1,
            "temperature": 1,
            "top_k": 40,
            "repetition_penalty": 1.15,
            "stop_sequences": "END, STOP",
        }
    )
    assert parsed.prompt == "System: You are a guide.\n\nUser: Plan a day\n\nAssistant:"
    s = parsed.sampling
    assert (s.max_tokens, s.min_tokens, s.temperature, s.top_k) == (8, None, 1.0, 40)
    assert s.multiplicative_repetition_penalty == 1.15
    assert s.stop == (*CHAT_STOPS, "END", "STOP")
    raw = parse_input({"prompt": "a {b}", "prompt_template": "[{system_prompt}] {prompt}", "stop_sequences": ["x"]})
    assert raw.prompt == "[] a {b}"
    assert raw.sampling.stop == ("x",)


@pytest.mark.parametrize(
    ("inputs", "fields"),
    [
        ({}, {"input.prompt"}),
        ({"prompt": 3}, {"input.prompt"}),
        ({"prompt": "x", "foo": 1, "bar": 2}, {"input.foo", "input.bar"}),
        ({"prompt": "x", "top_k": True}, {"input.top_k"}),
        ({"prompt": "x", "max_tokens": "8"}, {"input.max_tokens"}),
        ({"prompt": "x", "prompt_template": "no placeholder"}, {"input.prompt_template"}),
    ],
)
def test_bad_inputs_are_all_named(inputs: dict[str, Any], fields: set[str]) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_input(inputs)
    assert {v.field for v in err.value.violations} == fields


async def test_a_prediction_runs_and_records_its_events(engine: LocalEngineClient, store: Store) -> None:
    manager = PredictionManager(engine, store)
    p = await manager.create({"prompt": "Tell me a story", "max_tokens": 10, "seed": 7}, model=DEMO)
    assert p.status is PredictionStatus.STARTING
    assert len(p.id) == 26
    await ended(p)
    assert p.status is PredictionStatus.SUCCEEDED
    assert p.version == engine.model.version
    assert p.output
    assert "".join(p.output) == "".join(e.data for e in p.events if e.kind == "output")
    kinds = [e.kind for e in p.events]
    assert kinds[0] == "logs"
    assert kinds[-1] == "done"
    assert [e.id for e in p.events] == list(range(1, len(p.events) + 1))
    assert p.metrics["output_token_count"] >= 1
    assert p.metrics["total_time"] >= p.metrics["predict_time"] > 0
    # Replay after any id, also after the end.
    later = [e async for e in p.follow(after=3)]
    assert later == p.events[3:]


async def test_same_seed_same_output_and_version_addressing(engine: LocalEngineClient, store: Store) -> None:
    manager = PredictionManager(engine, store)
    inputs = {"prompt": "Hi", "max_tokens": 8, "seed": 42, "temperature": 1.0}
    a = await ended(await manager.create(inputs, model=DEMO))
    b = await ended(await manager.create(inputs, version=f"{DEMO}:{engine.model.version}"))
    c = await ended(await manager.create(inputs, version=engine.model.version))
    assert a.output == b.output == c.output
    with pytest.raises(NotFound):
        await manager.create(inputs, model="someone/else")
    with pytest.raises(NotFound):
        await manager.create(inputs, version="0" * 64)


async def test_out_of_range_values_are_named_as_the_client_wrote_them(engine: LocalEngineClient, store: Store) -> None:
    manager = PredictionManager(engine, store)
    with pytest.raises(InvalidArgument) as err:
        await manager.create({"prompt": "x", "temperature": 9, "repetition_penalty": 0, "max_tokens": -1}, model=DEMO)
    assert {v.field for v in err.value.violations} == {
        "input.temperature",
        "input.repetition_penalty",
        "input.max_tokens",
    }
    with pytest.raises(InvalidArgument):
        await manager.create({"prompt": "x"}, model=DEMO, webhook="http://x", webhook_events_filter=["bogus"])


async def test_cancel_ends_it_as_canceled(engine: LocalEngineClient, store: Store) -> None:
    manager = PredictionManager(engine, store)
    p = await manager.create({"prompt": "x", "max_tokens": 2000, "min_tokens": 1999}, model=DEMO)
    await manager.cancel(p.id)
    assert p.status is PredictionStatus.CANCELED
    assert p.events[-1].kind == "done"
    assert json.loads(p.events[-1].data) == {"reason": "canceled"}
    done = await ended(await manager.create({"prompt": "y", "max_tokens": 2}, model=DEMO))
    assert (await manager.cancel(done.id)).status is PredictionStatus.SUCCEEDED  # ended ones stay as they are
    with pytest.raises(NotFound):
        await manager.cancel("nope")


async def test_output_chunks_never_start_like_a_url(engine: LocalEngineClient, store: Store) -> None:
    manager = PredictionManager(engine, store)
    p = Prediction(id="x" * 26, model=DEMO, version=engine.model.version, input={})
    manager._output(p, "https://example.com")
    manager._output(p, "data:text/plain")
    assert p.output == ["h", "ttps://example.com", "d", "ata:text/plain"]


async def test_listing_pages_newest_first_and_survives_a_new_manager(engine: LocalEngineClient, tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    manager = PredictionManager(engine, store)
    made = [await ended(await manager.create({"prompt": str(i), "max_tokens": 2}, model=DEMO)) for i in range(3)]
    running = await manager.create({"prompt": "z", "max_tokens": 3000, "min_tokens": 2999}, model=DEMO)
    first, cursor = await manager.list(None, 2)
    second, last = await manager.list(cursor, 2)
    assert [p.id for p in first + second] == [running.id, *[p.id for p in reversed(made)]]
    assert last is None
    with pytest.raises(InvalidArgument):
        await manager.list("not a cursor", 2)
    await store.close()  # like a kill between requests: the running one never recorded its end

    store = await Store.open(tmp_path)
    later = PredictionManager(engine, store)
    try:
        again = await later.get(made[0].id)
        assert (again.status, again.output, again.input) == (PredictionStatus.SUCCEEDED, made[0].output, made[0].input)
        assert [e.data for e in again.events if e.kind == "output"] == made[0].output
        cut = await later.get(running.id)
        assert cut.status is PredictionStatus.FAILED
        assert cut.error == "interrupted by a server restart"
    finally:
        await manager.cancel(running.id)
        await store.close()


async def test_webhook_notifications_follow_the_filter(engine: LocalEngineClient, store: Store) -> None:
    seen: list[tuple[str, WebhookEvent]] = []
    manager = PredictionManager(engine, store, notify=lambda p, e: seen.append((p.id, e)))
    p = await ended(
        await manager.create(
            {"prompt": "x", "max_tokens": 3}, model=DEMO, webhook="http://hook", webhook_events_filter=["completed"]
        )
    )
    assert seen == [(p.id, WebhookEvent.COMPLETED)]
    quiet = await ended(await manager.create({"prompt": "x", "max_tokens": 3}, model=DEMO))
    assert all(pid != quiet.id for pid, _ in seen)  # no webhook URL: nothing to notify
