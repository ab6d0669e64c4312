"""The benchmark tools still run: bench/engine.py on the simulated device (bench/simulated_device.py).

No figure is asserted (speed lives in bench/results, never in tests): only that a run completes, labels
itself as simulated and records what it measured, and that the simulated device drives the real engine.
"""

from __future__ import annotations

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
    from service.engine.runner import Runner

    monkeypatch.setattr(Runner, "launch", Runner.launch)  # restored after the test
    simulated_device.install(step_ms=1)
    client = build_engine(EngineConfig(max_batch_size=2, overlap="on"))
    try:
        request = GenerationRequest("sim", (1, 2, 3), SamplingParams(max_tokens=20, temperature=0.0, seed=0))
        events = [e async for e in client.generate(request)]
    finally:
        client.shutdown()
    end = events[-1]
    assert isinstance(end, Finished)
    assert end.reason is FinishReason.LENGTH
    text = "".join(e.text for e in events if isinstance(e, Delta))
    assert len(text) >= 20
    assert TEXT.startswith(text)  # seed 0: the fixed text from its start, decoded by the real engine
