"""Prediction inputs in Replicate's LLM naming, checked and turned into a prompt and sampling overrides.

Accepted: prompt (required), system_prompt, prompt_template ("{prompt}" and "{system_prompt}"),
max_tokens | max_new_tokens, min_tokens | min_new_tokens (-1 = none), temperature, top_p, top_k,
presence_penalty, frequency_penalty, repetition_penalty (Hugging Face style, 1 = off),
penalty_decay, seed, stop_sequences (comma-separated string or list). Anything else is refused,
naming it. Without a template the RWKV chat format is applied and the model stops before a new
user turn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.errors import FieldViolation, InvalidArgument

from .prompts import CHAT_STOPS, chat_prompt
from .sampling import SamplingOverrides

_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list"}
_INT = (int,)
_NUMBER = (int, float)
_FIELDS: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "system_prompt": (str,),
    "prompt_template": (str,),
    "max_tokens": _INT,
    "max_new_tokens": _INT,
    "min_tokens": _INT,
    "min_new_tokens": _INT,
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "top_k": _INT,
    "presence_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "repetition_penalty": _NUMBER,
    "penalty_decay": _NUMBER,
    "seed": _INT,
    "stop_sequences": (str, list),
}


@dataclass(frozen=True)
class PredictionInput:
    prompt: str
    sampling: SamplingOverrides


def parse_input(raw: Mapping[str, Any]) -> PredictionInput:
    """Checks every input (all problems at once, as input.<name>) and builds the prompt and overrides."""
    bad: list[FieldViolation] = []
    values: dict[str, Any] = {}
    for name, value in raw.items():
        kinds = _FIELDS.get(name)
        if kinds is None:
            bad.append(FieldViolation(f"input.{name}", "unknown input for this model"))
        elif value is None:
            continue
        elif isinstance(value, bool) or not isinstance(value, kinds):  # bool is an int to Python, not to JSON
            bad.append(FieldViolation(f"input.{name}", f"must be {' or '.join(_KIND_NAMES[k] for k in kinds)}"))
        else:
            values[name] = value
    if "prompt" not in values and not any(v.field == "input.prompt" for v in bad):
        bad.append(FieldViolation("input.prompt", "required"))
    template = values.get("prompt_template")
    if template is not None and "{prompt}" not in template:
        bad.append(FieldViolation("input.prompt_template", "must contain {prompt}"))
    stops = values.get("stop_sequences")
    if isinstance(stops, list) and not all(isinstance(s, str) for s in stops):
        bad.append(FieldViolation("input.stop_sequences", "must be strings"))
    if bad:
        raise InvalidArgument.for_fields(bad, reason="INVALID_INPUT")

    prompt = values["prompt"]
    system = values.get("system_prompt")
    if template is not None:
        text = template.replace("{system_prompt}", system or "").replace("{prompt}", prompt)
        stop: tuple[str, ...] = ()
    else:
        text = chat_prompt(([("System", system)] if system else []) + [("User", prompt)])
        stop = CHAT_STOPS
    if isinstance(stops, str):
        stop += tuple(s for s in (x.strip() for x in stops.split(",")) if s)
    elif stops:
        stop += tuple(s for s in stops if s)

    min_tokens = _first(values, "min_tokens", "min_new_tokens")
    return PredictionInput(
        prompt=text,
        sampling=SamplingOverrides(
            max_tokens=_first(values, "max_tokens", "max_new_tokens"),
            min_tokens=None if min_tokens is None or min_tokens < 0 else min_tokens,
            temperature=_float(values.get("temperature")),
            top_p=_float(values.get("top_p")),
            top_k=values.get("top_k"),
            presence_penalty=_float(values.get("presence_penalty")),
            frequency_penalty=_float(values.get("frequency_penalty")),
            multiplicative_repetition_penalty=_float(values.get("repetition_penalty")),
            penalty_decay=_float(values.get("penalty_decay")),
            seed=values.get("seed"),
            stop=stop,
        ),
    )


def _first(values: Mapping[str, Any], *names: str) -> Any:
    return next((values[n] for n in names if n in values), None)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
