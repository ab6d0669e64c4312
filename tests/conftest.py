"""Shared fixtures: tiny checkpoints written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two suites. By default the CPU suite, exactly as CI runs it: a GPU on the machine is hidden (the engine
# would otherwise pick it, with fp16 weights and the compiled kernels, and the expectations are CPU ones).
# With RWKVD_TEST_GPU=1 the gpu-marked tests alone, on the GPU (bench/gpu_suite.sh). Both variables are
# read once, when CUDA initialises and when @triton.jit decorates: so here, before anything touches CUDA
# or imports a kernel module.
if os.environ.get("RWKVD_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in its CPU interpreter

from tests.support import write_tiny_checkpoint

GPU_SUITE = os.environ.get("RWKVD_TEST_GPU") == "1"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, width 128, bf16 weights, full World vocabulary."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "rwkv7-tiny.pth", dtype=torch.bfloat16)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if GPU_SUITE:
        cpu_only = pytest.mark.skip(reason="CPU suite: run it without RWKVD_TEST_GPU")
        no_gpu = pytest.mark.skip(reason="RWKVD_TEST_GPU=1 but torch sees no CUDA GPU")
        for item in items:
            if "gpu" not in item.keywords:
                item.add_marker(cpu_only)
            elif not torch.cuda.is_available():
                item.add_marker(no_gpu)
        return
    gpu_only = pytest.mark.skip(reason="needs a CUDA GPU: run with RWKVD_TEST_GPU=1 (bench/gpu_suite.sh does)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(gpu_only)
