"""The triton backend against the torch backend on a real (generated) checkpoint: same logits, same states.

On a CPU the kernels run in Triton's interpreter, so the model is tiny (2 layers, 2 heads).
"""

from __future__ import annotations

from pathlib import Path

import pytest
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


# A reduced-precision state pool (--state-dtype) on both sides: each backend rounds a row's state once per step,
# at the same points, so they differ by the fp32 noise above plus rounding flips it causes (one ulp of the state
# dtype at the state's magnitude, |S| ~1 here) and what those flips do to the next steps. Observed over these
# four steps: fp16 logits 3.5e-6 apart, states 2.4e-4 (one fp16 ulp at |S| in [0.25, 0.5)); bf16 logits 7.6e-4,
# states 1.6e-2, larger because Triton's CPU interpreter truncates fp32 to bf16 where torch rounds to nearest
# (a GPU rounds to nearest too). Tolerances: logits 1e-4 (fp16) / 5e-3 (bf16), states 2 ulps at |S| = 2.
REDUCED_TOLERANCE = {torch.float16: (1e-4, 2 * 2.0**-9), torch.bfloat16: (5e-3, 2 * 2.0**-6)}


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16])
def test_a_reduced_precision_state_pool_matches_the_torch_backend(
    tiny_checkpoint: Path, state_dtype: torch.dtype
) -> None:
    ckpt = load_checkpoint(tiny_checkpoint)
    cpu = torch.device("cpu")
    reference, kernels = TorchRwkv7(ckpt, cpu, torch.float32), TritonRwkv7(ckpt, cpu, torch.float32)
    pools = [StatePool(ckpt.shape, 4, cpu, torch.float32, state_dtype=state_dtype) for _ in range(2)]
    logits_tolerance, state_tolerance = REDUCED_TOLERANCE[state_dtype]
    steps = [
        ([[11, 22, 33, 44], [5], [7, 8]], [3, 0, 1], [0, 1, 2]),  # prefill (the recurrent kernel)
        ([[55], [6], [9]], [3, 0, 1], [0, 1, 2]),  # decode
        ([[66, 77], [10]], [0, 3], [1]),  # mixed
        ([[88], [12], [13]], [3, 0, 1], [0, 1, 2]),  # decode from the mixed step's states
    ]
    for rows, slots, wanted in steps:
        batch = StepBatch.build(rows, slots, wanted, cpu)
        expected = reference.forward(batch, pools[0])
        got = kernels.forward(batch, pools[1])
        assert (got - expected).abs().max() < logits_tolerance
        assert pools[0].wkv.dtype == pools[1].wkv.dtype == state_dtype
        assert (pools[0].wkv.float() - pools[1].wkv.float()).abs().max() < state_tolerance


@pytest.mark.parametrize("state_dtype", ["float32", "float16"])
async def test_the_engine_on_the_triton_backend_generates_what_the_torch_backend_does(
    tiny_checkpoint: Path, state_dtype: str
) -> None:
    # With an fp16 state too: both backends round it at the same points (test above), so greedy tokens agree.
    engines = {
        name: build_engine(
            EngineConfig(model_path=str(tiny_checkpoint), backend=name, max_batch_size=4, state_dtype=state_dtype)
        )
        for name in ("torch", "triton")
    }
    try:
        assert engines["triton"].model.backend == "triton"
        assert engines["triton"].model.state_dtype == engines["torch"].model.state_dtype == state_dtype
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
