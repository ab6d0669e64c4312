"""Python arguments to the request messages every API shares: Prompt and SamplingParams.

Methods that generate take the sampling options as keyword arguments typed by SamplingOptions and
hand them to sampling_params(), the one place that knows how they map onto the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict, Unpack

from .v1 import common_pb2


class SamplingOptions(TypedDict, total=False):
    """Sampling and stopping, all optional: None or absent = the server's default for the API.

    Ranges are checked by the server (INVALID_ARGUMENT naming "sampling.<field>").
    """

    max_tokens: int | None  # 0 = prefill only
    min_tokens: int | None  # end of text and stop token ids are suppressed until then
    temperature: float | None  # [0, 5]; 0 = greedy
    top_p: float | None  # (0, 1]; 1 = off
    top_k: int | None  # 0 or -1 = off
    presence_penalty: float | None  # [-2, 10], subtracted once a token has appeared
    frequency_penalty: float | None  # [-2, 10], subtracted per appearance
    repetition_penalty: float | None  # [-2, 10], subtracted per repeat after the first
    penalty_decay: float | None  # [0, 1], applied to the penalties at each token
    seed: int | None  # absent = random, echoed back in the response
    stop: str | Sequence[str] | None  # stop strings, never emitted
    stop_token_ids: Sequence[int] | None  # in addition to end of text (0) unless ignore_eos
    ignore_eos: bool | None
    logprobs: bool | None
    top_logprobs: int | None  # [0, 20], with logprobs


def sampling_params(**options: Unpack[SamplingOptions]) -> common_pb2.SamplingParams:
    """The SamplingParams message; None leaves a field unset. Unknown names raise TypeError."""
    unknown = options.keys() - SamplingOptions.__optional_keys__
    if unknown:
        raise TypeError(f"unexpected sampling options: {', '.join(sorted(unknown))}")
    stop = options.get("stop")
    return common_pb2.SamplingParams(
        max_tokens=options.get("max_tokens"),
        min_tokens=options.get("min_tokens"),
        temperature=options.get("temperature"),
        top_p=options.get("top_p"),
        top_k=options.get("top_k"),
        presence_penalty=options.get("presence_penalty"),
        frequency_penalty=options.get("frequency_penalty"),
        repetition_penalty=options.get("repetition_penalty"),
        penalty_decay=options.get("penalty_decay"),
        seed=options.get("seed"),
        stop=[stop] if isinstance(stop, str) else stop,  # OpenAI style: one string or a list
        stop_token_ids=options.get("stop_token_ids"),
        ignore_eos=options.get("ignore_eos"),
        logprobs=options.get("logprobs"),
        top_logprobs=options.get("top_logprobs"),
    )


def prompt_message(prompt: str | Sequence[int]) -> common_pb2.Prompt:
    """Text (tokenized by the server) or token ids of the RWKV World vocabulary."""
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    if isinstance(prompt, bytes | bytearray):  # a Sequence[int] too, but surely meant as text
        raise TypeError("prompt must be str or a sequence of token ids, not bytes")
    return common_pb2.Prompt(tokens=common_pb2.TokenIds(ids=prompt))
