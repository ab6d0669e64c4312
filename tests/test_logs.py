"""Structured logs: one request-end line per engine request, with its fields, in JSON and in text."""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
import httpx
import pytest
from rwkvd.v1 import common_pb2, completions_pb2, completions_pb2_grpc

from service.logs import JsonFormatter, TextFormatter
from tests.support import eventually, grpc_target, http_base, running_app

FIELDS = {
    "request_id",
    "api",
    "model",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "queue_seconds",
    "prefill_seconds",
    "ttft_seconds",
    "e2e_seconds",
    "tokens_per_second",
}


def request_ends(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The request-end records as the JSON formatter writes them."""
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == "rwkvd.requests"]


async def test_one_json_line_per_request_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rwkvd.requests")
    async with running_app(**{"engine.threads": 1}) as app:
        async with httpx.AsyncClient(base_url=http_base(app), timeout=30) as client:
            body = {"model": "local/rwkv7-demo", "prompt": "Hello", "max_tokens": 5, "ignore_eos": True}
            replies = [(await client.post("/v1/completions", json=body)).json() for _ in range(2)]
        async with grpc.aio.insecure_channel(grpc_target(app)) as channel:
            sampling = common_pb2.SamplingParams(max_tokens=3, ignore_eos=True)
            await completions_pb2_grpc.CompletionServiceStub(channel).CreateCompletion(
                completions_pb2.CreateCompletionRequest(prompt=common_pb2.Prompt(text="Hi"), sampling=sampling)
            )
        lines = request_ends(caplog)
    assert len(lines) == 3
    assert len({line["request_id"] for line in lines}) == 3
    assert sorted(line["api"] for line in lines) == ["grpc", "openai", "openai"]
    for line in lines:
        assert line.keys() >= FIELDS
        assert line["logger"] == "rwkvd.requests"
        assert line["level"] == "info"
        assert line["model"] == "local/rwkv7-demo"
        assert line["finish_reason"] == "length"
        assert line["e2e_seconds"] >= line["ttft_seconds"] >= line["queue_seconds"] >= 0
        assert line["prefill_seconds"] >= 0
        assert line["tokens_per_second"] > 0
    openai = [line for line in lines if line["api"] == "openai"]
    assert sorted(line["completion_tokens"] for line in openai) == [5, 5]
    assert sum(line["prompt_tokens"] for line in openai) == sum(r["usage"]["prompt_tokens"] for r in replies)
    assert next(line for line in lines if line["api"] == "grpc")["completion_tokens"] == 3


async def test_a_cancelled_request_is_logged_once_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rwkvd.requests")
    async with running_app(**{"engine.threads": 1}) as app:
        async with grpc.aio.insecure_channel(grpc_target(app)) as channel:
            call = completions_pb2_grpc.CompletionServiceStub(channel).CreateCompletionStream(
                completions_pb2.CreateCompletionRequest(
                    prompt=common_pb2.Prompt(text="Hi"),
                    sampling=common_pb2.SamplingParams(max_tokens=100_000, ignore_eos=True),
                )
            )
            async for _ in call:
                break
            call.cancel()
        # The engine ends it at its next step; the line is written then.
        assert await eventually(lambda: bool(request_ends(caplog)))
        lines = request_ends(caplog)
    assert [(line["api"], line["finish_reason"]) for line in lines] == [("grpc", "cancelled")]


def test_formatters_write_structured_fields() -> None:
    record = logging.LogRecord("rwkvd.requests", logging.INFO, __file__, 1, "request ended", None, None)
    record.fields = {"request_id": "r1", "api": "openai", "ttft_seconds": None, "message": "not overridden"}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "request ended"
    assert entry["request_id"] == "r1"
    assert entry["api"] == "openai"
    assert entry["ttft_seconds"] is None
    text = TextFormatter().format(record)
    assert text.endswith("rwkvd.requests: request ended request_id=r1 api=openai message=not overridden")
