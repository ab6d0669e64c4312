"""A real `rwkvd serve` killed with SIGKILL while it is busy (tests/test_restart.py kills a quiet one): what
tests/test_restart.py leaves out.

* Clients streaming from it when it dies see their stream end with an error, never a hang.
* After the restart every prediction and persistent task the store holds reads back without a server error:
  those that had ended as they ended, those cut off as failed ("interrupted by a server restart") whose
  streams replay to an error and a done event; a new request runs as usual.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx

from tests.reliability_support import parse_sse
from tests.test_restart import finished_result, server

MODEL = "local/rwkv7-demo"
LONG: dict[str, Any] = {"max_tokens": 40000, "temperature": 0}


async def all_predictions(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Every prediction, page by page."""
    found: list[dict[str, Any]] = []
    url: str | None = "/v1/predictions?page_size=7"
    while url is not None:
        page = await http.get(url)
        assert page.status_code == 200, page.text
        found += page.json()["results"]
        url = page.json()["next"]
    return found


async def test_a_kill_9_under_load_leaves_a_readable_store(tmp_path: Path) -> None:
    async with server(tmp_path) as (http, proc):
        # Some ended, some running, some just created: whatever the store holds when the process dies.
        ended = [
            (
                await http.post(
                    "/v1/predictions",
                    json={"model": MODEL, "input": {"prompt": f"done {i}", "max_tokens": 3}},
                    headers={"Prefer": "wait"},
                )
            ).json()
            for i in range(3)
        ]
        assert {p["status"] for p in ended} == {"succeeded"}
        running = (await http.post("/v1/predictions", json={"model": MODEL, "input": {"prompt": "run", **LONG}})).json()
        task = (await http.post("/v1/tasks/create", json={"prompt": "A long one", **LONG})).json()["task_id"]
        creating = [
            asyncio.create_task(
                http.post("/v1/predictions", json={"model": MODEL, "input": {"prompt": f"new {i}", **LONG}})
            )
            for i in range(20)
        ]

        flowing = asyncio.Event()

        async def follow() -> BaseException | None:
            """Reads the running prediction's stream until the server dies; what ended it."""
            try:
                async with http.stream("GET", running["urls"]["stream"]) as reply:
                    async for chunk in reply.aiter_raw():
                        if b"event: output" in chunk:
                            flowing.set()
            except httpx.HTTPError as exc:
                return exc
            return None

        follower = asyncio.create_task(follow())
        async with asyncio.timeout(30):
            await flowing.wait()  # the stream is open and output is flowing
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        # The client learns of it (a transport error, or the body just ends): it does not wait forever.
        async with asyncio.timeout(30):
            await follower
        await asyncio.gather(*creating, return_exceptions=True)

    async with server(tmp_path) as (http, _):
        stored = await all_predictions(http)
        by_id = {p["id"]: p for p in stored}
        assert len(by_id) == len(stored), "a prediction listed twice"
        assert {p["id"] for p in ended} | {running["id"]} <= set(by_id)
        for p in ended:
            again = by_id[p["id"]]
            assert (again["status"], again["output"]) == ("succeeded", p["output"])
        for p in stored:
            assert p["status"] in ("succeeded", "failed", "canceled"), p
            one = await http.get(f"/v1/predictions/{p['id']}")
            assert one.status_code == 200
            assert one.json()["status"] == p["status"]
        cut = by_id[running["id"]]
        assert cut["status"] == "failed"
        assert cut["error"] == "interrupted by a server restart"
        async with http.stream("GET", f"/v1/predictions/{running['id']}/stream") as replay:
            events = parse_sse(await replay.aread())
        assert [e.name for e in events][-2:] == ["error", "done"]

        result = await finished_result(http, task)
        assert result["finished"]
        assert (await http.get(f"/v1/tasks/{task}/status")).json()["status"] == 3
        listing = (await http.get("/v1/tasks/list")).json()
        assert task in listing["db_tasks"]

        # And the server works as before.
        fresh = await http.post(
            "/v1/predictions",
            json={"model": MODEL, "input": {"prompt": "again", "max_tokens": 3}},
            headers={"Prefer": "wait"},
        )
        assert fresh.json()["status"] == "succeeded"
