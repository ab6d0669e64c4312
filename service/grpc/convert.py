"""The only place protobuf meets domain and engine types: pure functions, one direction each."""

from __future__ import annotations

import dataclasses
from typing import Any

from google.protobuf import timestamp_pb2
from rwkvd.v1 import common_pb2, completions_pb2, models_pb2

from service.domain.completions import CompletionRequest, CompletionResult
from service.domain.sampling import SamplingOverrides
from service.engine.protocol import Delta, FinishReason, ModelInfo, Timings, TokenLogprob, Usage
from service.errors import InvalidArgument

FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.STOP_SEQUENCE: common_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: common_pb2.FINISH_REASON_DEADLINE,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


def sampling_overrides(pb: common_pb2.SamplingParams) -> SamplingOverrides:
    """The fields the client set (proto3 optional scalars and non-empty lists); the rest stay None."""
    given: dict[str, Any] = {fd.name: tuple(v) if fd.is_repeated else v for fd, v in pb.ListFields()}
    return dataclasses.replace(SamplingOverrides(), **given)


def prompt(pb: common_pb2.Prompt, has_prompt: bool, field: str = "prompt") -> tuple[str | None, tuple[int, ...] | None]:
    """(text, tokens) of a Prompt; exactly one is set."""
    which = pb.WhichOneof("input") if has_prompt else None
    if which == "text":
        return pb.text, None
    if which == "tokens":
        return None, tuple(pb.tokens.ids)
    raise InvalidArgument.for_field(field, "required: set prompt.text or prompt.tokens", reason="MISSING_FIELD")


def completion_request(
    pb: completions_pb2.CreateCompletionRequest | completions_pb2.CreateCompletionStreamRequest,
    deadline: float | None,
) -> CompletionRequest:
    text, tokens = prompt(pb.prompt, pb.HasField("prompt"))
    return CompletionRequest(
        model=pb.model,
        text=text,
        tokens=tokens,
        suffix=pb.suffix,
        sampling=sampling_overrides(pb.sampling),
        deadline=deadline,
    )


def usage(u: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        cached_tokens=u.cached_tokens,
    )


def timings(t: Timings, completion_tokens: int) -> common_pb2.Timings:
    return common_pb2.Timings(
        queue_seconds=t.queue_seconds,
        prefill_seconds=t.prefill_seconds,
        first_token_seconds=t.first_token_seconds,
        generation_seconds=t.generation_seconds,
        tokens_per_second=t.tokens_per_second(completion_tokens),
    )


def logprob(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        token=lp.token,
        logprob=lp.logprob,
        top_logprobs=[common_pb2.TopLogprob(token_id=i, token=b, logprob=v) for i, b, v in lp.top],
    )


def delta(d: Delta) -> common_pb2.GenerationDelta:
    return common_pb2.GenerationDelta(
        offset=d.offset, token_ids=d.token_ids, text=d.text, logprobs=[logprob(lp) for lp in d.logprobs]
    )


def completion_response(r: CompletionResult) -> completions_pb2.CreateCompletionResponse:
    return completions_pb2.CreateCompletionResponse(
        id=r.id,
        model=r.model,
        text=r.text,
        token_ids=r.token_ids,
        finish_reason=FINISH_REASONS[r.finish_reason],
        usage=usage(r.usage),
        timings=timings(r.timings, r.usage.completion_tokens),
        seed=r.seed,
        logprobs=[logprob(lp) for lp in r.logprobs],
    )


def timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(unix_seconds * 1e9))
    return ts


def model(m: ModelInfo) -> models_pb2.Model:
    dw, da, dv, dg = m.lora
    return models_pb2.Model(
        id=m.id,
        version=m.version,
        architecture=m.architecture,
        shape=models_pb2.ModelShape(
            n_layer=m.n_layer,
            n_embd=m.n_embd,
            n_head=m.n_head,
            head_size=m.head_size,
            vocab_size=m.vocab_size,
            ffn_dim=m.ffn_dim,
            decay_lora=dw,
            aaa_lora=da,
            mv_lora=dv,
            gate_lora=dg,
        ),
        parameter_count=m.parameter_count,
        checkpoint_dtype=m.checkpoint_dtype,
        dtype=m.dtype,
        backend=m.backend,
        device=m.device,
        demo=m.demo,
        source=m.source,
        load_time=timestamp(m.load_time),
        max_batch_size=m.max_batch_size,
    )
