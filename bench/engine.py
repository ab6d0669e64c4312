"""Engine benchmark: decode and prefill throughput of the real engine on a generated checkpoint.

Runs the whole engine (scheduler, runner, model, sampler, event delivery) in-process, no network.
Decode: B requests with the same short prompt decode in lock-step; the rate is counted between the
step where all B are past a warm-up and the last token. Prefill: one request per prompt length,
max_tokens=1, rate = prompt tokens / prefill seconds (prefix cache off). The engine's own per-phase
step clock gives the split of a decode step (schedule / forward / sample / post-process).

    python bench/engine.py --size 0.1b --batch 1,8,32 --prompt-lens 128,1024
    python bench/engine.py --size tiny --device cpu --decode-tokens 32

Writes bench/results/engine-<size>-<device>-<date>.json (device, commit, date, conditions, figures).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.checkpoint import Checkpoint, validate_state_dict
from service.engine.config import EngineConfig
from service.engine.generator import generate_state_dict, model_shape, released_shape
from service.engine.local import LocalEngineClient, build_engine, resolve_device, resolve_dtype
from service.engine.protocol import Delta, Finished, GenerationRequest, SamplingParams, Started

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "service", "kernels"], cwd=root).returncode
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


async def decode_rate(
    client: LocalEngineClient, batch: int, warmup: int, tokens: int, sampling: SamplingParams
) -> dict[str, Any]:
    prompt = tuple(client.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 2))
    params = dataclasses.replace(sampling, max_tokens=warmup + tokens, ignore_eos=True, seed=1)
    reached: list[float] = []
    ended: list[float] = []

    async def one(i: int) -> None:
        async for event in client.generate(GenerationRequest(f"decode-{batch}-{i}", prompt, params)):
            if isinstance(event, Delta) and event.offset <= warmup - 1 < event.offset + len(event.token_ids):
                reached.append(time.perf_counter())
            elif isinstance(event, Finished):
                ended.append(time.perf_counter())

    before = client.step_clock()
    await asyncio.gather(*(one(i) for i in range(batch)))
    after = client.step_clock()
    elapsed = max(ended) - max(reached)
    split = {k: (after[k] - before[k]) / max(1, after["steps"] - before["steps"]) * 1e3 for k in after if k != "steps"}
    return {
        "batch": batch,
        "tokens_per_second": batch * tokens / elapsed,
        "step_ms": elapsed / tokens * 1e3,
        "step_split_ms": {k: round(v, 3) for k, v in split.items()},
    }


async def prefill_rate(client: LocalEngineClient, length: int, repeats: int) -> dict[str, Any]:
    best = float("inf")
    for r in range(repeats):
        prompt = tuple((7 * i + r) % 60000 + 1 for i in range(length))
        request = GenerationRequest(
            f"prefill-{length}-{r}", prompt, SamplingParams(max_tokens=1), use_prefix_cache=False
        )
        async for event in client.generate(request):
            if isinstance(event, Started):
                best = min(best, event.prefill_seconds)
    return {"prompt_tokens": length, "tokens_per_second": length / best, "seconds": best}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.1b", help="released size (0.1b … 7.2b) or 'tiny' (L2 C128)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", default="1,8,32", help="decode batch sizes")
    ap.add_argument("--prompt-lens", default="128,1024", help="prefill prompt lengths")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--warmup-tokens", type=int, default=4)
    ap.add_argument("--prefill-repeats", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (no sampling cost)")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    batches = [int(b) for b in args.batch.split(",") if b]
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    lengths = [int(n) for n in args.prompt_lens.split(",") if n]
    shape = model_shape(2, 128) if args.size == "tiny" else released_shape(args.size)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    config = EngineConfig(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        max_batch_size=max(batches),
        max_batch_tokens=max(max(batches), args.prefill_chunk),
        prefill_chunk=args.prefill_chunk,
        prefix_cache_entries=0,
    )

    def generate() -> Checkpoint:  # runs in the engine thread, like every torch op of the engine
        tensors = generate_state_dict(shape, seed=0, dtype=dtype, device=device)
        return validate_state_dict(tensors, source=f"generated-{args.size}", sha256="0" * 64)

    client = build_engine(config, load=generate)
    print(f"{args.size} on {device_name(device)}: ready in {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        decode = []
        for b in batches:
            decode.append(await decode_rate(client, b, args.warmup_tokens, args.decode_tokens, sampling))
            print(f"decode  batch {b:5d}: {decode[-1]['tokens_per_second']:10.1f} tok/s  {decode[-1]}", flush=True)
        prefill = []
        for n in lengths:
            prefill.append(await prefill_rate(client, n, args.prefill_repeats))
            print(f"prefill {n:5d} tokens: {prefill[-1]['tokens_per_second']:10.1f} tok/s", flush=True)
    finally:
        client.shutdown()

    now = dt.datetime.now(dt.UTC)
    result = {
        "benchmark": "engine",
        "device": device_name(device),
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "conditions": {
            "size": args.size,
            "shape": {"n_layer": shape.n_layer, "n_embd": shape.n_embd, "vocab": shape.vocab_size},
            "parameters": client.model.parameter_count,
            "dtype": str(dtype).removeprefix("torch."),
            "state_dtype": "float32",
            "backend": client.model.backend,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "decode_tokens": args.decode_tokens,
            "warmup_tokens": args.warmup_tokens,
            "sampling": "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top_p {args.top_p}",
            # Random weights give flat distributions: a top-p nucleus never fits the 1024 candidates,
            # so sampled runs always pay the full-vocabulary sort (trained models usually do not).
            "sampling_note": "random weights: top-p takes the full-sort path",
            "prefill_chunk": args.prefill_chunk,
            "weights": "random (generated), same cost as real ones",
        },
        "decode": decode,
        "prefill": prefill,
    }
    mode = "greedy" if args.temperature == 0 else "sampled"
    out = args.out or RESULTS / f"engine-{args.size}-{device.type}-{mode}-{now:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
