"""The `rwkvd` command: serve a model, make a random-weight checkpoint, print the version."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

import torch


def _serve(argv: Sequence[str]) -> int:
    from service import logs
    from service.app import App
    from service.config import parse_serve_args

    config = parse_serve_args(argv, os.environ)
    logs.configure(config.log_level, config.log_format)
    return asyncio.run(App(config).run())


def _make_checkpoint(argv: Sequence[str]) -> int:
    from service.engine.generator import (
        RELEASED_SHAPES,
        generate_state_dict,
        model_shape,
        released_shape,
        write_checkpoint,
    )

    p = argparse.ArgumentParser(
        prog="rwkvd make-checkpoint",
        description="Write a random-weight RWKV-7 checkpoint with official key names and shapes.",
    )
    p.add_argument("out", help="output path (.pth, or .safetensors)")
    p.add_argument("--size", choices=sorted(RELEASED_SHAPES), help="a released shape (else --layers/--embd)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer0-v", action="store_true", help="also write blocks.0.att.v0/v1/v2 (trainer output)")
    args = p.parse_args(argv)
    shape = released_shape(args.size) if args.size else model_shape(args.layers, args.embd, vocab_size=args.vocab)
    tensors = generate_state_dict(
        shape, seed=args.seed, dtype=getattr(torch, args.dtype), layer0_value_lora=args.layer0_v
    )
    path = write_checkpoint(tensors, args.out)
    params = sum(t.numel() for t in tensors.values())
    print(f"{path}: L{shape.n_layer} C{shape.n_embd} V{shape.vocab_size}, {params / 1e6:.2f}M parameters, {args.dtype}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve": _serve, "make-checkpoint": _make_checkpoint}
    if not args or args[0] in ("-h", "--help") or args[0] not in {*commands, "version"}:
        print("usage: rwkvd {serve,make-checkpoint,version} [options]   (rwkvd serve --help for its options)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    if args[0] == "version":
        from importlib.metadata import version

        print(f"rwkvd {version('rwkvd-server')}")
        return 0
    return commands[args[0]](args[1:])
