"""The triton backend against the torch backend on a real (generated) checkpoint: same logits, same states.

On a CPU the kernels run in Triton's interpreter, so the model is tiny (2 layers, 2 heads).
"""

from __future__ import annotations

from pathlib import Path

import torch

from service.engine.backend import StepBatch
from service.engine.checkpoint import load_checkpoint
from service.engine.config import EngineConfig
from service.engine.local import build_engine
from service.engine.model import TorchRwkv7
from service.engine.protocol import Delta, GenerationRequest, SamplingParams
from service.engine.state_pool import StatePool
from service.engine.triton_backend import TritonRwkv7

# fp32 weights on both sides; the only difference is the order of fp32 sums inside the WKV kernel.
TOLERANCE = 1e-4


def test_prefill_then_decode_matches_the_torch_backend(tiny_checkpoint: Path) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    cpu = torch.device("cpu")
    reference, kernels = TorchRwkv7(ckpt, cpu, torch.float32), TritonRwkv7(ckpt, cpu, torch.float32)
    pools = [StatePool(ckpt.shape, 4, cpu, torch.float32) for _ in range(2)]
    steps = [
        ([[11, 22, 33, 44], [5], [7, 8]], [3, 0, 1], [0, 1, 2]),  # prefill rows of different lengths
        ([[55], [6], [9]], [3, 0, 1], [0, 1, 2]),  # a decode step from those states
        ([[66, 77], [10]], [0, 3], [1]),  # mixed, other order, logits of one row only
    ]
    for rows, slots, wanted in steps:
        batch = StepBatch.build(rows, slots, wanted, cpu)
        expected = reference.forward(batch, pools[0])
        got = kernels.forward(batch, pools[1])
        assert got.shape == (len(wanted), ckpt.shape.vocab_size)
        assert (got - expected).abs().max() < TOLERANCE
        for a, b in zip(
            (pools[0].att_x, pools[0].wkv, pools[0].ffn_x), (pools[1].att_x, pools[1].wkv, pools[1].ffn_x), strict=True
        ):
            assert (a - b).abs().max() < TOLERANCE


async def test_the_engine_on_the_triton_backend_generates_what_the_torch_backend_does(tiny_checkpoint: Path) -> None:
    engines = {
        name: build_engine(EngineConfig(model_path=str(tiny_checkpoint), backend=name, max_batch_size=4))
        for name in ("torch", "triton")
    }
    try:
        assert engines["triton"].model.backend == "triton"
        outputs = {}
        for name, engine in engines.items():
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            requests = [GenerationRequest(f"{name}-{i}", prompt, params) for i, prompt in enumerate(PROMPTS)]
            streams = [engine.generate(r) for r in requests]  # concurrent: prefill and decode rows mix
            outputs[name] = [
                [t for e in [ev async for ev in s] if isinstance(e, Delta) for t in e.token_ids] for s in streams
            ]
        assert outputs["triton"] == outputs["torch"]
    finally:
        for engine in engines.values():
            engine.shutdown()


PROMPTS = [(1, 2, 3, 4, 5), (600,), (7000, 8000, 9000)]
