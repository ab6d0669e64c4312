"""Prompt formats the server builds from structured input: RWKV chat turns and fill in the middle."""

from __future__ import annotations

import re
from collections.abc import Sequence

# Fill in the middle, as RWKV-Server and rwkv_lightning write it (U+273F); the model writes the middle.
FIM_MARK = "✿"
# A turn of the RWKV World / G1 chat format is "Role: content" followed by a blank line; the model stops
# before it would speak for the user (the blank line before "User:" is not part of the reply).
CHAT_STOPS = ("\n\nUser:", "\nUser:")


def fim_prompt(prefix: str, suffix: str) -> str:
    return f"{FIM_MARK}prefix{FIM_MARK}{FIM_MARK}suffix{FIM_MARK}{suffix}{FIM_MARK}middle{FIM_MARK}{prefix}"


def turn_content(text: str) -> str:
    """Content of one turn: blank lines would read as the end of the turn, so runs of newlines become one."""
    return re.sub(r"\n\s*\n", "\n", text.strip())


def render_turn(role: str, content: str) -> str:
    """One turn: "Role: content" and the blank line that ends it."""
    return f"{role}: {turn_content(content)}\n\n"


def chat_prompt(turns: Sequence[tuple[str, str]], open_assistant: bool = True) -> str:
    """("System"|"User"|"Assistant", content) turns in the RWKV chat format, ending with "Assistant:"."""
    text = "".join(render_turn(role, content) for role, content in turns)
    return text + ASSISTANT_OPEN if open_assistant else text


ASSISTANT_OPEN = "Assistant:"
