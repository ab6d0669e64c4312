"""Prompt formats the server builds from structured input."""

from __future__ import annotations

# Fill in the middle, as RWKV-Server and rwkv_lightning write it (U+273F); the model writes the middle.
FIM_MARK = "✿"


def fim_prompt(prefix: str, suffix: str) -> str:
    return f"{FIM_MARK}prefix{FIM_MARK}{FIM_MARK}suffix{FIM_MARK}{suffix}{FIM_MARK}middle{FIM_MARK}{prefix}"
