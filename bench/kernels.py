"""WKV-7 kernel benchmark on a GPU: our decode and prefill kernels, the torch reference, and fla-core's.

Decode: B rows of one token, each updating its state in a slot pool (ours in place; the reference and
fla gather states into a batch tensor and return new ones, as they must without a slot index).
Prefill: one row of T tokens from a state (ours: the recurrent in-kernel loop, and the chunked kernel at each
--chunk size and product precision; fla: chunk_rwkv7), with the chunked kernel's largest difference from the
recurrent one.
Figures: median time per call, and the fraction of HBM bandwidth for the bytes the op must move
(state read and write in fp32, inputs in fp16, output in fp32).

    pip install fla-core==0.6.0 einops     # optional, for the side-by-side
    python bench/kernels.py --heads 40 --batch 1,64,256,1024 --prefill 1024,8192 --chunk 16,32,64

Writes bench/results/kernels-<device>-<date>.json (device, commit, date, conditions, figures).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import RESULTS, device_name, git_commit
from kernels.rwkv7.chunk import PRECISIONS, wkv7_chunk_prefill
from kernels.rwkv7.fused_recurrent import wkv7_decode, wkv7_prefill
from kernels.rwkv7.naive import wkv7_step
from kernels.rwkv7.testing import wkv_inputs

N = 64
# Peak HBM bandwidth by device name (bytes/s); perf-anchors.md §2.1.
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


STATE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def timed(fn: Callable[[], object], repeats: int = 50) -> float:
    """Median seconds per call, CUDA events around each call after a warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def inputs(rows: int, heads: int) -> list[torch.Tensor]:
    return wkv_inputs(rows, heads, N, dtype=torch.float16, device="cuda")


def decode_bytes(batch: int, heads: int, state_bytes: int) -> int:
    """What a decode step must move: each state read and written, six fp16 input vectors, the fp32 output."""
    return batch * heads * (N * N * state_bytes * 2 + 6 * N * 2 + N * 4)


def decode_case(batch: int, heads: int, fla: Any, state_dtype: torch.dtype) -> dict[str, Any]:
    pool = torch.zeros(batch, heads, N, N, device="cuda", dtype=state_dtype)  # ours
    pool32 = torch.zeros(batch, heads, N, N, device="cuda")  # the reference's and fla's: fp32 states
    slots = torch.arange(batch, device="cuda")
    x = inputs(batch, heads)
    result: dict[str, Any] = {
        "batch": batch,
        "heads": heads,
        "bytes": decode_bytes(batch, heads, pool.element_size()),  # ours
        "bytes_fp32_state": decode_bytes(batch, heads, 4),  # the others
    }
    result["ours_s"] = timed(lambda: wkv7_decode(pool, slots, *x))

    def reference() -> None:
        state = pool32.index_select(0, slots)
        wkv7_step(state, *x)
        pool32.index_copy_(0, slots, state)

    result["reference_s"] = timed(reference)
    if fla is not None:  # fla's layout: [B, T, H, K] inputs, state [B, H, K, V] (transposed), log decay
        r, w, k, v, a, b = (t.unsqueeze(1) for t in x)
        h0 = pool32.transpose(-1, -2).contiguous()
        result["fla_fused_recurrent_s"] = timed(
            lambda: fla.fused_recurrent_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=h0, output_final_state=True)
        )
    return result


def prefill_case(tokens: int, heads: int, chunks: list[int], fla: Any, state_dtype: torch.dtype) -> dict[str, Any]:
    pool = torch.zeros(1, heads, N, N, device="cuda", dtype=state_dtype)
    slots = torch.zeros(1, dtype=torch.long, device="cuda")
    cu = torch.tensor([0, tokens], device="cuda")
    x = inputs(tokens, heads)
    result: dict[str, Any] = {"tokens": tokens, "heads": heads}
    result["ours_recurrent_s"] = timed(lambda: wkv7_prefill(pool, slots, cu, *x), repeats=10)
    start = torch.randn_like(pool) * 0.1
    recurrent = start.clone()
    y_recurrent = wkv7_prefill(recurrent, slots, cu, *x)
    for size in chunks:
        for precision in PRECISIONS:
            run = partial(wkv7_chunk_prefill, chunk_size=size, precision=precision)
            name = f"ours_chunk{size}_{precision}"
            result[f"{name}_s"] = timed(partial(run, pool, slots, cu, *x), repeats=10)
            chunked = start.clone()
            y_chunked = run(chunked, slots, cu, *x)
            result[f"{name}_max_abs_diff"] = max(
                (y_chunked - y_recurrent).abs().max().item(), (chunked - recurrent).abs().max().item()
            )
    if fla is not None:
        r, w, k, v, a, b = (t.unsqueeze(0) for t in x)
        h0 = pool.float().transpose(-1, -2).contiguous()
        result["fla_chunk_s"] = timed(
            lambda: fla.chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=h0, output_final_state=True),
            repeats=10,
        )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=40, help="40 = 2.9B, 64 = 7.2B, 12 = 0.1B")
    ap.add_argument("--batch", default="1,64,256,1024")
    ap.add_argument("--prefill", default="1024,8192")
    ap.add_argument("--chunk", default="16,32,64", help="chunk sizes of our chunked prefill kernel")
    ap.add_argument(
        "--state-dtype", default="float32", choices=STATE_DTYPES, help="our kernels' pool (fla and the reference: fp32)"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    state_dtype = STATE_DTYPES[args.state_dtype]
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py measures GPU kernels: no CUDA device here")
    try:
        import fla.ops.rwkv7 as fla
    except ImportError:
        fla = None
    device = device_name(torch.device("cuda"))
    peak = peak_bandwidth(device)
    decode = [decode_case(int(b), args.heads, fla, state_dtype) for b in args.batch.split(",") if b]
    for case in decode:
        for key in [k for k in case if k.endswith("_s")]:
            if peak:
                moved = case["bytes"] if key.startswith("ours") else case["bytes_fp32_state"]
                case[key.removesuffix("_s") + "_bandwidth_fraction"] = moved / case[key] / peak
        print(json.dumps(case))
    chunks = [int(c) for c in args.chunk.split(",") if c]
    prefill = [prefill_case(int(t), args.heads, chunks, fla, state_dtype) for t in args.prefill.split(",") if t]
    for case in prefill:
        print(json.dumps(case))
    now = dt.datetime.now(dt.UTC)
    result = {
        "benchmark": "kernels",
        "device": device,
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "conditions": {
            "head_size": N,
            "heads": args.heads,
            "inputs": "float16",
            "state": args.state_dtype,  # ours; the reference's and fla's are float32
            "fla": getattr(sys.modules.get("fla"), "__version__", None) if fla else None,
            "peak_bandwidth_bytes_per_s": peak,
        },
        "decode": decode,
        "prefill": prefill,
    }
    out = args.out or RESULTS / f"kernels-{device.replace(' ', '_')}-{now:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
