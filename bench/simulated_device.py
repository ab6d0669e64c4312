"""A simulated device for measuring the host side alone: every engine step "computes" for a fixed time.

What it answers, on any machine: with a device that takes exactly --step-ms per step, how many tokens per
second do the engine's host work (scheduling, accepting tokens, text, stops, delivery) and the front end
(gRPC / HTTP streaming, the domain layer) let through, and how much of a step's host work overlaps the
device (`--overlap`)? If that ceiling is below a throughput target, no kernel can reach the target.

How: Runner.launch is replaced. A launch records its rows and returns at once; its result() sleeps until
the step's device time is up (a sleep releases the GIL as waiting for a CUDA stream does) and returns the
next token of a fixed English text for each sampling row (no EOS: generations run to max_tokens). No
forward pass, no sampling, no state update happens: slots are still allocated, admitted and released by
the real runner. Everything else is the real engine and the real server.

    python bench/engine.py --size tiny --device cpu --simulate-device-ms 5 --batch 64,256 --prompt-lens 16
    python bench/serve.py --simulate-device-ms 5 --concurrency 256 ...     # starts the server through:
    python -m bench.simulated_device --step-ms 5 -- serve --max-batch-size 256 ...
    (with --engine-process true the engine process is started through this module as well)

Figures from it are host ceilings of the machine they ran on, labelled as simulated in every result file;
never a device's throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine import remote, worker
from service.engine.runner import LaunchedStep, Runner
from service.engine.sampler import Sampled
from service.engine.scheduler import StepPlan
from service.engine.tokenizer import WorldTokenizer

TEXT = (
    "The engine reads every prompt in chunks, then decodes one token per row and step, and the front end "
    "streams each token to its client as soon as the step that made it ends. Plain words, some numbers "
    "(12, 345, 6789), punctuation; and a little Unicode: café, naïve, 東京, 🙂. "
)


class _Finished:
    """What a launched step's result() waits for: the end of its simulated device time."""

    def __init__(self, tokens: list[int], done_at: float) -> None:
        self._tokens = tokens
        self._done_at = done_at

    def result(self) -> Sampled:
        wait = self._done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return Sampled(self._tokens, [None] * len(self._tokens))


def install(step_ms: float) -> None:
    """From now on every engine step in this process takes `step_ms` of simulated device time."""
    cycle = WorldTokenizer().encode(TEXT)
    step_seconds = step_ms / 1e3
    # The device is busy with one step at a time: a step launched before the previous one's time is up
    # (cannot happen in the engine, which reads each step's result before the next launch) would queue.
    busy_until = [0.0]

    def launch(self: Runner, plan: StepPlan) -> LaunchedStep:
        started = time.perf_counter()
        sample_rows = [i for i, r in enumerate(plan.rows) if r.sample]
        tokens = [cycle[(plan.rows[i].seq.position + plan.rows[i].seq.seed) % len(cycle)] for i in sample_rows]
        busy_until[0] = max(busy_until[0], started) + step_seconds
        pending = _Finished(tokens, busy_until[0])
        return LaunchedStep(pending, sample_rows, 0.0, time.perf_counter() - started)  # type: ignore[arg-type]

    Runner.launch = launch  # type: ignore[method-assign]
    # An engine process started from here (--engine-process) runs through this module too, simulated alike.
    remote.WORKER_COMMAND = [sys.executable, "-m", "bench.simulated_device", "--step-ms", str(step_ms), "engine-worker"]


def main() -> None:
    """`python -m bench.simulated_device --step-ms X -- serve ...`: the rwkvd command line, simulated device."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-ms", type=float, required=True, help="simulated device time of every engine step")
    ap.add_argument("rwkvd_args", nargs=argparse.REMAINDER, help="-- then the rwkvd command line (serve ...)")
    args = ap.parse_args()
    install(args.step_ms)
    rest = args.rwkvd_args[1:] if args.rwkvd_args[:1] == ["--"] else args.rwkvd_args
    if rest[:1] == ["engine-worker"]:  # the engine process of a server started through this module
        raise SystemExit(worker.main(rest[1:]))
    from service.cli import main as rwkvd_main

    raise SystemExit(rwkvd_main(rest))


if __name__ == "__main__":
    main()
