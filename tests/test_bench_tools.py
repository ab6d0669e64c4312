"""The benchmark tools still run: bench/engine.py on the simulated device (bench/simulated_device.py).

No figure is asserted (speed lives in bench/results, never in tests): only that a run completes, labels
itself as simulated and records what it measured, and that the simulated device drives the real engine.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.simulated_device import TEXT
from service.engine.config import EngineConfig
from service.engine.local import build_engine
from service.engine.protocol import Delta, Finished, FinishReason, GenerationRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def test_engine_benchmark_on_the_simulated_device(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    command = [sys.executable, "bench/engine.py", "--size", "tiny", "--device", "cpu", "--threads", "1"]
    command += ["--batch", "2,4", "--prompt-lens", "8", "--temperature", "0", "--decode-tokens", "8"]
    command += ["--simulate-device-ms", "2", "--overlap", "on", "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=240)
    result = json.loads(out.read_text())
    assert result["device"].startswith("simulated device, 2 ms per step")
    assert result["complete"] is True
    assert result["conditions"]["overlap"] is True
    assert [d["batch"] for d in result["decode"]] == [2, 4]
    assert all(d["tokens_per_second"] > 0 and d["roofline_fraction"] is None for d in result["decode"])


@pytest.mark.asyncio
async def test_the_simulated_device_drives_the_real_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import simulated_device
    from service.engine import remote
    from service.engine.runner import Runner

    monkeypatch.setattr(Runner, "launch", Runner.launch)  # both restored after the test
    monkeypatch.setattr(remote, "WORKER_COMMAND", remote.WORKER_COMMAND)
    simulated_device.install(step_ms=1)
    request = GenerationRequest("sim", (1, 2, 3), SamplingParams(max_tokens=20, temperature=0.0, seed=0))
    client = build_engine(EngineConfig(max_batch_size=2, overlap="on"))
    try:
        in_process = [e async for e in client.generate(request)]
    finally:
        client.shutdown()
    # An engine process started from a simulated process is simulated too (bench/serve.py --engine-process on).
    other = await remote.start_engine_process(EngineConfig(max_batch_size=2, overlap="on"), "warning", "text")
    try:
        in_engine_process = [e async for e in other.generate(request)]
    finally:
        await asyncio.to_thread(other.shutdown)
    for events in (in_process, in_engine_process):
        end = events[-1]
        assert isinstance(end, Finished)
        assert end.reason is FinishReason.LENGTH
        text = "".join(e.text for e in events if isinstance(e, Delta))
        assert len(text) >= 20
        assert TEXT.startswith(text)  # seed 0: the fixed text from its start, decoded by the real engine
