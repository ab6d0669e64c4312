"""Test helpers: a real rwkvd app on loopback ports chosen by the OS, and tiny checkpoints."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from service.config import build_config
from service.engine.generator import generate_state_dict, model_shape, write_checkpoint

if TYPE_CHECKING:  # imported when a test starts an app: the kernel and engine tests (and the GPU machine) need
    from service.app import App  # no server stack (fastapi, grpc, the generated stubs) to load this module


# RWKVD_TEST_ENGINE_PROCESS=1: every app of the suite runs its engine in a process of its own.
ENGINE_PROCESS = os.environ.get("RWKVD_TEST_ENGINE_PROCESS") == "1"


def needs_engine_in_this_process() -> None:
    """Skips a test that patches the engine in the test process when apps run theirs in another process."""
    if ENGINE_PROCESS:
        pytest.skip("patches the engine in this process; RWKVD_TEST_ENGINE_PROCESS=1 runs it in another")


@asynccontextmanager
async def running_app(**settings: Any) -> AsyncIterator[App]:
    """App.start() on 127.0.0.1 with gRPC and HTTP on port 0 (demo model unless engine.model_path is set).

    The data directory is a fresh temporary one unless data_dir is given (pass the same one to two apps
    in turn to test what survives a restart).
    """
    from service.app import App

    with tempfile.TemporaryDirectory(prefix="rwkvd-test-") as scratch:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "drain_seconds": 0.0,
            "grace_seconds": 5.0,
            "data_dir": scratch,
            "engine.max_batch_size": 16,
            # The whole suite can run on engine processes; tests/test_engine_process.py does so in CI.
            "engine_process": "on" if ENGINE_PROCESS else "off",
        }
        values.update(settings)
        app = App(build_config(values))
        await app.start()
        try:
            yield app
        finally:
            await app.shutdown()


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> bool:
    """Whether `condition` becomes true within `within` seconds (for effects that land a step later)."""
    end = time.monotonic() + within
    while not condition():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)  # polling a plain predicate: there is no event to wait on
    return True


def grpc_target(app: App) -> str:
    assert app.grpc is not None
    return f"127.0.0.1:{app.grpc.port}"


def http_base(app: App) -> str:
    assert app.http is not None
    return f"http://127.0.0.1:{app.http.port}"


def write_tiny_checkpoint(
    path: Path, n_layer: int = 2, n_embd: int = 128, dtype: torch.dtype = torch.bfloat16, seed: int = 1234, **kw: Any
) -> Path:
    """A random-weight RWKV-7 checkpoint in the official format (World vocabulary)."""
    tensors = generate_state_dict(model_shape(n_layer, n_embd), seed=seed, dtype=dtype, **kw)
    return write_checkpoint(tensors, path)
