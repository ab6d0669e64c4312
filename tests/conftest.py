"""Shared fixtures: tiny checkpoints written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its CPU interpreter. The variable is read when @triton.jit decorates,
# so it is set here, before any test imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.support import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, width 128, bf16 weights, full World vocabulary."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "rwkv7-tiny.pth", dtype=torch.bfloat16)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
