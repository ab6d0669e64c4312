"""The server with its engine in a process of its own (--engine-process on): the whole API over it, and what
happens when either process dies.

The rest of the suite runs the in-process engine (the CPU default); RWKVD_TEST_ENGINE_PROCESS=1 runs all of it
on an engine process instead (tests that patch the engine in the test process excepted: their patch does not
reach the other process).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.engine.remote import ProcessEngineClient
from tests.reliability_support import engine_idle
from tests.support import grpc_target, running_app
from tests.test_reliability_load import MIX, checked_burst
from tests.test_restart import server

LONG = {"max_tokens": 40000, "temperature": 0}


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def gone(pid: int) -> bool:
    """Whether a process has exited (a zombie not yet reaped by whoever adopted it counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_500_mixed_streams_over_an_engine_process_match_their_results() -> None:
    settings = {
        "engine_process": "on",
        "engine.max_batch_size": 64,
        "engine.max_queued": 1024,
        "engine.threads": 1,
        "max_temporary_tasks": 4096,
    }
    async with running_app(**settings) as app, grpc.aio.insecure_channel(grpc_target(app)) as channel:
        engine = app.engine
        assert isinstance(engine, ProcessEngineClient)
        assert engine.pid in children(os.getpid())
        kept_before = await engine.states_kept()
        # Tasks over gRPC and HTTP (texts equal to their results), completions, chat, OpenAI SSE, Replicate.
        assert await checked_burst(app, channel, seed=3) == Counter(MIX)
        assert await engine_idle(app)
        # The deleted tasks' states are released in the engine process too.
        for _ in range(300):
            if await engine.states_kept() == kept_before:
                break
            await asyncio.sleep(0.01)
        assert await engine.states_kept() == kept_before
        # Metrics come from the samples the engine process forwards, labelled by the API they came through.
        assert app.http is not None
        async with httpx.AsyncClient() as http:
            exposition = (await http.get(f"http://127.0.0.1:{app.http.port}/metrics")).text
        values: Counter[str] = Counter()
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                if sample.name in ("rwkvd_generation_tokens_total", "rwkvd_engine_steps_total"):
                    values[f"{sample.name}/{sample.labels.get('api', '')}"] += sample.value
        assert values["rwkvd_generation_tokens_total/tasks"] > 0
        assert values["rwkvd_generation_tokens_total/openai"] > 0
        assert values["rwkvd_engine_steps_total/"] > 0


async def test_a_dead_engine_process_ends_the_streams_and_the_server(tmp_path: Path) -> None:
    async with server(tmp_path, "--engine-process=on") as (http, proc):
        (engine,) = children(proc.pid)
        flowing = asyncio.Event()

        async def follow() -> list[str]:
            lines: list[str] = []
            body = {"prompt": "go", "stream": True, **LONG}
            async with http.stream("POST", "/v1/tasks/create", json=body) as reply:
                async for line in reply.aiter_lines():
                    lines.append(line)
                    flowing.set()
            return lines

        follower = asyncio.create_task(follow())
        async with asyncio.timeout(30):
            await flowing.wait()
        os.kill(engine, signal.SIGKILL)
        async with asyncio.timeout(30):
            lines = await follower  # the stream ends (it does not hang on an engine that is gone)
            code = await proc.wait()  # and the server stops, for its supervisor to start it again
        assert code == 1
        # The stream says why it ended, in the task API's own error shape, and closes as usual.
        data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        error = json.loads(data[-2])["error"]
        assert "engine process ended unexpectedly" in error["message"]
        assert error["finish_reason"] == "error"


async def test_a_dead_front_end_takes_its_engine_process_with_it(tmp_path: Path) -> None:
    async with server(tmp_path, "--engine-process=on") as (http, proc):
        (engine,) = children(proc.pid)
        started = await http.post("/v1/tasks/create", json={"prompt": "busy", **LONG})
        assert started.status_code == 200
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        # Its socket closed: the engine process cancels what runs and exits instead of computing for nobody.
        for _ in range(300):
            if gone(engine):
                break
            await asyncio.sleep(0.1)
        assert gone(engine)
