"""Engine benchmark: decode and prefill throughput of the real engine on a generated checkpoint.

Runs the whole engine (scheduler, runner, model, sampler, event delivery) in-process, no network.
Decode: B requests with the same short prompt decode together; the rate counts the tokens delivered
in the window where all B are decoding (after every request is past a warm-up, before the first one
ends). Prefill: one request per prompt length, max_tokens=1, rate = prompt tokens / prefill seconds
(prefix cache off). The engine's own per-phase step clock over the same window gives the split of a
decode step (schedule / forward / sample / post-process / deliver).

Every figure is also given as a fraction of the roofline (perf-anchors.md §2): a decode step must read
the weights once (embedding excluded: it is a gather) and each row's state once and write it once:

    bytes(B) = W + B * S        W = weight bytes, S = state bytes read + written per row
                                (S follows --state-dtype: an fp16 WKV state halves its main part)
    roofline tok/s(B) = B / max(bytes(B) / BW, B * F / PEAK)      F = FLOP per token
    prefill roofline tok/s = PEAK / F

BW and PEAK come from --bandwidth / --peak-tflops, else from the device table below (H100 SXM and
PCIe, H100 NVL, H200, A100); a device copy is also timed so the JSON holds a measured bandwidth.
Weights are generated on the benchmark device (random, released shapes: seconds even for 7.2B).

    python bench/engine.py --size 0.1b --batch 1,8,32 --prompt-lens 128,1024
    python bench/engine.py --size 7.2b --device cuda --dtype float16 --batch 1,8,64,256,1024 \\
        --prompt-lens 1024,8192 --temperature 0 --decode-tokens 64
    python bench/engine.py --size tiny --device cpu --decode-tokens 32
    python bench/engine.py --size 2.9b --device cuda --dtype float16 --state-dtype float16 --batch 64,256,1024 \
        --prompt-lens 1024,8192 --temperature 0     # the optional fp16 WKV state, measured on its own

Writes <out-dir>/engine-<size>-<device>-<mode>-<date>.json (device, commit, date, conditions, roofline,
figures), rewritten after every measured point so a run cut short still leaves its figures. With a
--state-dtype other than float32, <mode> gets a suffix (greedy-fp16state, sampled-bf16state), so its
figures are never mistaken for the default's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.engine.checkpoint import Checkpoint, ModelShape, validate_state_dict
from service.engine.config import EngineConfig
from service.engine.generator import generate_state_dict, model_shape, released_shape
from service.engine.local import LocalEngineClient, build_engine, resolve_device, resolve_dtype
from service.engine.protocol import Delta, Finished, GenerationRequest, SamplingParams, Started

RESULTS = Path(__file__).resolve().parent / "results"

# (name fragment, HBM bytes/s, dense fp16/bf16 tensor FLOP/s, source); the first fragment found in the
# device name wins, so the specific names come first. perf-anchors.md §2.1 unless noted.
DEVICES: tuple[tuple[str, float, float, str], ...] = (
    ("H100 PCIe", 2.0e12, 756e12, "perf-anchors §2.1 (H100 PCIe 80 GB)"),
    ("H100 NVL", 3.9e12, 835e12, "NVIDIA H100 NVL datasheet (not in perf-anchors)"),
    ("H100", 3.35e12, 989.4e12, "perf-anchors §2.1 (H100 SXM5 80 GB)"),
    ("H200", 4.8e12, 989e12, "perf-anchors §2.1 (H200 141 GB)"),
    ("A100", 2.0e12, 312e12, "NVIDIA A100 80 GB datasheet (not in perf-anchors)"),
)
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


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
    """The short commit (+ "-dirty"); RWKVD_COMMIT overrides it (a copied tree without .git, on a GPU host)."""
    if os.environ.get("RWKVD_COMMIT"):
        return os.environ["RWKVD_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True, stderr=subprocess.DEVNULL
        ).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "service", "kernels"], cwd=root).returncode
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_peaks(name: str) -> tuple[float | None, float | None, str | None]:
    """(HBM bytes/s, dense fp16 FLOP/s, source) of a device by name, or Nones for one not in the table."""
    for fragment, bw, flops, source in DEVICES:
        if fragment in name:
            return bw, flops, source
    return None, None, None


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Measured device-to-device copy bandwidth (read + write bytes per second), CUDA only."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds


@dataclasses.dataclass(frozen=True)
class Roofline:
    weight_bytes: int  # W: weights read once per step (embedding excluded: a gather)
    state_bytes_per_row: int  # S: one row's state read + written per step
    flops_per_token: float  # F
    bandwidth: float | None  # BW, bytes/s
    peak_flops: float | None  # PEAK, FLOP/s
    state_dtype: str = "float32"  # of the WKV state, the main part of S

    @classmethod
    def of(
        cls,
        shape: ModelShape,
        parameters: int,
        dtype: torch.dtype,
        bw: float | None,
        peak: float | None,
        state_dtype: torch.dtype = torch.float32,
    ) -> Roofline:
        L, C, H, N, V = shape.n_layer, shape.n_embd, shape.n_head, shape.head_size, shape.vocab_size
        act = torch.empty((), dtype=dtype).element_size()
        wkv = torch.empty((), dtype=state_dtype).element_size()
        read = parameters - V * C
        # The pool, per row: wkv [L, H, N, N] in the state dtype and two token-shift vectors [L, C] in the
        # weight dtype.
        state = L * H * N * N * wkv + 2 * L * C * act
        name = str(state_dtype).removeprefix("torch.")
        return cls(read * act, 2 * state, 2.0 * read + 512.0 * L * C, bw, peak, name)

    def decode(self, batch: int) -> float | None:
        if self.bandwidth is None:
            return None
        seconds = (self.weight_bytes + batch * self.state_bytes_per_row) / self.bandwidth
        if self.peak_flops is not None:
            seconds = max(seconds, batch * self.flops_per_token / self.peak_flops)
        return batch / seconds

    def prefill(self) -> float | None:
        return None if self.peak_flops is None else self.peak_flops / self.flops_per_token

    def describe(self) -> dict[str, Any]:
        return {
            "formula": "decode tok/s(B) = B / max((W + B*S) / BW, B*F / PEAK); prefill tok/s = PEAK / F",
            "W_weight_bytes": self.weight_bytes,
            "W_definition": "(parameters - vocab*n_embd) * bytes per weight: every weight read once per step; "
            "the embedding is a gather of B rows",
            "S_state_bytes_per_row": self.state_bytes_per_row,
            "S_definition": "2 * n_layer * (n_head*64*64*bytes per state element + 2*n_embd*bytes per weight): "
            f"the WKV state ({self.state_dtype}) and two token-shift vectors, read once and written once per step",
            "F_flops_per_token": self.flops_per_token,
            "F_definition": "2 * (parameters - vocab*n_embd) + 512 * n_layer * n_embd",
            "BW_bytes_per_s": self.bandwidth,
            "PEAK_flops_per_s": self.peak_flops,
            "ignored": "activations between kernels, fp32 logits (B*V*4 bytes written and read), sampling, "
            "launch and host overhead",
        }


async def decode_rate(
    client: LocalEngineClient, batch: int, warmup: int, tokens: int, sampling: SamplingParams, budget: int
) -> dict[str, Any]:
    prompt = tuple(client.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 2))
    # Requests are admitted over a few steps (ramp); each decodes long enough that the window where all
    # B decode holds `tokens` steps.
    ramp = math.ceil(batch * len(prompt) / budget) + 2
    params = dataclasses.replace(sampling, max_tokens=warmup + tokens + ramp, ignore_eos=True, seed=1)
    deltas: list[tuple[float, int]] = []
    reached: list[float] = []
    ended: list[float] = []
    clocks: dict[str, dict[str, float]] = {}
    errors: list[str] = []

    async def one(i: int) -> None:
        async for event in client.generate(GenerationRequest(f"decode-{batch}-{i}", prompt, params)):
            now = time.perf_counter()
            if isinstance(event, Delta):
                deltas.append((now, len(event.token_ids)))
                if event.offset <= warmup - 1 < event.offset + len(event.token_ids):
                    reached.append(now)
                    if len(reached) == batch:
                        clocks["start"] = client.step_clock()
            elif isinstance(event, Finished):
                if event.error is not None:
                    errors.append(event.error)
                if not ended:
                    clocks["end"] = client.step_clock()
                ended.append(now)

    await asyncio.gather(*(one(i) for i in range(batch)))
    if errors:
        raise RuntimeError(f"{len(errors)} of {batch} requests failed: {errors[0]}")
    start, end = max(reached), min(ended)
    if end <= start or "start" not in clocks:
        raise RuntimeError(f"no window where all {batch} requests decode (ramp longer than {ramp} steps)")
    counted = sum(n for t, n in deltas if start < t <= end)
    before, after = clocks["start"], clocks["end"]
    steps = max(1.0, after["steps"] - before["steps"])
    split = {k: (after[k] - before[k]) / steps * 1e3 for k in after if k != "steps"}
    return {
        "batch": batch,
        "tokens_per_second": counted / (end - start),
        "step_ms": (end - start) / (counted / batch) * 1e3,
        "window_tokens": counted,
        "window_steps": round(counted / batch, 1),
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
            elif isinstance(event, Finished) and event.error is not None:
                raise RuntimeError(f"prefill of {length} tokens failed: {event.error}")
    return {"prompt_tokens": length, "tokens_per_second": length / best, "seconds": best}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.1b", help="released size (0.1b, 0.4b, 1.5b, 2.9b, 7.2b) or 'tiny' (L2 C128)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float16/fp16, bfloat16/bf16, ...")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument(
        "--state-dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"],
        help="WKV state storage: float32 (the default), float16/fp16 or bfloat16/bf16; measure a non-default "
        "one as its own run (its result file says so: ...-greedy-fp16state-...)",
    )
    ap.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"], help="decode steps in CUDA graphs")
    ap.add_argument(
        "--simulate-device-ms",
        type=float,
        default=None,
        help="no forward pass: every step takes this long on a simulated device (bench/simulated_device.py), "
        "for the host's own ceiling",
    )
    ap.add_argument(
        "--overlap",
        default="auto",
        choices=["auto", "on", "off"],
        help="decode text and deliver events while the device runs the next step (auto: on with CUDA)",
    )
    ap.add_argument("--batch", default="1,8,32", help="decode batch sizes, e.g. 1,8,64,256,1024")
    ap.add_argument("--prompt-lens", default="128,1024", help="prefill prompt lengths, e.g. 1024,8192")
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens per request in the measured window")
    ap.add_argument("--warmup-tokens", type=int, default=4)
    ap.add_argument("--prefill-repeats", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=1024)
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="default: room for every prompt at once")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (no sampling cost)")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bandwidth", type=float, default=None, help="HBM GB/s for the roofline (default: device table)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense fp16 TFLOP/s (default: device table)")
    ap.add_argument("--out", type=Path, default=None, help="result file (default: <out-dir>/engine-...json)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    return ap.parse_args()


async def main() -> None:
    args = parse_args()
    batches = [int(b) for b in args.batch.split(",") if b]
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    lengths = [int(n) for n in args.prompt_lens.split(",") if n]
    shape = model_shape(2, 128) if args.size == "tiny" else released_shape(args.size)
    device = resolve_device(args.device)
    dtype = resolve_dtype(DTYPES.get(args.dtype, args.dtype), device)
    state_dtype = resolve_dtype(DTYPES.get(args.state_dtype, args.state_dtype), device)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = device_name(device)
    if args.simulate_device_ms is not None:
        from bench.simulated_device import install

        install(args.simulate_device_ms)
        name = f"simulated device, {args.simulate_device_ms:g} ms per step (host: {name})"
    table_bw, table_peak, table_source = device_peaks(name)
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else table_bw
    peak = args.peak_tflops * 1e12 if args.peak_tflops else table_peak
    measured_bw = copy_bandwidth(device)
    # Room for every decode row plus every prompt at once, so all requests of a point start together.
    budget = args.max_batch_tokens or max(max(batches) * 32, args.prefill_chunk)
    t0 = time.perf_counter()
    config = EngineConfig(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        state_dtype=str(state_dtype).removeprefix("torch."),
        backend=args.backend,
        cuda_graphs=args.cuda_graphs,
        overlap=args.overlap,
        max_batch_size=max(batches),
        max_batch_tokens=budget,
        prefill_chunk=args.prefill_chunk,
        max_prompt_tokens=max([*lengths, 1024]),
        max_queued=max(1024, max(batches)),
        prefix_cache_entries=0,
    )

    def generate() -> Checkpoint:  # runs in the engine thread, like every torch op of the engine
        tensors = generate_state_dict(shape, seed=0, dtype=dtype, device=device)
        return validate_state_dict(tensors, source=f"generated-{args.size}", sha256="0" * 64)

    client = build_engine(config, load=generate)
    load_seconds = time.perf_counter() - t0
    info = client.model
    setup = f"{info.backend}, {info.dtype}, {info.state_dtype} state"
    print(f"{args.size} on {name} ({setup}): ready in {load_seconds:.1f}s")
    if args.simulate_device_ms is not None:  # no device work: a roofline would say nothing
        bandwidth = peak = None
    roof = Roofline.of(shape, info.parameter_count, dtype, bandwidth, peak, state_dtype)
    now = dt.datetime.now(dt.UTC)
    mode = "greedy" if args.temperature == 0 else "sampled"
    if args.simulate_device_ms is not None:
        mode = f"simulated{args.simulate_device_ms:g}ms-" + ("overlap" if config.overlap_on(device.type) else "serial")
    if state_dtype != torch.float32:
        mode += "-" + {torch.float16: "fp16", torch.bfloat16: "bf16"}[state_dtype] + "state"
    out = args.out or args.out_dir / f"engine-{args.size}-{device.type}-{mode}-{now:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    decode: list[dict[str, Any]] = []
    prefill: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []

    sampling_text = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, top_p {args.top_p}"

    def save(complete: bool) -> None:
        graphs = client._runner.graphs
        result = {
            "benchmark": "engine",
            "device": name,
            "commit": git_commit(),
            "date": now.isoformat(timespec="seconds"),
            "complete": complete,
            "conditions": {
                "size": args.size,
                "shape": {"n_layer": shape.n_layer, "n_embd": shape.n_embd, "n_head": shape.n_head},
                "vocab": shape.vocab_size,
                "parameters": client.model.parameter_count,
                "dtype": client.model.dtype,
                "state_dtype": f"{client.model.state_dtype} (WKV), weight dtype (token shift)",
                "backend": client.model.backend,
                "cuda_graphs": args.cuda_graphs,
                "overlap": config.overlap_on(device.type),
                "cuda_graph_buckets_captured": list(graphs.captured) if graphs else [],
                "cuda_graph_buckets_failed": sorted(graphs.failed) if graphs else [],
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "threads": torch.get_num_threads(),
                "max_batch_size": config.max_batch_size,
                "max_batch_tokens": config.max_batch_tokens,
                "prefill_chunk": config.prefill_chunk,
                "decode_tokens": args.decode_tokens,
                "warmup_tokens": args.warmup_tokens,
                "sampling": sampling_text,
                # Random weights give flat distributions: a top-p nucleus never fits the 1024 candidates,
                # so sampled runs always pay the full-vocabulary sort (trained models usually do not).
                "sampling_note": "random weights: top-p takes the full-sort path",
                "weights": "random (generated on the device), same cost as real ones",
                "load_seconds": round(load_seconds, 1),
            },
            "roofline": {
                **roof.describe(),
                "bandwidth_source": "--bandwidth" if args.bandwidth else table_source,
                "peak_source": "--peak-tflops" if args.peak_tflops else table_source,
                "measured_copy_bandwidth_bytes_per_s": measured_bw,
            },
            "decode": decode,
            "prefill": prefill,
            "errors": errors,
        }
        out.write_text(json.dumps(result, indent=2) + "\n")

    try:
        for b in batches:
            try:
                point = await decode_rate(client, b, args.warmup_tokens, args.decode_tokens, sampling, budget)
            except Exception as exc:  # an OOM at the largest batch must not lose the other points
                errors.append({"decode_batch": b, "error": f"{type(exc).__name__}: {exc}"})
                print(f"decode  batch {b:5d}: FAILED {exc}", flush=True)
                save(False)
                continue
            roof_rate = roof.decode(b)
            point["roofline_tokens_per_second"] = roof_rate
            point["roofline_fraction"] = point["tokens_per_second"] / roof_rate if roof_rate else None
            decode.append(point)
            frac = f"{point['roofline_fraction']:6.1%} of roofline" if roof_rate else ""
            print(f"decode  batch {b:5d}: {point['tokens_per_second']:10.1f} tok/s {frac}  {point}", flush=True)
            save(False)
        for n in lengths:
            try:
                point = await prefill_rate(client, n, args.prefill_repeats)
            except Exception as exc:
                errors.append({"prefill_tokens": n, "error": f"{type(exc).__name__}: {exc}"})
                print(f"prefill {n:5d} tokens: FAILED {exc}", flush=True)
                save(False)
                continue
            roof_rate = roof.prefill()
            point["roofline_tokens_per_second"] = roof_rate
            point["roofline_fraction"] = point["tokens_per_second"] / roof_rate if roof_rate else None
            prefill.append(point)
            frac = f"{point['roofline_fraction']:6.1%} of roofline" if roof_rate else ""
            print(f"prefill {n:5d} tokens: {point['tokens_per_second']:10.1f} tok/s {frac}", flush=True)
            save(False)
        save(True)
    finally:
        client.shutdown()
    print(f"wrote {out}")
    if errors:
        raise SystemExit(f"{len(errors)} points failed (recorded in {out})")


if __name__ == "__main__":
    asyncio.run(main())
