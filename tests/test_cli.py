"""The rwkvd command: make-checkpoint writes a loadable official-format file; usage errors exit non-zero."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main
from service.engine.checkpoint import load_checkpoint


def test_make_checkpoint_writes_a_loadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.pth"
    assert main(["make-checkpoint", str(out), "--layers", "3", "--embd", "192", "--dtype", "float16"]) == 0
    ckpt = load_checkpoint(out)
    assert (ckpt.shape.n_layer, ckpt.shape.n_embd, ckpt.shape.vocab_size) == (3, 192, 65536)
    assert ckpt.dtype_name == "float16"
    assert "L3 C192" in capsys.readouterr().out


def test_make_checkpoint_safetensors_with_layer0_value_lora(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    assert main(["make-checkpoint", str(out), "--layer0-v", "--seed", "7"]) == 0
    assert load_checkpoint(out).layer0_value_lora


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "usage: rwkvd" in capsys.readouterr().out
