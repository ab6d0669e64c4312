"""The examples in clients/examples run against a live server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.clients.conftest import Server

pytestmark = pytest.mark.asyncio(loop_scope="session")

EXAMPLES = Path(__file__).resolve().parents[2] / "clients" / "examples"


async def run_example(name: str, target: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / name),
        target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_quickstart(server: Server) -> None:
    text = await run_example("quickstart.py", server.target)
    assert "model local/rwkv7-demo" in text
    assert "rejected as expected: ['sampling.temperature']" in text
    assert "async stream matches: True" in text
    assert "not found as expected: ('model', 'nobody/nothing')" in text
    assert "task TMP_" in text
    assert "fork of TMP_" in text
    assert "prediction: " in text
    assert "async task stream matches: True" in text


async def test_chat(server: Server) -> None:
    text = await run_example("chat.py", server.target)
    assert "complete_chat: " in text
    assert "session sess_" in text
    assert text.count("new prompt tokens") == 2
    assert "after a cancelled turn: " in text
    assert "imported as sess_" in text
    assert "resumed: True, 4 turns" in text  # the cancelled turn is one too
    assert "not found as expected: SESSION_NOT_FOUND" in text
