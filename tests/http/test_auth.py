"""HTTP bearer auth: the same keys as gRPC, each dialect's 401 shape, and the exemptions clients need."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import rwkv_api

from service.app import App
from tests.support import http_base, running_app

KEY = "sekrit"


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app(api_keys=(KEY, "other")) as running:
        yield running


async def test_each_dialect_refuses_without_a_token_in_its_own_shape(app: App) -> None:
    async with httpx.AsyncClient(base_url=http_base(app)) as http:
        tasks = await http.get("/v1/tasks/list")
        assert tasks.status_code == 401
        assert tasks.json() == {"detail": "missing or invalid bearer token"}
        predictions = await http.post("/v1/predictions", json={"version": "x", "input": {}})
        assert predictions.status_code == 401
        assert predictions.headers["content-type"].startswith("application/problem+json")
        assert predictions.json()["status"] == 401
        wrong = await http.get("/v1/tasks/list", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        openai = await http.post("/v1/chat/completions", json={})
        assert openai.status_code == 401
        assert openai.json()["error"]["code"] == "invalid_api_key"


async def test_the_right_token_passes_and_probes_are_exempt(app: App) -> None:
    async with httpx.AsyncClient(base_url=http_base(app)) as http:
        for key in (KEY, "other"):
            ok = await http.get("/v1/tasks/list", headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        assert (await http.get("/health/live")).status_code == 200
        assert (await http.get("/health/ready")).status_code == 200
        assert (await http.get("/v1/models")).status_code == 200
        # Stream URLs are open (the RockAI SDK sends no token there): an unknown id is a 404, not a 401.
        assert (await http.get("/v1/predictions/doesnotexist/stream")).status_code == 404
        assert (await http.get("/v1/models/local/rwkv7-demo")).status_code == 401


async def test_the_rwkv_api_sdk_with_its_headers_option(app: App) -> None:
    def run() -> str:
        with rwkv_api.Client(http_base(app), headers={"Authorization": f"Bearer {KEY}"}) as client:
            task = client.create("Hi", max_tokens=2)
            assert not isinstance(task, str)
            return task.task_id  # type: ignore[union-attr]

    assert (await asyncio.to_thread(run)).startswith("TMP_")
