"""The real `rwkvd serve` process: SIGTERM drains (readiness off, in-flight stream finishes, clean exit)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rwkvd.v1 import common_pb2, completions_pb2, completions_pb2_grpc

from service.grpc.server import READINESS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_serving(health: health_pb2_grpc.HealthStub, name: str, within: float = 60.0) -> None:
    end = time.monotonic() + within
    while True:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > end:
            raise TimeoutError("server did not become ready")
        await asyncio.sleep(0.2)


async def test_sigterm_drains_an_in_flight_stream_then_exits(tmp_path: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    max_tokens = 1500  # several seconds of decoding on the demo model: still running when SIGTERM lands
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "serve",
        "--host=127.0.0.1",
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        "--drain-seconds=1.0",
        "--grace-seconds=60",
        f"--data-dir={tmp_path}",
        env={**os.environ, "RWKVD_THREADS": "1"},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await wait_serving(health, READINESS)
            stream = completions_pb2_grpc.CompletionServiceStub(channel).CreateCompletionStream(
                completions_pb2.CreateCompletionStreamRequest(
                    prompt=common_pb2.Prompt(text="Once upon a time"),
                    sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0),
                )
            )
            tokens = 0
            finished = None
            signalled_at = -1
            async for message in stream:
                if message.HasField("delta"):
                    tokens += len(message.delta.token_ids)
                if message.HasField("finished"):
                    finished = message.finished
                if signalled_at < 0 and tokens >= 20:
                    signalled_at = tokens
                    proc.send_signal(signal.SIGTERM)
                    # Draining: not ready, but alive, and still answering on the open connection.
                    async with httpx.AsyncClient() as http:
                        for _ in range(50):
                            ready = await http.get(f"http://127.0.0.1:{http_port}/health/ready")
                            if ready.status_code == 503:
                                break
                            await asyncio.sleep(0.02)
                        assert ready.status_code == 503
                        assert (await http.get(f"http://127.0.0.1:{http_port}/health/live")).status_code == 200
                    not_ready = await health.Check(health_pb2.HealthCheckRequest(service=READINESS))
                    assert not_ready.status == health_pb2.HealthCheckResponse.NOT_SERVING
                    live = await health.Check(health_pb2.HealthCheckRequest(service=""))
                    assert live.status == health_pb2.HealthCheckResponse.SERVING
            assert 0 < signalled_at < max_tokens, "the stream must have been in flight at SIGTERM"
            assert finished is not None
            assert finished.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert tokens == max_tokens == finished.usage.completion_tokens
        code = await asyncio.wait_for(proc.wait(), timeout=60)
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = (await proc.stderr.read()).decode() if proc.stderr else ""
    assert "draining" in log, log
    assert "stopped" in log, log
