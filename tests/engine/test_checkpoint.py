"""Checkpoint loading and validation (service/engine/checkpoint.py) and the generator (generator.py).

Small vocabularies (V=1000) keep the files tiny; the loader does not care about the vocabulary size.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from service.engine.checkpoint import CheckpointError, ModelShape, expected_shapes, load_checkpoint
from service.engine.generator import (
    RELEASED_SHAPES,
    generate_state_dict,
    model_shape,
    released_shape,
    write_checkpoint,
)

V = 1000
SMALL = model_shape(2, 128, vocab_size=V)


def small_state_dict(**kw: object) -> dict[str, torch.Tensor]:
    return generate_state_dict(SMALL, seed=7, **kw)  # type: ignore[arg-type]


def write(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "m.pth") -> Path:
    return write_checkpoint(tensors, tmp_path / name)


# ---- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer0_v", [False, True])
def test_loads_every_format_dtype_and_layer0_variant(
    tmp_path: Path, suffix: str, dtype: torch.dtype, layer0_v: bool
) -> None:
    tensors = small_state_dict(dtype=dtype, layer0_value_lora=layer0_v)
    path = write(tmp_path, tensors, "m" + suffix)
    ckpt = load_checkpoint(path)
    assert ckpt.shape == SMALL
    assert ckpt.dtype == dtype
    assert ckpt.dtype_name == {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    assert ckpt.layer0_value_lora is layer0_v
    assert ("blocks.0.att.v1" in ckpt.tensors) is layer0_v
    assert ckpt.tensors.keys() == tensors.keys()
    for key, value in tensors.items():
        assert ckpt.tensors[key].dtype == dtype
        assert torch.equal(ckpt.tensors[key], value), key  # bit-exact round trip through the file
    assert ckpt.parameter_count == sum(t.numel() for t in tensors.values())
    assert ckpt.source == str(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_sha256_is_the_file_sha256(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path, small_state_dict(), "m" + suffix)
    assert load_checkpoint(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_shape_is_read_from_tensor_shapes(tmp_path: Path) -> None:
    # Unusual but consistent dimensions: every field must come from the tensors, none from a default.
    shape = model_shape(3, 192, vocab_size=777, head_size=32, ffn_mult=3, lora=(32, 64, 96, 128))
    path = write(tmp_path, generate_state_dict(shape, seed=1, dtype=torch.float32))
    got = load_checkpoint(path).shape
    assert got == ModelShape(
        n_layer=3,
        n_embd=192,
        n_head=6,
        head_size=32,
        vocab_size=777,
        ffn_dim=576,
        decay_lora=32,
        aaa_lora=64,
        mv_lora=96,
        gate_lora=128,
    )
    assert got.state_numel() == (2 * 3 * 192, 3 * 6 * 32 * 32)


def test_value_lora_rank_read_when_layer0_has_it(tmp_path: Path) -> None:
    shape = model_shape(2, 128, vocab_size=V, lora=(32, 32, 64, 32))
    path = write(tmp_path, generate_state_dict(shape, dtype=torch.float32, layer0_value_lora=True))
    assert load_checkpoint(path).shape.mv_lora == 64


# ---- refusals -----------------------------------------------------------------------------------


def refuse(tmp_path: Path, tensors: object, *needles: str) -> str:
    path = tmp_path / "bad.pth"
    torch.save(tensors, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


def test_refuses_rwkv6_checkpoint(tmp_path: Path) -> None:
    t = small_state_dict()
    t["blocks.0.att.time_decay"] = torch.zeros(128)
    refuse(tmp_path, t, "RWKV-4/5/6", "blocks.0.att.time_decay")


def test_refuses_deepembed_checkpoint(tmp_path: Path) -> None:
    t = small_state_dict()
    t["blocks.0.ffn.s_emb.weight"] = torch.zeros(V, 32)
    refuse(tmp_path, t, "DeepEmbed", "blocks.0.ffn.s_emb.weight")


def test_refuses_missing_key(tmp_path: Path) -> None:
    t = small_state_dict()
    del t["blocks.1.att.k_a"]
    refuse(tmp_path, t, "missing keys", "blocks.1.att.k_a")


def test_refuses_missing_value_lora_outside_layer0(tmp_path: Path) -> None:
    t = small_state_dict()
    del t["blocks.1.att.v1"]
    refuse(tmp_path, t, "missing keys", "blocks.1.att.v1")


def test_refuses_unknown_extra_key(tmp_path: Path) -> None:
    t = small_state_dict()
    t["blocks.1.att.mystery"] = torch.zeros(128)
    refuse(tmp_path, t, "unknown keys", "blocks.1.att.mystery")


def test_refuses_partial_layer0_value_lora(tmp_path: Path) -> None:
    t = small_state_dict(layer0_value_lora=True)
    del t["blocks.0.att.v2"]
    refuse(tmp_path, t, "layer 0 has only part of v0/v1/v2")


@pytest.mark.parametrize(
    ("key", "bad_shape"),
    [
        ("blocks.1.att.w1", (128, 48)),  # decay LoRA rank differs from layer 0's
        ("blocks.0.ffn.value.weight", (128, 500)),  # does not match ffn.key
        ("head.weight", (V + 1, 128)),  # vocabulary differs from emb
        ("blocks.1.att.x_r", (1, 1, 64)),  # a [1, 1, C] vector of the wrong width
    ],
)
def test_refuses_inconsistent_shape(tmp_path: Path, key: str, bad_shape: tuple[int, ...]) -> None:
    t = small_state_dict()
    t[key] = torch.zeros(bad_shape, dtype=t[key].dtype)
    refuse(tmp_path, t, "inconsistent shapes", key)


def test_refuses_non_contiguous_layers(tmp_path: Path) -> None:
    t = {k.replace("blocks.1.", "blocks.2."): v for k, v in small_state_dict().items()}
    refuse(tmp_path, t, "missing blocks [1]")


def test_refuses_non_dict_file(tmp_path: Path) -> None:
    refuse(tmp_path, [torch.zeros(3)], "expected a dict of tensors", "list")


def test_refuses_non_tensor_value(tmp_path: Path) -> None:
    t: dict[str, object] = dict(small_state_dict())
    t["emb.weight"] = 3
    refuse(tmp_path, t, "emb.weight", "not a tensor")


def test_refuses_unsupported_dtype(tmp_path: Path) -> None:
    t = small_state_dict()
    t["ln_out.bias"] = torch.zeros(128, dtype=torch.int32)
    refuse(tmp_path, t, "unsupported tensor dtypes", "int32")


def test_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nothing-here.pth")


def test_refuses_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read as a checkpoint"):
        load_checkpoint(path)


def test_refuses_unreadable_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="cannot read as a checkpoint"):
        load_checkpoint(path)


# ---- generator ----------------------------------------------------------------------------------


def test_generator_is_deterministic_in_its_seed() -> None:
    a = generate_state_dict(SMALL, seed=3, dtype=torch.float32)
    b = generate_state_dict(SMALL, seed=3, dtype=torch.float32)
    c = generate_state_dict(SMALL, seed=4, dtype=torch.float32)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Random tensors differ with the seed (the fixed ones, e.g. x_r or w0, are seed-independent by design).
    for key in ("emb.weight", "head.weight", "blocks.1.att.key.weight", "blocks.0.att.w1", "blocks.1.att.v2"):
        assert not torch.equal(a[key], c[key]), key


def test_generator_tensor_does_not_depend_on_other_tensors() -> None:
    # With or without layer-0 v-LoRA, every shared key has the same values (per-key generators).
    a = generate_state_dict(SMALL, seed=3, dtype=torch.float32)
    b = generate_state_dict(SMALL, seed=3, dtype=torch.float32, layer0_value_lora=True)
    assert set(b) - set(a) == {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generator_file_bytes_depend_only_on_tensors(tmp_path: Path) -> None:
    t = small_state_dict()
    one = write_checkpoint(t, tmp_path / "one.pth").read_bytes()
    two = write_checkpoint(t, tmp_path / "two.pth").read_bytes()
    assert one == two


@pytest.mark.parametrize(
    ("name", "n_layer", "n_embd", "lora"),
    [
        ("0.1b", 12, 768, (64, 64, 32, 128)),
        ("0.4b", 24, 1024, (64, 64, 32, 128)),
        ("1.5b", 24, 2048, (96, 96, 64, 256)),
        ("2.9b", 32, 2560, (96, 96, 64, 320)),
        ("7.2b", 32, 4096, (128, 128, 96, 480)),
    ],
)
def test_released_shapes(name: str, n_layer: int, n_embd: int, lora: tuple[int, int, int, int]) -> None:
    s = released_shape(name)
    assert (s.n_layer, s.n_embd, s.head_size, s.n_head, s.vocab_size) == (n_layer, n_embd, 64, n_embd // 64, 65536)
    assert (s.decay_lora, s.aaa_lora, s.mv_lora, s.gate_lora) == lora
    assert s.ffn_dim == 4 * n_embd
    assert released_shape(name.upper()) == s


def test_released_shape_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown size"):
        released_shape("3b")
    assert set(RELEASED_SHAPES) == {"0.1b", "0.4b", "1.5b", "2.9b", "7.2b"}


# Per-layer [1, 1, C] vectors that expected_shapes() leaves to the numel check (v0 only above layer 0).
_VECTORS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a")


def parameter_count(s: ModelShape) -> int:
    """Parameters of a released-format file (layer 0 without v0/v1/v2), from checkpoint.expected_shapes."""
    per_layer = expected_shapes(s)
    total = 2 * s.vocab_size * s.n_embd + 2 * s.n_embd + 2 * s.n_embd  # emb, head, ln0, ln_out
    for i in range(s.n_layer):
        for key, dims in per_layer.items():
            if i == 0 and key in ("att.v1", "att.v2"):
                continue
            total += math.prod(dims)
        total += s.n_embd * (len(_VECTORS) + 1 + (1 if i > 0 else 0))  # + ffn.x_k, + v0
    return total


def test_parameter_count_matches_a_generated_file() -> None:
    # The counting rule above against a real (small) state dict, so the big-model numbers below mean something.
    shape = model_shape(3, 128, vocab_size=V, lora=(32, 64, 32, 96))
    tensors = generate_state_dict(shape, dtype=torch.bfloat16)
    assert parameter_count(shape) == sum(t.numel() for t in tensors.values())


@pytest.mark.parametrize(("name", "published"), [("0.1b", 191.0e6), ("2.9b", 2948e6), ("7.2b", 7199.9e6)])
def test_released_parameter_counts(name: str, published: float) -> None:
    # Published sizes (RWKV-7 model cards); 0.1% tolerance covers their rounding to 4-5 digits.
    assert parameter_count(released_shape(name)) == pytest.approx(published, rel=1e-3)
