"""The torch model (service/engine/model.py) against the `rwkv` package (BlinkDL's reference), cpu fp32.

Tolerance: 1e-4 absolute on logits (std ~1.5) and on states. Both sides compute in fp32 from the same
weights; the observed difference is ~4e-6 on logits and ~5e-7 on states, i.e. accumulation-order noise,
while any real mistake in the math (a wrong mix, decay, norm eps, token shift or state carry) moves the
logits by 1e-2 or more.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from service.engine.backend import StepBatch
from service.engine.checkpoint import load_checkpoint
from service.engine.model import TorchRwkv7
from service.engine.state_pool import StatePool
from tests.support import write_tiny_checkpoint

ATOL = 1e-4
# The package imports torch.jit.script decorators that warn on torch 2.13.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
CPU = torch.device("cpu")
SLOTS = 6


def reference_class() -> Any:
    # The package picks its architecture from the environment at import time.
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV  # type: ignore[import-untyped]

    assert RWKV.__name__ == "RWKV_x070", "rwkv.model was imported before RWKV_V7_ON was set"
    return RWKV


@dataclass
class Pair:
    ours: TorchRwkv7
    ref: Any
    n_layer: int

    def pool(self) -> StatePool:
        return StatePool(self.ours.shape, SLOTS, CPU, torch.float32)

    def step(self, pool: StatePool, rows: list[list[int]], slots: list[int]) -> torch.Tensor:
        """One packed step; logits of every row's last token, [len(rows), V]."""
        batch = StepBatch.build(rows, slots, list(range(len(rows))), CPU)
        return self.ours.forward(batch, pool)

    def ref_run(self, tokens: list[int], state: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[Any]]:
        """Package logits of every token [T, V] and its final state (the input state list is not changed)."""
        state = None if state is None else [s.clone() for s in state]
        logits, out = self.ref.forward(tokens, state, full_output=True)
        return (logits.unsqueeze(0) if logits.dim() == 1 else logits), out

    def assert_state(self, pool: StatePool, slot: int, ref_state: list[torch.Tensor]) -> None:
        for i in range(self.n_layer):
            torch.testing.assert_close(pool.att_x[i, slot], ref_state[3 * i + 0], atol=ATOL, rtol=0)
            torch.testing.assert_close(pool.wkv[i, slot], ref_state[3 * i + 1], atol=ATOL, rtol=0)
            torch.testing.assert_close(pool.ffn_x[i, slot], ref_state[3 * i + 2], atol=ATOL, rtol=0)


CHECKPOINTS: dict[str, dict[str, Any]] = {
    "L2-C128-bf16": {"n_layer": 2, "n_embd": 128, "dtype": torch.bfloat16},
    "L3-C192-fp32-layer0-vlora": {"n_layer": 3, "n_embd": 192, "dtype": torch.float32, "layer0_value_lora": True},
    "L2-C128-fp32": {"n_layer": 2, "n_embd": 128, "dtype": torch.float32, "seed": 99},
}


@pytest.fixture(scope="module", params=list(CHECKPOINTS), ids=list(CHECKPOINTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    spec = CHECKPOINTS[request.param]
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("parity") / f"{request.param}.pth", **spec)
    ref = reference_class()(model=str(path.with_suffix("")), strategy="cpu fp32")
    ours = TorchRwkv7(load_checkpoint(path), CPU, torch.float32)
    return Pair(ours, ref, spec["n_layer"])


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 65530, (n,), generator=g).tolist()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_reference_is_not_trivially_equal(pair: Pair) -> None:
    # Guards the tolerance: different prompts give logits far apart, and logits have a real spread.
    a, _ = pair.ref_run(tokens(5, 1))
    b, _ = pair.ref_run(tokens(5, 2))
    assert a[-1].std() > 0.5
    assert (a[-1] - b[-1]).abs().max() > 100 * ATOL


def test_one_prefill_matches_full_output(pair: Pair) -> None:
    prompt = tokens(23, 10)
    ref_logits, ref_state = pair.ref_run(prompt)
    pool = pair.pool()
    close(pair.step(pool, [prompt], [3])[0], ref_logits[-1])
    pair.assert_state(pool, 3, ref_state)
    # Other slots are untouched.
    assert pool.att_x[:, [0, 1, 2, 4, 5]].abs().max() == 0
    assert pool.wkv[:, [0, 1, 2, 4, 5]].abs().max() == 0


def test_token_by_token_decode_matches_every_position(pair: Pair) -> None:
    prompt = tokens(17, 11)
    ref_logits, ref_state = pair.ref_run(prompt)
    pool = pair.pool()
    for t, token in enumerate(prompt):
        close(pair.step(pool, [[token]], [1])[0], ref_logits[t])
    pair.assert_state(pool, 1, ref_state)


@pytest.mark.parametrize("splits", [[1, 7, 2, 13], [11, 1, 1, 10], [5, 5, 5, 5, 3]])
def test_prompt_in_uneven_chunks(pair: Pair, splits: list[int]) -> None:
    prompt = tokens(sum(splits), 12)
    ref_logits, ref_state = pair.ref_run(prompt)
    pool = pair.pool()
    end = 0
    for n in splits:
        chunk = prompt[end : end + n]
        end += n
        close(pair.step(pool, [chunk], [0])[0], ref_logits[end - 1])
    pair.assert_state(pool, 0, ref_state)


def test_rows_of_different_lengths_in_one_step(pair: Pair) -> None:
    prompts = [tokens(n, 20 + n) for n in (1, 5, 17, 9, 2)]
    slots = [4, 0, 2, 5, 1]  # not in row order
    pool = pair.pool()
    batched = pair.step(pool, prompts, slots)
    for row, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
        ref_logits, ref_state = pair.ref_run(prompt)
        close(batched[row], ref_logits[-1])
        pair.assert_state(pool, slot, ref_state)


def test_mixed_decode_and_prefill_rows_from_carried_states(pair: Pair) -> None:
    # Step 1 prefills three rows; step 2 mixes one-token rows with a chunk, every row from its own state.
    first = [tokens(n, 30 + n) for n in (6, 3, 12)]
    second = [tokens(1, 40), tokens(8, 41), tokens(1, 42)]
    slots = [2, 5, 0]
    pool = pair.pool()
    pair.step(pool, first, slots)
    batched = pair.step(pool, second, slots)
    for row, slot in enumerate(slots):
        ref_logits, ref_state = pair.ref_run(first[row] + second[row])
        close(batched[row], ref_logits[-1])
        pair.assert_state(pool, slot, ref_state)


def test_all_decode_rows_batched(pair: Pair) -> None:
    # Every row one token: the decode path (wkv7_step directly), after prefills of different lengths.
    prefixes = [tokens(n, 50 + n) for n in (4, 9, 1)]
    nxt = [tokens(1, 60 + i) for i in range(3)]
    slots = [1, 3, 5]
    pool = pair.pool()
    pair.step(pool, prefixes, slots)
    batched = pair.step(pool, nxt, slots)
    for row, slot in enumerate(slots):
        ref_logits, ref_state = pair.ref_run(prefixes[row] + nxt[row])
        close(batched[row], ref_logits[-1])
        pair.assert_state(pool, slot, ref_state)


def test_only_requested_logit_rows_come_back(pair: Pair) -> None:
    rows = [tokens(3, 70), tokens(4, 71), tokens(2, 72)]
    pool = pair.pool()
    batch = StepBatch.build(rows, [0, 1, 2], [2, 0], CPU)
    logits = pair.ours.forward(batch, pool)
    assert logits.shape == (2, 65536)
    assert logits.dtype == torch.float32
    close(logits[0], pair.ref_run(rows[2])[0][-1])
    close(logits[1], pair.ref_run(rows[0])[0][-1])
    none = pair.ours.forward(StepBatch.build([tokens(2, 73)], [3], [], CPU), pool)
    assert none.shape == (0, 65536)
    pair.assert_state(pool, 3, pair.ref_run(tokens(2, 73))[1])
