"""Reference point: the `rwkv` PyPI package (BlinkDL's RWKV_x070) on the same generated checkpoint.

Single sequence only (the package has no batching): decode tok/s of forward_one and prefill tok/s of
forward_seq. Same shapes, seed and dtype as bench/engine.py, so the two JSON results compare. On CUDA,
RWKV_CUDA_ON=1 selects the package's own CUDA WKV kernel (compiled at import: needs nvcc and ninja);
the default 0 runs its plain-torch path. The weights are generated on the benchmark device.

    python bench/rwkv_package.py --size 0.1b --device cpu --prompt-lens 128,1024
    RWKV_CUDA_ON=1 python bench/rwkv_package.py --size 2.9b --device cuda --dtype fp16 --prompt-lens 1024,8192
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["RWKV_V7_ON"] = "1"  # read by rwkv.model at import
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import RESULTS, device_name, git_commit
from service.engine.generator import generate_state_dict, model_shape, released_shape, write_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.1b")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--prompt-lens", default="128,1024")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    from rwkv.model import RWKV

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    shape = model_shape(2, 128) if args.size == "tiny" else released_shape(args.size)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        tensors = generate_state_dict(shape, seed=0, dtype=torch_dtype, device=args.device)
        path = write_checkpoint(tensors, Path(tmp) / "model.pth")
        del tensors
        model = RWKV(model=str(path)[:-4], strategy=f"{args.device} {args.dtype}")  # it appends ".pth"
    prefill = []
    for n in (int(x) for x in args.prompt_lens.split(",") if x):
        tokens = [(7 * i) % 60000 + 1 for i in range(n)]
        model.forward(tokens[:8], None)  # warm-up
        sync()
        t0 = time.perf_counter()
        model.forward(tokens, None)
        sync()
        prefill.append({"prompt_tokens": n, "tokens_per_second": n / (time.perf_counter() - t0)})
        print(f"prefill {n:5d} tokens: {prefill[-1]['tokens_per_second']:10.1f} tok/s", flush=True)
    out, state = model.forward([1, 2, 3], None)
    token = int(out.argmax())
    t0 = time.perf_counter()
    for _ in range(args.decode_tokens):
        out, state = model.forward([token], state)
        token = int(out.argmax())
    decode = {"batch": 1, "tokens_per_second": args.decode_tokens / (time.perf_counter() - t0)}
    print(f"decode  batch     1: {decode['tokens_per_second']:10.1f} tok/s", flush=True)

    import importlib.metadata as md

    now = dt.datetime.now(dt.UTC)
    device = torch.device(args.device)
    result = {
        "benchmark": "rwkv-package",
        "device": device_name(device),
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "conditions": {
            "size": args.size,
            "shape": {"n_layer": shape.n_layer, "n_embd": shape.n_embd, "vocab": shape.vocab_size},
            "package": f"rwkv {md.version('rwkv')}",
            "strategy": f"{args.device} {args.dtype}",
            "jit": os.environ["RWKV_JIT_ON"],
            "cuda_kernel": os.environ.get("RWKV_CUDA_ON"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "decode": "greedy, forward_one per token",
            "prefill": "forward_seq" + (" (a Python loop over tokens on CPU)" if args.device == "cpu" else ""),
        },
        "decode": [decode],
        "prefill": prefill,
    }
    path_out = args.out or args.out_dir / f"rwkv-package-{args.size}-{device.type}-{now:%Y%m%d-%H%M%S}.json"
    path_out.parent.mkdir(parents=True, exist_ok=True)
    path_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path_out}")


if __name__ == "__main__":
    main()
