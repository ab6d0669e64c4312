"""RWKV-7 checkpoints: load official BlinkDL files (.pth or .safetensors) by key name and validate them.

Owns the key schema of an x070 checkpoint and the `ModelShape` read from its tensor shapes. A file that
is not RWKV-7 (RWKV-6, DeepEmbed, missing or unknown keys, inconsistent shapes) is refused with a
`CheckpointError` that names what is wrong. Nothing here computes the model.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .progress import Progress

# Per-layer keys of an x070 block. v0/v1/v2 (value-residual LoRA) are unused in layer 0, where released
# files omit them and trainer output has them; both are accepted.
_ATT_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a")
_ATT_MATRICES = ("receptance.weight", "key.weight", "value.weight", "output.weight")
_ATT_LORA = ("w1", "w2", "a1", "a2", "g1", "g2")
_VALUE_LORA = ("v0", "v1", "v2")
_LAYER_KEYS = (
    *(f"ln{n}.{p}" for n in (1, 2) for p in ("weight", "bias")),
    *(f"att.{k}" for k in (*_ATT_VECTORS, *_ATT_MATRICES, *_ATT_LORA, "r_k", "ln_x.weight", "ln_x.bias")),
    "ffn.x_k",
    "ffn.key.weight",
    "ffn.value.weight",
)
_TOP_KEYS = ("emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias", "ln_out.weight", "ln_out.bias", "head.weight")
_FLOAT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Markers of architectures we refuse, checked before anything else so the message says what the file is.
_FOREIGN = (
    (re.compile(r"\.att\.time_(mix|decay|faaaa|first)"), "an RWKV-4/5/6 checkpoint (time_mix/time_decay keys)"),
    (re.compile(r"\.ffn\.(s_emb|s_emb_x|s0|s1|s2)\b"), "a DeepEmbed RWKV-7 variant (ffn.s_emb keys)"),
    (re.compile(r"^(model\.|transformer\.|lm_head)"), "a Hugging Face-format checkpoint (convert it to BlinkDL keys)"),
)


class CheckpointError(ValueError):
    """The file is not a loadable RWKV-7 checkpoint; the message says why."""


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of an RWKV-7 network, all read from tensor shapes."""

    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    ffn_dim: int
    decay_lora: int
    aaa_lora: int
    mv_lora: int
    gate_lora: int

    def state_numel(self) -> tuple[int, int]:
        """Elements per sequence state: (token-shift x of att and ffn, WKV matrices)."""
        return 2 * self.n_layer * self.n_embd, self.n_layer * self.n_head * self.head_size**2


@dataclass(frozen=True)
class Checkpoint:
    tensors: Mapping[str, torch.Tensor]
    shape: ModelShape
    # sha256 of the file (hex); for in-memory weights, of their canonical safetensors bytes.
    sha256: str
    dtype: torch.dtype
    source: str
    layer0_value_lora: bool

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def dtype_name(self) -> str:
        return _FLOAT_DTYPES[self.dtype]


def tensor_count(n_layer: int, layer0_value_lora: bool = False) -> int:
    """Tensors in an x070 checkpoint of n_layer layers."""
    return len(_TOP_KEYS) + n_layer * len(_LAYER_KEYS) + len(_VALUE_LORA) * (n_layer - 1 + layer0_value_lora)


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f, Progress("hashing checkpoint", path.stat().st_size, "B") as progress:
        while block := f.read(chunk):
            digest.update(block)
            progress.advance(len(block))
    return digest.hexdigest()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Reads and validates a checkpoint file; tensors stay on the CPU in the file's dtype."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors: dict[str, torch.Tensor] = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(loaded, dict):
                raise CheckpointError(f"{path}: expected a dict of tensors, found {type(loaded).__name__}")
            tensors = loaded
    except CheckpointError:
        raise
    except Exception as exc:  # any unreadable file: say so with the loader's reason
        raise CheckpointError(f"{path}: cannot read as a checkpoint ({type(exc).__name__}: {exc})") from exc
    return validate_state_dict(tensors, source=str(path), sha256=file_sha256(path))


def validate_state_dict(tensors: Mapping[str, object], *, source: str, sha256: str) -> Checkpoint:
    """Checks keys and shapes of an x070 state dict; returns it with its shape, or raises CheckpointError."""
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
    for pattern, what in _FOREIGN:
        hit = next((k for k in tensors if pattern.search(k)), None)
        if hit is not None:
            raise CheckpointError(f"{source}: this is {what}, found key {hit!r}; rwkvd serves RWKV-7 (x070) only")
    t: dict[str, torch.Tensor] = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}

    layers = sorted({int(m.group(1)) for k in t if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not layers:
        raise CheckpointError(f"{source}: no blocks.N.* keys; not an RWKV checkpoint")
    if layers != list(range(len(layers))):
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        raise CheckpointError(f"{source}: layers are not contiguous, missing blocks {missing}")
    n_layer = len(layers)

    expected = set(_TOP_KEYS)
    for i in range(n_layer):
        expected.update(f"blocks.{i}.{k}" for k in _LAYER_KEYS)
        if i > 0:
            expected.update(f"blocks.{i}.att.{k}" for k in _VALUE_LORA)
    optional = {f"blocks.0.att.{k}" for k in _VALUE_LORA}
    missing_keys = sorted(expected - t.keys())
    if missing_keys:
        raise CheckpointError(f"{source}: missing keys {_few(missing_keys)}")
    unknown = sorted(t.keys() - expected - optional)
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {_few(unknown)}; not a plain RWKV-7 (x070) checkpoint")
    layer0_v = optional <= t.keys()
    if not layer0_v and optional & t.keys():
        raise CheckpointError(f"{source}: layer 0 has only part of v0/v1/v2: {sorted(optional & t.keys())}")

    dtypes = {v.dtype for v in t.values()}
    bad = dtypes - _FLOAT_DTYPES.keys()
    if bad:
        raise CheckpointError(f"{source}: unsupported tensor dtypes {sorted(map(str, bad))}")
    shape = _read_shape(t, n_layer, source)
    _check_shapes(t, shape, layer0_v, source)
    return Checkpoint(
        tensors=t,
        shape=shape,
        sha256=sha256,
        dtype=t["emb.weight"].dtype,
        source=source,
        layer0_value_lora=layer0_v,
    )


def _read_shape(t: Mapping[str, torch.Tensor], n_layer: int, source: str) -> ModelShape:
    emb = t["emb.weight"]
    if emb.dim() != 2:
        raise CheckpointError(f"{source}: emb.weight must be [vocab, n_embd], is {list(emb.shape)}")
    vocab, n_embd = emb.shape
    r_k = t["blocks.0.att.r_k"]
    if r_k.dim() != 2:
        raise CheckpointError(f"{source}: blocks.0.att.r_k must be [n_head, head_size], is {list(r_k.shape)}")
    n_head, head_size = r_k.shape
    if n_head * head_size != n_embd:
        raise CheckpointError(f"{source}: r_k {list(r_k.shape)} does not divide n_embd {n_embd}")
    # The value-residual rank comes from the first layer that has v1 (layer 0 may lack it).
    v1 = next((t[f"blocks.{i}.att.v1"] for i in range(n_layer) if f"blocks.{i}.att.v1" in t), None)
    lora = [t["blocks.0.att.w1"], t["blocks.0.att.a1"], t["blocks.0.att.g1"], *([] if v1 is None else [v1])]
    for tensor in lora:
        if tensor.dim() != 2:
            raise CheckpointError(f"{source}: LoRA weights must be 2-d, found {list(tensor.shape)}")
    return ModelShape(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        head_size=head_size,
        vocab_size=vocab,
        ffn_dim=t["blocks.0.ffn.key.weight"].shape[0],
        decay_lora=lora[0].shape[1],
        aaa_lora=lora[1].shape[1],
        mv_lora=0 if v1 is None else v1.shape[1],
        gate_lora=lora[2].shape[1],
    )


def expected_shapes(s: ModelShape) -> dict[str, tuple[int, ...]]:
    """Shape of every per-layer key (numel for [1,1,C] vectors is checked separately) and of the top keys."""
    c, f = s.n_embd, s.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {
        "ln1.weight": (c,),
        "ln1.bias": (c,),
        "ln2.weight": (c,),
        "ln2.bias": (c,),
        "att.r_k": (s.n_head, s.head_size),
        "att.ln_x.weight": (c,),
        "att.ln_x.bias": (c,),
        "att.w1": (c, s.decay_lora),
        "att.w2": (s.decay_lora, c),
        "att.a1": (c, s.aaa_lora),
        "att.a2": (s.aaa_lora, c),
        "att.g1": (c, s.gate_lora),
        "att.g2": (s.gate_lora, c),
        "att.v1": (c, s.mv_lora),
        "att.v2": (s.mv_lora, c),
        "ffn.key.weight": (f, c),
        "ffn.value.weight": (c, f),
    }
    shapes.update({f"att.{m}": (c, c) for m in _ATT_MATRICES})
    return shapes


def _check_shapes(t: Mapping[str, torch.Tensor], s: ModelShape, layer0_v: bool, source: str) -> None:
    c = s.n_embd
    per_layer = expected_shapes(s)
    wrong: list[str] = []
    for key, tensor in t.items():
        m = re.match(r"blocks\.\d+\.(.+)$", key)
        if m is None:
            want: tuple[int, ...] = (s.vocab_size, c) if key in ("emb.weight", "head.weight") else (c,)
            if tuple(tensor.shape) != want:
                wrong.append(f"{key} {list(tensor.shape)} != {list(want)}")
            continue
        name = m.group(1)
        if name in per_layer:
            if tuple(tensor.shape) != per_layer[name]:
                wrong.append(f"{key} {list(tensor.shape)} != {list(per_layer[name])}")
        elif tensor.numel() != c:  # [1, 1, C] mixes and biases, ln0 [C]
            wrong.append(f"{key} has {tensor.numel()} elements, expected {c}")
    if wrong:
        raise CheckpointError(f"{source}: inconsistent shapes: {_few(wrong)}")


def _few(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
