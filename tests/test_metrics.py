"""GET /metrics on a real server: names, label sets, and counts that match the calls made over each API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from rwkvd.v1 import common_pb2, completions_pb2, completions_pb2_grpc

from service.app import App
from service.engine.local import LocalEngineClient
from service.engine.protocol import EngineStats, ModelInfo
from service.metrics import Metrics
from tests.support import grpc_target, http_base, running_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "metrics-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MODEL = "local/rwkv7-demo"
APIS = {"grpc", "openai", "replicate", "tasks", "internal"}
# Every label an rwkvd_* series may carry: all of them take a handful of values.
ALLOWED_LABELS = {
    "model",
    "api",
    "outcome",
    "code",
    "phase",
    "stage",
    "kind",
    "version",
    "backend",
    "device",
    "dtype",
    "state_dtype",
}
COMPLETION: dict[str, Any] = {"model": MODEL, "prompt": "Hello there", "max_tokens": 6, "ignore_eos": True}
LONG_PROMPT = "The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill. " * 3

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[App]:
    async with running_app(**{"engine.threads": 1, "api_keys": (KEY,), "engine.prefix_cache_min_tokens": 8}) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def client(app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=http_base(app), timeout=30, headers=AUTH) as c:
        yield c


async def scrape(app: App) -> Samples:
    """Every sample of the exposition, fetched without a token (scrapers send none)."""
    async with httpx.AsyncClient(base_url=http_base(app), timeout=30) as bare:
        reply = await bare.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


async def grpc_completion(app: App, max_tokens: int) -> completions_pb2.Completion:
    async with grpc.aio.insecure_channel(grpc_target(app)) as channel:
        stub = completions_pb2_grpc.CompletionServiceStub(channel)
        request = completions_pb2.CreateCompletionRequest(
            prompt=common_pb2.Prompt(text="Hello"),
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0),
        )
        return await stub.CreateCompletion(request, metadata=tuple(AUTH.items()))


async def run_task(client: httpx.AsyncClient) -> dict[str, Any]:
    created = await client.post("/v1/tasks/tmp", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0})
    assert created.status_code == 200
    task_id = created.json()["task_id"]
    while True:
        result: dict[str, Any] = (await client.get(f"/v1/tasks/{task_id}/get_result")).json()
        if result["finished"]:
            return result
        await asyncio.sleep(0.02)


async def test_counts_match_the_calls_made_over_each_api(app: App, client: httpx.AsyncClient) -> None:
    before = await scrape(app)
    replies = [await client.post("/v1/completions", json=COMPLETION) for _ in range(2)]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "ignore_eos": True}
    async with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as streamed:
        assert streamed.status_code == 200
        await streamed.aread()
    assert all(r.status_code == 200 for r in replies)
    grpc_replies = [await grpc_completion(app, 5), await grpc_completion(app, 3)]
    await run_task(client)
    prediction = await client.post("/v1/run", json={"model": MODEL, "input": {"prompt": "Hi", "max_tokens": 3}})
    assert prediction.status_code == 200
    assert prediction.json()["status"] == "succeeded"
    after = await scrape(app)

    assert delta(before, after, "rwkvd_requests_total", api="openai") == 3
    assert delta(before, after, "rwkvd_requests_total", api="openai", outcome="length") == 3
    assert delta(before, after, "rwkvd_requests_total", api="grpc") == 2
    assert delta(before, after, "rwkvd_requests_total", api="tasks") == 1
    assert delta(before, after, "rwkvd_requests_total", api="replicate") == 1  # run in a task the call started
    assert delta(before, after, "rwkvd_requests_total", api="internal") == 0
    openai_tokens = sum(r.json()["usage"]["completion_tokens"] for r in replies) + 4
    assert delta(before, after, "rwkvd_generation_tokens_total", api="openai") == openai_tokens
    assert delta(before, after, "rwkvd_generation_tokens_total", api="grpc") == sum(
        r.usage.completion_tokens for r in grpc_replies
    )
    prompt_tokens = sum(r.json()["usage"]["prompt_tokens"] for r in replies)
    assert delta(before, after, "rwkvd_prompt_tokens_total", api="openai") >= prompt_tokens
    for api, n in (("openai", 3), ("grpc", 2), ("tasks", 1), ("replicate", 1)):
        for histogram in ("rwkvd_e2e_request_latency_seconds", "rwkvd_request_queue_time_seconds"):
            assert delta(before, after, f"{histogram}_count", api=api) == n, (histogram, api)
        # Every request here generated tokens; each got exactly one first token.
        assert delta(before, after, "rwkvd_time_to_first_token_seconds_count", api=api) == n
    # One inter-token gap per token after the first.
    assert delta(before, after, "rwkvd_inter_token_latency_seconds_count", api="openai") == openai_tokens - 3
    assert delta(before, after, "rwkvd_inter_token_latency_seconds_count", api="grpc") == 4 + 2
    assert delta(before, after, "rwkvd_e2e_request_latency_seconds_sum", api="openai") > 0

    steps = delta(before, after, "rwkvd_batch_size_count")
    assert steps > 0
    assert delta(before, after, "rwkvd_batch_size_sum") >= steps  # at least one row per step
    assert delta(before, after, "rwkvd_step_duration_seconds_count", phase="prefill") > 0
    assert delta(before, after, "rwkvd_step_duration_seconds_count", phase="decode") > 0
    assert delta(before, after, "rwkvd_engine_steps_total") == steps
    assert delta(before, after, "rwkvd_step_tokens_sum") >= delta(before, after, "rwkvd_batch_size_sum")

    # Idle now: nothing running or waiting, no slot held.
    assert total(after, "rwkvd_requests_running") == 0
    assert total(after, "rwkvd_requests_waiting") == 0
    assert total(after, "rwkvd_state_slots_used") == 0
    assert total(after, "rwkvd_state_slots_capacity") == 16


async def test_names_and_labels_are_the_documented_low_cardinality_ones(app: App, client: httpx.AsyncClient) -> None:
    await client.post("/v1/completions", json=COMPLETION)
    samples = await scrape(app)
    names = {n for n, _ in samples}
    for expected in (
        "rwkvd_requests_total",
        "rwkvd_time_to_first_token_seconds_bucket",
        "rwkvd_inter_token_latency_seconds_bucket",
        "rwkvd_e2e_request_latency_seconds_bucket",
        "rwkvd_request_queue_time_seconds_bucket",
        "rwkvd_request_prefill_seconds_bucket",
        "rwkvd_request_decode_seconds_bucket",
        "rwkvd_step_duration_seconds_bucket",
        "rwkvd_batch_size_bucket",
        "rwkvd_prompt_tokens_total",
        "rwkvd_generation_tokens_total",
        "rwkvd_prefix_cache_queries_total",
        "rwkvd_prefix_cache_hits_total",
        "rwkvd_requests_running",
        "rwkvd_requests_waiting",
        "rwkvd_state_slots_used",
        "rwkvd_state_slots_capacity",
        "rwkvd_engine_seconds_total",
        "rwkvd_model_info",
        "process_cpu_seconds_total",
    ):
        assert expected in names, expected
    assert "rwkvd_gpu_memory_bytes" not in names  # CPU: no device memory to report
    for name, labels in samples:
        if not name.startswith("rwkvd_"):
            continue
        keys = {k for k, _ in labels} - {"le"}
        assert keys <= ALLOWED_LABELS, (name, keys)
        assert dict(labels)["model"] == MODEL
        assert dict(labels).get("api", "internal") in APIS
    info = [ls for (n, ls), v in samples.items() if n == "rwkvd_model_info" and v == 1]
    assert len(info) == 1
    assert dict(info[0])["backend"] == "torch"
    assert dict(info[0])["state_dtype"] == "float32"


async def test_errors_are_counted_by_api_and_status(app: App, client: httpx.AsyncClient) -> None:
    before = await scrape(app)
    bad = await client.post("/v1/completions", json={**COMPLETION, "temperature": 9})
    assert bad.status_code == 400
    async with httpx.AsyncClient(base_url=http_base(app)) as anonymous:
        assert (await anonymous.post("/v1/completions", json=COMPLETION)).status_code == 401
        assert (await anonymous.post("/v1/tasks/tmp", json={"prompt": "x"})).status_code == 401
    async with grpc.aio.insecure_channel(grpc_target(app)) as channel:
        stub = completions_pb2_grpc.CompletionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateCompletion(completions_pb2.CreateCompletionRequest(), metadata=tuple(AUTH.items()))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = await scrape(app)
    assert delta(before, after, "rwkvd_request_errors_total", api="openai", code="400") == 1
    assert delta(before, after, "rwkvd_request_errors_total", api="openai", code="401") == 1
    assert delta(before, after, "rwkvd_request_errors_total", api="tasks", code="401") == 1
    assert delta(before, after, "rwkvd_request_errors_total", api="grpc", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "rwkvd_request_errors_total") == 4


async def test_a_repeated_long_prompt_hits_the_prefix_cache(app: App, client: httpx.AsyncClient) -> None:
    before = await scrape(app)
    body = {**COMPLETION, "prompt": LONG_PROMPT, "max_tokens": 2}
    first = await client.post("/v1/completions", json=body)
    second = await client.post("/v1/completions", json=body)
    assert first.status_code == second.status_code == 200
    after = await scrape(app)
    assert delta(before, after, "rwkvd_prefix_cache_queries_total") >= 2
    assert delta(before, after, "rwkvd_prefix_cache_hits_total") >= 1
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0
    assert delta(before, after, "rwkvd_prompt_tokens_cached_total", api="openai") == cached
    assert total(after, "rwkvd_prefix_cache_entries") >= 1


async def test_metrics_needs_no_token_but_the_api_does(app: App) -> None:
    async with httpx.AsyncClient(base_url=http_base(app)) as anonymous:
        assert (await anonymous.get("/metrics")).status_code == 200
        assert (await anonymous.post("/metrics")).status_code in (401, 405)  # only GET is open
        assert (await anonymous.post("/v1/completions", json=COMPLETION)).status_code == 401


async def test_openmetrics_when_the_scraper_asks(app: App) -> None:
    async with httpx.AsyncClient(base_url=http_base(app)) as bare:
        reply = await bare.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert reply.headers["content-type"].startswith("application/openmetrics-text")
    assert reply.text.rstrip().endswith("# EOF")


async def test_two_apps_in_one_process_keep_separate_series(app: App, client: httpx.AsyncClient) -> None:
    async with running_app(**{"engine.threads": 1}) as other:
        before = await scrape(other)
        await client.post("/v1/completions", json=COMPLETION)  # on the first app only
        after = await scrape(other)
    assert delta(before, after, "rwkvd_requests_total") == 0


class _OnGpu:
    """The app's engine, reporting device memory as a CUDA engine would."""

    def __init__(self, engine: LocalEngineClient) -> None:
        self._engine = engine

    @property
    def model(self) -> ModelInfo:
        return self._engine.model

    def stats(self) -> EngineStats:
        return self._engine.stats()

    def step_clock(self) -> dict[str, float]:
        return self._engine.step_clock()

    def device_memory(self) -> dict[str, int]:
        return {"allocated": 3 << 30, "reserved": 4 << 30, "total": 80 << 30}


async def test_gpu_memory_and_unknown_api_names(app: App) -> None:
    assert app.engine is not None
    metrics = Metrics(_OnGpu(app.engine))
    metrics.on_rejected("something-else", "resource_exhausted")
    body, _ = metrics.render()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert total(samples, "rwkvd_gpu_memory_bytes", kind="allocated") == 3 << 30
    assert total(samples, "rwkvd_gpu_memory_bytes", kind="total") == 80 << 30
    # A label value outside the documented set folds into "internal".
    assert total(samples, "rwkvd_requests_total", api="internal", outcome="resource_exhausted") == 1


async def test_the_per_token_histogram_is_exposed_exactly_like_a_prometheus_histogram() -> None:
    """rwkvd_inter_token_latency_seconds is observed once per token with plain counters (_TokenHistogram); a
    scrape must read exactly what prometheus_client's Histogram would write for the same observations."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from service.metrics import ITL_BUCKETS, _TokenHistogram

    registry = CollectorRegistry()
    reference = Histogram("ref_seconds", "d", ["model", "api"], buckets=ITL_BUCKETS, registry=registry)
    fast = _TokenHistogram("fast_seconds", "d", ITL_BUCKETS)
    registry.register(fast)
    values = [0.0, 0.0005, 0.001, 0.001000001, 0.004, 0.3, 0.3, 9.99, 20.0, 1e9]
    for api, vs in (("grpc", values), ("openai", values[3:])):
        for v in vs:
            reference.labels("m", api).observe(v)
            fast.series(("m", api)).observe(v)
    text = generate_latest(registry).decode().splitlines()
    ref = sorted(line.removeprefix("ref") for line in text if line.startswith("ref_seconds") and "_created" not in line)
    got = sorted(line.removeprefix("fast") for line in text if line.startswith("fast_seconds"))
    assert got == ref
    assert len(got) == 2 * (len(ITL_BUCKETS) + 1 + 2)  # buckets with +Inf, _count, _sum per label set
