"""Every Prometheus metric of rwkvd and its buckets, fed by the engine observer, the API boundaries and scrapes.

Each app has its own CollectorRegistry (several apps in one test process must not share series). Every
rwkvd_* series carries `model`; request series add `api` (grpc, openai, replicate, tasks, internal);
nothing is labelled per request, session or user. Engine gauges (running, waiting, slots, prefix cache,
device memory) are read from the engine at scrape time instead of being pushed from the step loop.
Semantics follow vLLM's metrics under Prometheus names (base units, `_total` on counters).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from service.engine.observer import RequestSample, StepSample
from service.engine.protocol import EngineStats, ModelInfo

APIS = ("grpc", "openai", "replicate", "tasks", "internal")

# Latency buckets (seconds): vLLM's layouts, with finer steps at the low end for small models on a GPU.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ObservedEngine(Protocol):
    """What the scrape-time collector reads (LocalEngineClient)."""

    @property
    def model(self) -> ModelInfo: ...

    def stats(self) -> EngineStats: ...

    def step_clock(self) -> dict[str, float]: ...

    def device_memory(self) -> dict[str, int]: ...


class _ApiSeries:
    """The labelled children of one (model, api), looked up once so the step loop does one dict read."""

    def __init__(self, m: Metrics, api: str) -> None:
        labels = (m.model, api)
        self.ttft = m.time_to_first_token.labels(*labels)
        self.itl = m.inter_token_latency.series(labels)
        self.e2e = m.e2e_latency.labels(*labels)
        self.queue = m.queue_time.labels(*labels)
        self.prefill = m.prefill_time.labels(*labels)
        self.decode = m.decode_time.labels(*labels)
        self.prompt_tokens = m.prompt_tokens.labels(*labels)
        self.cached_tokens = m.cached_prompt_tokens.labels(*labels)
        self.generation_tokens = m.generation_tokens.labels(*labels)


class _Counts:
    """One label set of a _TokenHistogram: counts per bucket (the last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bucket with value <= its bound
        self.sum += value


class _TokenHistogram(Collector):
    """A histogram for once-per-token observations from the engine thread: plain counters, no lock (one writer;
    a scrape copies them), about a tenth of prometheus_client's observe(). Exposed like a Histogram."""

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(b) for b in bounds)
        self._series: dict[tuple[str, str], _Counts] = {}

    def series(self, labels: tuple[str, str]) -> _Counts:
        """The counters of (model, api); created on first use, from the engine thread."""
        counts = self._series.get(labels)
        if counts is None:
            counts = self._series[labels] = _Counts(self._bounds)
        return counts

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["model", "api"])
        for labels, series in list(self._series.items()):
            counts, total = list(series.counts), series.sum
            cumulative, running = [], 0
            for bound, n in zip((*self._bounds, float("inf")), counts, strict=True):
                running += n
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))  # as Histogram writes le
            family.add_metric(list(labels), cumulative, total)
        yield family


class Metrics:
    """The app's metrics: an EngineObserver for the engine, count_error for the front ends, render for /metrics."""

    wants_origin = False

    def __init__(self, engine: ObservedEngine) -> None:
        info = engine.model
        self.model = info.id
        self.registry = CollectorRegistry()
        r = self.registry
        req = ["model", "api"]
        self.requests = Counter(
            "rwkvd_requests",
            "Engine requests ended, by outcome: the finish reason, or the error kind of a refused submission",
            [*req, "outcome"],
            registry=r,
        )
        self.request_errors = Counter(
            "rwkvd_request_errors",
            "API calls that ended in an error, by gRPC status name or HTTP status code",
            [*req, "code"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "rwkvd_time_to_first_token_seconds",
            "From arrival at the engine to the first generated token",
            req,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        # Observed once per generated token: a histogram of plain counters (below), not prometheus_client's.
        self.inter_token_latency = _TokenHistogram(
            "rwkvd_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request",
            ITL_BUCKETS,
        )
        r.register(self.inter_token_latency)
        self.e2e_latency = Histogram(
            "rwkvd_e2e_request_latency_seconds",
            "From arrival at the engine to the request's end",
            req,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "rwkvd_request_queue_time_seconds",
            "Waiting for a state slot, from arrival to the first step that reads the prompt",
            req,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.prefill_time = Histogram(
            "rwkvd_request_prefill_seconds",
            "Reading the prompt, from the first prompt step to the end of the last",
            req,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.decode_time = Histogram(
            "rwkvd_request_decode_seconds",
            "Generating, from the first token to the last",
            req,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "rwkvd_prompt_tokens", "Prompt tokens of ended requests (cached ones included)", req, registry=r
        )
        self.cached_prompt_tokens = Counter(
            "rwkvd_prompt_tokens_cached", "Prompt tokens served from the prefix-state cache", req, registry=r
        )
        self.generation_tokens = Counter(
            "rwkvd_generation_tokens", "Tokens generated by ended requests", req, registry=r
        )
        self.step_duration = Histogram(
            "rwkvd_step_duration_seconds",
            "One engine step (forward, sampling, bookkeeping); phase is prefill when it read any prompt tokens",
            ["model", "phase"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rwkvd_batch_size", "Rows (sequences) per engine step", ["model"], buckets=ROW_BUCKETS, registry=r
        )
        self.step_tokens = Histogram(
            "rwkvd_step_tokens", "Tokens read per engine step", ["model"], buckets=TOKEN_BUCKETS, registry=r
        )
        self.model_info = Gauge(
            "rwkvd_model_info",
            "The served model (value 1)",
            ["model", "version", "backend", "device", "dtype", "state_dtype"],
            registry=r,
        )
        self.model_info.labels(info.id, info.version, info.backend, info.device, info.dtype, info.state_dtype).set(1)
        # Bound children: the step loop must not pay for label lookups.
        self._steps = {p: self.step_duration.labels(self.model, p) for p in ("prefill", "decode")}
        self._batch = self.batch_size.labels(self.model)
        self._step_tokens = self.step_tokens.labels(self.model)
        self._series: dict[str, _ApiSeries] = {}
        r.register(_EngineCollector(engine))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def _api(self, api: str) -> _ApiSeries:
        series = self._series.get(api)
        if series is None:
            # Unknown names fold into "internal": the label set stays the five documented values.
            series = self._series[api] = _ApiSeries(self, api if api in APIS else "internal")
        return series

    # EngineObserver (engine thread)

    def on_step(self, step: StepSample) -> None:
        self._steps["prefill" if step.prefill_tokens else "decode"].observe(step.seconds)
        self._batch.observe(step.rows)
        self._step_tokens.observe(step.prefill_tokens + step.decode_tokens)
        for api, seconds in step.first_tokens:
            self._api(api).ttft.observe(seconds)
        for api, seconds in step.token_gaps:
            self._api(api).itl.observe(seconds)  # a bisect and two additions

    def on_request_end(self, request: RequestSample) -> None:
        s = self._api(request.api)
        self.requests.labels(self.model, _api_label(request.api), request.reason.value).inc()
        s.e2e.observe(request.e2e_seconds)
        s.queue.observe(request.queue_seconds)
        prefill, decode = request.prefill_seconds, request.decode_seconds
        if prefill is not None:
            s.prefill.observe(prefill)
        if decode is not None:
            s.decode.observe(decode)
        usage = request.usage
        s.prompt_tokens.inc(usage.prompt_tokens)
        s.cached_tokens.inc(usage.cached_tokens)
        s.generation_tokens.inc(usage.completion_tokens)

    def on_rejected(self, api: str, kind: str) -> None:
        self.requests.labels(self.model, _api_label(api), kind).inc()

    # Front ends (event loop)

    def count_error(self, api: str, code: str) -> None:
        """An API call that ended in an error: `code` is the gRPC status name or the HTTP status."""
        self.request_errors.labels(self.model, _api_label(api), code).inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (text format, or OpenMetrics when the scraper asks for it) and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


def _api_label(api: str) -> str:
    return api if api in APIS else "internal"


class _EngineCollector(Collector):
    """Engine state read at scrape time (plain reads of engine-thread counters: approximate, never blocking)."""

    def __init__(self, engine: ObservedEngine) -> None:
        self._engine = engine
        self._model = engine.model.id

    def collect(self) -> Iterator[Metric]:
        m = [self._model]
        stats = self._engine.stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            family.add_metric(m, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["model"])
            family.add_metric(m, value)
            return family

        yield gauge("rwkvd_requests_running", "Requests holding a state slot", stats.running)
        yield gauge("rwkvd_requests_waiting", "Requests waiting for a state slot", stats.waiting)
        yield gauge("rwkvd_state_slots_used", "State slots in use", stats.slots_in_use)
        yield gauge("rwkvd_state_slots_capacity", "State slots in the pool (--max-batch-size)", stats.slots_total)
        yield gauge("rwkvd_prefix_cache_entries", "States in the prefix-state cache", stats.prefix_cache_entries)
        queries = stats.prefix_cache_hits + stats.prefix_cache_misses
        yield counter("rwkvd_prefix_cache_queries", "Prefix-state cache lookups", queries)
        yield counter("rwkvd_prefix_cache_hits", "Prefix-state lookups that found a state", stats.prefix_cache_hits)
        clock = self._engine.step_clock()
        yield counter("rwkvd_engine_steps", "Engine steps run", clock.pop("steps", stats.steps))
        busy = CounterMetricFamily(
            "rwkvd_engine_seconds", "Engine thread time by stage of the step loop", labels=["model", "stage"]
        )
        for stage, seconds in clock.items():
            busy.add_metric([self._model, stage], seconds)
        yield busy
        memory = self._engine.device_memory()
        if memory:
            family = GaugeMetricFamily(
                "rwkvd_gpu_memory_bytes", "GPU memory: allocated and reserved by torch, total", labels=["model", "kind"]
            )
            for kind, value in memory.items():
                family.add_metric([self._model, kind], value)
            yield family
