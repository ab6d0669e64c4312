"""Prediction webhooks, received by a local server: which events post, the final body, retries, no blocking."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import replicate
from fastapi import FastAPI, Request, Response

from service.app import App
from service.http.server import HttpServer
from tests.support import http_base, running_app

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEMO = "local/rwkv7-demo"


class Receiver:
    """Records every POST by hook name; "fail-once…" hooks answer 500 first, "blocked…" ones wait for `gate`."""

    def __init__(self) -> None:
        self.posts: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.attempts: dict[str, int] = defaultdict(int)
        self.gate = asyncio.Event()
        self.changed = asyncio.Condition()
        self.app = FastAPI()
        self.app.add_api_route("/hook/{name}", self.hook, methods=["POST"])
        self.server = HttpServer(self.app, "127.0.0.1", 0, grace_seconds=1)

    async def hook(self, name: str, request: Request) -> Response:
        self.attempts[name] += 1
        if name.startswith("fail-once") and self.attempts[name] == 1:
            return Response(status_code=500)
        if name.startswith("blocked"):
            await self.gate.wait()
        body = await request.json()
        async with self.changed:
            self.posts[name].append(body)
            self.changed.notify_all()
        return Response(status_code=200)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.port}/hook/{name}"

    async def until_completed(self, name: str, within: float = 10.0) -> list[dict[str, Any]]:
        """The posts of `name` once one carries an ended prediction."""

        def ended() -> bool:
            return any(p["status"] in ("succeeded", "failed", "canceled") for p in self.posts[name])

        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(ended)
        return self.posts[name]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app() -> AsyncIterator[App]:
    async with running_app() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.server.start()
    yield r
    r.gate.set()
    await r.server.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def http(app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=http_base(app), timeout=30) as c:
        yield c


async def create(http: httpx.AsyncClient, max_tokens: int = 16, **fields: Any) -> dict[str, Any]:
    body = {"input": {"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0}, **fields}
    reply = await http.post(f"/v1/models/{DEMO}/predictions", json=body, headers={"Prefer": "wait"})
    assert reply.status_code == 201, reply.text
    result: dict[str, Any] = reply.json()
    return result


async def test_all_events_by_default(http: httpx.AsyncClient, receiver: Receiver) -> None:
    created = await create(http, max_tokens=32, webhook=receiver.url("all"))
    assert created["webhook"] == receiver.url("all")
    assert created["webhook_events_filter"] == ["start", "output", "logs", "completed"]
    posts = await receiver.until_completed("all")
    assert len(posts) >= 2  # start, output/logs at most every 500 ms, completed (which may absorb them)
    # Each post shows the prediction as it is when sent; the start one normally while it runs.
    assert posts[0]["status"] in ("processing", "succeeded")
    assert posts[-1]["status"] == "succeeded"
    assert posts[-1]["output"] == created["output"]
    assert posts[-1]["data"]["output"] == created["output"]  # the full prediction JSON, RockAI copy too
    assert posts[-1]["urls"]["get"].endswith(f"/v1/predictions/{created['id']}")
    assert all(p["id"] == created["id"] for p in posts)


async def test_events_filter(app: App, http: httpx.AsyncClient, receiver: Receiver) -> None:
    await create(http, webhook=receiver.url("completed"), webhook_events_filter=["completed"])
    await create(http, webhook=receiver.url("start-completed"), webhook_events_filter=["start", "completed"])
    # The replicate client sends the same fields; webhook_completed means the end only.
    client = replicate.Client(api_token="x", base_url=http_base(app))
    await asyncio.to_thread(
        lambda: client.predictions.create(
            model=DEMO, input={"prompt": "Hi", "max_tokens": 4}, webhook_completed=receiver.url("client")
        )
    )
    for name in ("completed", "start-completed", "client"):
        await receiver.until_completed(name)
    await asyncio.sleep(0.7)  # past the output/logs throttle: nothing more may come
    assert [p["status"] for p in receiver.posts["completed"]] == ["succeeded"]
    assert len(receiver.posts["start-completed"]) == 2
    assert receiver.posts["start-completed"][-1]["status"] == "succeeded"
    assert [p["status"] for p in receiver.posts["client"]] == ["succeeded"]
    assert receiver.posts["client"][0]["webhook_events_filter"] == ["completed"]


async def test_a_failed_delivery_is_retried(http: httpx.AsyncClient, receiver: Receiver) -> None:
    created = await create(http, webhook=receiver.url("fail-once"), webhook_events_filter=["completed"])
    posts = await receiver.until_completed("fail-once")
    assert receiver.attempts["fail-once"] == 2
    assert posts[0]["output"] == created["output"]


async def test_a_slow_receiver_never_blocks_generation(http: httpx.AsyncClient, receiver: Receiver) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    created = await create(http, max_tokens=32, webhook=receiver.url("blocked"))
    assert created["status"] == "succeeded"
    assert loop.time() - start < 5
    assert receiver.attempts["blocked"] == 1  # the start post, still held by the receiver
    assert receiver.posts["blocked"] == []
    receiver.gate.set()
    posts = await receiver.until_completed("blocked")
    assert posts[-1]["output"] == created["output"]
