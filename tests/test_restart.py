"""A real `rwkvd serve` killed with SIGKILL and started again on the same data directory: finished persistent
tasks, templates and predictions are all there, states included; a task cut off mid-run says so."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

GREEDY = {"max_tokens": 8, "temperature": 0, "top_k": -1, "top_p": 1, "presence_penalty": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def server(data_dir: Path, *options: str) -> AsyncIterator[tuple[httpx.AsyncClient, asyncio.subprocess.Process]]:
    """`rwkvd serve [options]` in its own process (demo model), and an HTTP client for it once it is ready."""
    http_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "serve",
        "--host=127.0.0.1",
        f"--grpc-port={free_port()}",
        f"--http-port={http_port}",
        f"--data-dir={data_dir}",
        *options,
        env={**os.environ, "RWKVD_THREADS": "1"},
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as http:
            end = time.monotonic() + 60
            while True:
                try:
                    if (await http.get("/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < end, "server did not become ready"
                await asyncio.sleep(0.2)
            yield http, proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def finished_result(http: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    while True:
        result = (await http.get(f"/v1/tasks/{task_id}/get_result")).json()
        if result["finished"]:
            return dict(result)
        await asyncio.sleep(0.05)


async def test_a_kill_9_loses_no_finished_task_template_or_prediction(tmp_path: Path) -> None:
    async with server(tmp_path) as (http, proc):
        created = (await http.post("/v1/tasks/create", json={"prompt": "Remember 你好 🌍", **GREEDY})).json()
        task_id = created["task_id"]
        before = await finished_result(http, task_id)
        template_id = (await http.post(f"/v1/tasks/{task_id}/as_template", json={})).json()["task_id"]
        # What continuing the task gives, computed now from its in-memory state (a greedy temporary fork).
        fork = (await http.post(f"/v1/tasks/{task_id}/fork?tmp=true", json={"prompt": " then", **GREEDY})).json()
        expected = (await finished_result(http, fork["task_id"]))["result"]
        prediction = (
            await http.post(
                "/v1/predictions",
                json={"model": "local/rwkv7-demo", "input": {"prompt": "hi", "max_tokens": 6, "seed": 1}},
                headers={"Prefer": "wait"},
            )
        ).json()
        assert prediction["status"] == "succeeded"
        running = (await http.post("/v1/tasks/create", json={"prompt": "x", **GREEDY, "max_tokens": 40000})).json()[
            "task_id"
        ]
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: what is on disk is all there is
        await proc.wait()

    async with server(tmp_path) as (http, _):
        after = (await http.get(f"/v1/tasks/{task_id}/get_result")).json()
        assert after == before
        assert (await http.get(f"/v1/tasks/{task_id}/status")).json()["status"] == 3
        listing = (await http.get("/v1/tasks/list")).json()
        assert {task_id, template_id, running} <= set(listing["db_tasks"])
        # The state came back from its file: continuing gives what the first process would have given.
        continued = (await http.post(f"/v1/tasks/{task_id}/continue", json={"prompt": " then", **GREEDY})).json()
        assert continued["task_id"] == task_id
        assert (await finished_result(http, task_id))["result"] == expected
        from_template = (await http.post(f"/v1/tasks/{template_id}/fork", json={"prompt": "!", **GREEDY})).json()
        assert (await finished_result(http, from_template["task_id"]))["finished"]
        again = (await http.get(f"/v1/predictions/{prediction['id']}")).json()
        for key in ("status", "output", "input", "model", "version"):
            assert again[key] == prediction[key], key
        # The task that was running when the process died reads as finished, not as running forever.
        cut = (await http.get(f"/v1/tasks/{running}/status")).json()
        assert cut["status"] == 3
