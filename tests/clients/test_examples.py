"""The examples in clients/examples run against a live server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.clients.conftest import Server

pytestmark = pytest.mark.asyncio(loop_scope="session")

EXAMPLES = Path(__file__).resolve().parents[2] / "clients" / "examples"


async def test_quickstart(server: Server) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "quickstart.py"),
        server.target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    text = out.decode()
    assert "model local/rwkv7-demo" in text
    assert "rejected as expected: ['sampling.temperature']" in text
    assert "async stream matches: True" in text
    assert "not found as expected: ('model', 'nobody/nothing')" in text
    assert "task TMP_" in text
    assert "fork of TMP_" in text
    assert "prediction: " in text
    assert "async task stream matches: True" in text
