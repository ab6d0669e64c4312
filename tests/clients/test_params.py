"""Python arguments to Prompt and SamplingParams messages."""

from __future__ import annotations

import pytest
import rwkvd
from rwkvd.params import prompt_message, sampling_params
from rwkvd.v1 import common_pb2


def test_sampling_params_sets_only_what_is_given() -> None:
    params = sampling_params(temperature=0, stop="\n", seed=None, stop_token_ids=[5], ignore_eos=False)
    assert params == common_pb2.SamplingParams(temperature=0, stop=["\n"], stop_token_ids=[5], ignore_eos=False)
    assert [f.name for f, _ in params.ListFields()] == ["temperature", "stop", "stop_token_ids", "ignore_eos"]
    assert sampling_params() == common_pb2.SamplingParams()


def test_every_sampling_option_is_a_sampling_params_field() -> None:
    fields = {f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields}
    assert set(rwkvd.SamplingOptions.__optional_keys__) == fields


def test_unknown_sampling_options_are_refused() -> None:
    with pytest.raises(TypeError, match="temprature"):
        sampling_params(temprature=1.0)  # type: ignore[call-arg]


def test_prompt_is_text_or_token_ids() -> None:
    assert prompt_message("hi") == common_pb2.Prompt(text="hi")
    assert prompt_message((1, 2)) == common_pb2.Prompt(tokens=common_pb2.TokenIds(ids=[1, 2]))
    assert prompt_message([]).WhichOneof("input") == "tokens"
    with pytest.raises(TypeError, match="bytes"):
        prompt_message(b"hi")


def test_arguments_are_checked_when_the_method_is_called() -> None:
    client = rwkvd.Client("127.0.0.1:1")
    try:
        with pytest.raises(TypeError, match="bytes"):
            client.complete_stream(b"x")  # bytes is a Sequence[int]: only the runtime check stops it
        with pytest.raises(TypeError, match="temprature"):
            client.complete("x", temprature=1.0)  # type: ignore[call-arg]
    finally:
        client.close()
