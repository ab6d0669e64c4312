"""The project's RWKV-7 checkpoint generator: random weights, official key names and shapes.

Deterministic from a seed (each tensor draws from its own generator seeded by the seed and its key, so
values do not depend on order or on which other tensors exist). Values follow the magnitudes of
RWKV-LM's initialisation so the network stays numerically well behaved; random weights cost exactly
what real ones cost, which is all benchmarks need. Used for the built-in demo model, tests and
benchmarks.
"""

from __future__ import annotations

import hashlib
import io
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import ModelShape, tensor_count
from .progress import Progress

# Released RWKV-7 sizes: (n_layer, n_embd, LoRA ranks decay/aaa/mv/gate).
RELEASED_SHAPES: dict[str, tuple[int, int, tuple[int, int, int, int]]] = {
    "0.1b": (12, 768, (64, 64, 32, 128)),
    "0.4b": (24, 1024, (64, 64, 32, 128)),
    "1.5b": (24, 2048, (96, 96, 64, 256)),
    "2.9b": (32, 2560, (96, 96, 64, 320)),
    "7.2b": (32, 4096, (128, 128, 96, 480)),
}
DEMO_SEED = 20250101
WORLD_VOCAB = 65536


def _lora_rank(n_embd: int, factor: float) -> int:
    # RWKV-LM's rule of thumb: factor * sqrt(C), rounded to a multiple of 32, at least 32.
    return max(32, round(factor * math.sqrt(n_embd) / 32) * 32)


def model_shape(
    n_layer: int,
    n_embd: int,
    *,
    vocab_size: int = WORLD_VOCAB,
    head_size: int = 64,
    ffn_mult: int = 4,
    lora: tuple[int, int, int, int] | None = None,
) -> ModelShape:
    """A shape from its width and depth; LoRA ranks by the RWKV-LM rule unless given."""
    if n_embd % head_size:
        raise ValueError(f"n_embd {n_embd} is not a multiple of head_size {head_size}")
    dw, da, dv, dg = lora or tuple(_lora_rank(n_embd, f) for f in (2.5, 2.5, 1.7, 5.0))
    return ModelShape(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_embd // head_size,
        head_size=head_size,
        vocab_size=vocab_size,
        ffn_dim=ffn_mult * n_embd,
        decay_lora=dw,
        aaa_lora=da,
        mv_lora=dv,
        gate_lora=dg,
    )


def released_shape(name: str) -> ModelShape:
    """One of the released sizes: 0.1b, 0.4b, 1.5b, 2.9b, 7.2b."""
    try:
        n_layer, n_embd, lora = RELEASED_SHAPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown size {name!r}; released sizes are {', '.join(RELEASED_SHAPES)}") from None
    return model_shape(n_layer, n_embd, lora=lora)


def demo_shape() -> ModelShape:
    """The built-in demo model: 2 layers, width 128, the full World vocabulary."""
    return model_shape(2, 128)


def generate_state_dict(
    shape: ModelShape,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    layer0_value_lora: bool = False,
) -> dict[str, torch.Tensor]:
    """Random weights with the official keys, in released-file key order."""
    dev = torch.device(device)
    L, C, H, N = shape.n_layer, shape.n_embd, shape.n_head, shape.head_size
    V, F = shape.vocab_size, shape.ffn_dim
    out: dict[str, torch.Tensor] = {}
    progress = Progress("generating weights", tensor_count(L, layer0_value_lora))

    def put(key: str, make: Callable[[torch.Generator], torch.Tensor]) -> None:
        g = torch.Generator(device=dev)
        g.manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 63))
        out[key] = make(g).to(dtype).contiguous()
        progress.advance(1, out[key].nbytes)

    def uniform(*size: int, scale: float) -> Callable[[torch.Generator], torch.Tensor]:
        return lambda g: (torch.rand(size, generator=g, device=dev) * 2 - 1) * scale

    def normal(*size: int, std: float) -> Callable[[torch.Generator], torch.Tensor]:
        return lambda g: torch.randn(size, generator=g, device=dev) * std

    def near(base: torch.Tensor, scale: float) -> Callable[[torch.Generator], torch.Tensor]:
        return lambda g: base + (torch.rand(base.shape, generator=g, device=dev) * 2 - 1) * scale

    def fixed(value: torch.Tensor) -> Callable[[torch.Generator], torch.Tensor]:
        return lambda g: value

    ch = torch.arange(C, device=dev, dtype=torch.float32)
    ramp = ch / C  # 0 .. 1 over channels
    linear = ch / max(C - 1, 1) - 0.5
    zig = ((ch % N) - (N - 1) / 2) / ((N - 1) / 2)
    zig = zig * zig.abs()
    ones = torch.ones(C, device=dev)

    put("emb.weight", normal(V, C, std=1.0))
    for i in range(L):
        b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        depth = i / max(L - 1, 1)  # 0 at the bottom, 1 at the top
        fade = 1.0 - i / L  # 1 at the bottom, towards 0 at the top
        if i == 0:
            put(b + "ln0.weight", near(ones, 0.1))
            put(b + "ln0.bias", uniform(C, scale=0.1))
        put(b + "ln1.weight", near(ones, 0.1))
        put(b + "ln1.bias", uniform(C, scale=0.1))
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            put(a + name, fixed((1.0 - ramp.pow(power * fade)).view(1, 1, C)))
        # Decay bias from about -6 (slow, decay ~1) to 0 (fast), wiggled within each head.
        w0 = -6 + 6 * (ch / max(C - 1, 1)).pow(1 + depth**0.3) + 0.5 + 2.5 * zig
        put(a + "w0", fixed(w0.view(1, 1, C)))
        put(a + "r_k", near(torch.full((H, N), -0.04, device=dev), 0.02))
        for lo, hi, rank in (
            ("w1", "w2", shape.decay_lora),
            ("a1", "a2", shape.aaa_lora),
            ("g1", "g2", shape.gate_lora),
        ):
            put(a + lo, normal(C, rank, std=0.5 / math.sqrt(C)))
            put(a + hi, normal(rank, C, std=0.1 / math.sqrt(rank)))
        put(a + "a0", fixed((-0.19 + 0.3 * zig + 0.4 * linear).view(1, 1, C)))
        if i > 0 or layer0_value_lora:
            put(a + "v2", normal(shape.mv_lora, C, std=0.1 / math.sqrt(shape.mv_lora)))
            put(a + "v1", normal(C, shape.mv_lora, std=0.5 / math.sqrt(C)))
            put(a + "v0", fixed((0.73 - 0.4 * linear).view(1, 1, C)))
        put(a + "k_k", fixed((0.71 - 0.1 * linear).view(1, 1, C)))
        put(a + "k_a", fixed(torch.full((1, 1, C), 1.02, device=dev)))
        for name, scale in (("receptance", 1.0), ("key", 1.0), ("value", 1.0), ("output", 0.5)):
            put(f"{a}{name}.weight", uniform(C, C, scale=scale / math.sqrt(C)))
        put(a + "ln_x.weight", fixed(torch.full((C,), ((1 + i) / L) ** 0.7, device=dev)))
        put(a + "ln_x.bias", uniform(C, scale=0.02))
        put(b + "ln2.weight", near(ones, 0.1))
        put(b + "ln2.bias", uniform(C, scale=0.1))
        put(f + "x_k", fixed((1.0 - ramp.pow(fade**4)).view(1, 1, C)))
        put(f + "key.weight", uniform(F, C, scale=0.5 * math.sqrt(3) / math.sqrt(C)))
        put(f + "value.weight", uniform(C, F, scale=0.5 * math.sqrt(3) / math.sqrt(F)))
    put("ln_out.weight", near(ones, 0.1))
    put("ln_out.bias", uniform(C, scale=0.1))
    put("head.weight", normal(V, C, std=1.5 / math.sqrt(C)))
    progress.close()
    return out


def state_dict_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the canonical safetensors bytes: the version id of weights that have no file."""
    from safetensors.torch import save

    return hashlib.sha256(save({k: v.cpu().contiguous() for k, v in tensors.items()})).hexdigest()


def write_checkpoint(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Writes .safetensors, or a torch.save .pth (the official format) for any other suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.cpu().contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(cpu, str(path))
    else:
        # Through a buffer: torch.save embeds the file name, so bytes depend only on the tensors.
        buf = io.BytesIO()
        torch.save(cpu, buf)
        path.write_bytes(buf.getvalue())
    return path
