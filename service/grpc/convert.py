"""The only place protobuf meets domain and engine types: pure functions, one direction each."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import status_pb2
from rwkvd.v1 import chat_pb2, common_pb2, completions_pb2, models_pb2, predictions_pb2, tasks_pb2

from service.domain.chat import ChatMessage, ChatRequest, ChatResult, ChatRole, PreparedChat
from service.domain.completions import CompletionRequest, CompletionResult
from service.domain.predictions import Prediction, PredictionEvent, PredictionStatus, WebhookEvent
from service.domain.sampling import SamplingOverrides
from service.domain.sessions import ChatSession
from service.domain.task_state import RoundDelta, RoundEvent, RoundStarted, Task, TaskKind, TaskStatus
from service.domain.tasks import TaskInput
from service.engine.protocol import (
    Delta,
    Finished,
    FinishReason,
    ModelInfo,
    SamplingParams,
    Timings,
    TokenLogprob,
    Usage,
)
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
        state_dtype=m.state_dtype,
    )


# Tasks

TASK_KINDS = {
    TaskKind.TEMPORARY: tasks_pb2.TASK_KIND_TEMPORARY,
    TaskKind.PERSISTENT: tasks_pb2.TASK_KIND_PERSISTENT,
    TaskKind.TEMPLATE: tasks_pb2.TASK_KIND_TEMPLATE,
}
_TASK_KINDS_BACK = {v: k for k, v in TASK_KINDS.items()}
# The proto enum keeps 0 for UNSPECIFIED, so RWKV-Server's 0..3 are one up.
TASK_STATUSES = {s: tasks_pb2.TaskStatus.ValueType(int(s) + 1) for s in TaskStatus}


def task_kind(pb: tasks_pb2.TaskKind.ValueType, default: TaskKind) -> TaskKind:
    """The requested kind; UNSPECIFIED is `default`."""
    if pb == tasks_pb2.TASK_KIND_UNSPECIFIED:
        return default
    kind = _TASK_KINDS_BACK.get(pb)
    if kind is None:
        raise InvalidArgument.for_field("kind", f"unknown task kind {pb}")
    return kind


def task_input(pb: tasks_pb2.CreateTaskRequest | tasks_pb2.CreateTaskStreamRequest) -> TaskInput:
    """The prompt of a new task: text, token ids, or fill in the middle."""
    if pb.WhichOneof("input") == "fim":
        return TaskInput(fim=(pb.fim.prefix, pb.fim.suffix))
    text, tokens = prompt(pb.prompt, pb.HasField("prompt"))
    return TaskInput(text=text, tokens=tokens)


def optional_task_input(pb: common_pb2.Prompt, has_prompt: bool) -> TaskInput | None:
    """A fork's or continue's prompt; None when absent (the generation goes on from the state)."""
    if not has_prompt:
        return None
    text, tokens = prompt(pb, True)
    return TaskInput(text=text, tokens=tokens)


def sampling_params(p: SamplingParams) -> common_pb2.SamplingParams:
    """Resolved parameters, every field set (Hugging Face's multiplicative penalty has no field here)."""
    return common_pb2.SamplingParams(
        max_tokens=p.max_tokens,
        min_tokens=p.min_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        penalty_decay=p.penalty_decay,
        seed=p.seed,
        stop=p.stop,
        stop_token_ids=p.stop_token_ids,
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
    )


def task(t: Task, sampling: SamplingParams) -> tasks_pb2.Task:
    r = t.round
    return tasks_pb2.Task(
        task_id=t.id,
        kind=TASK_KINDS[t.kind],
        status=TASK_STATUSES[r.status],
        result=r.text,
        generated_tokens=len(r.tokens),
        finished=r.finished,
        finish_reason=FINISH_REASONS[r.finish_reason] if r.finish_reason else common_pb2.FINISH_REASON_UNSPECIFIED,
        usage=usage(r.usage),
        timings=timings(r.timings, r.usage.completion_tokens),
        sampling=sampling_params(sampling),
        seed=t.seed or 0,
        parent_task_id=t.parent_id or "",
        state_tokens=t.state_tokens,
        create_time=timestamp(t.created),
        update_time=timestamp(t.updated),
        error=r.error or "",
    )


def task_info(t: Task) -> tasks_pb2.TaskInfo:
    return tasks_pb2.TaskInfo(
        task_id=t.id,
        kind=TASK_KINDS[t.kind],
        status=TASK_STATUSES[t.round.status],
        generated_tokens=len(t.round.tokens),
        create_time=timestamp(t.created),
    )


def task_event(e: RoundEvent) -> dict[str, Any]:
    """The oneof field of a task stream message (CreateTaskStreamResponse, SubscribeTaskResponse) for an event."""
    if isinstance(e, RoundStarted):
        started = tasks_pb2.TaskStarted(
            task_id=e.task_id,
            prefill_seconds=e.prefill_seconds,
            prompt_tokens=e.prompt_tokens,
            cached_tokens=e.cached_tokens,
        )
        return {"started": started}
    if isinstance(e, RoundDelta):
        return {"delta": common_pb2.GenerationDelta(offset=e.offset, token_ids=e.token_ids, text=e.text)}
    finished = tasks_pb2.TaskFinished(
        task_id=e.task_id,
        finish_reason=FINISH_REASONS[e.finish_reason],
        usage=usage(e.usage),
        timings=timings(e.timings, e.usage.completion_tokens),
        error=e.error or "",
    )
    return {"finished": finished}


def page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode()


def after_page_token(token: str) -> str:
    """The id a page token continues after ("" for the first page)."""
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode() if token else ""
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise InvalidArgument.for_field("page_token", "not a token from a previous response") from exc


# Predictions

PREDICTION_STATUSES = {
    PredictionStatus.STARTING: predictions_pb2.PREDICTION_STATUS_STARTING,
    PredictionStatus.PROCESSING: predictions_pb2.PREDICTION_STATUS_PROCESSING,
    PredictionStatus.SUCCEEDED: predictions_pb2.PREDICTION_STATUS_SUCCEEDED,
    PredictionStatus.FAILED: predictions_pb2.PREDICTION_STATUS_FAILED,
    PredictionStatus.CANCELED: predictions_pb2.PREDICTION_STATUS_CANCELED,
}
WEBHOOK_EVENTS = {
    WebhookEvent.START: predictions_pb2.WEBHOOK_EVENT_START,
    WebhookEvent.OUTPUT: predictions_pb2.WEBHOOK_EVENT_OUTPUT,
    WebhookEvent.LOGS: predictions_pb2.WEBHOOK_EVENT_LOGS,
    WebhookEvent.COMPLETED: predictions_pb2.WEBHOOK_EVENT_COMPLETED,
}
_WEBHOOK_EVENTS_BACK = {v: k for k, v in WEBHOOK_EVENTS.items()}
_MAX_EXACT_INTEGER = 2**53  # a JSON number beyond this is not an exact integer


def plain(value: struct_pb2.Value) -> Any:
    """A Struct value as JSON-like Python; whole numbers become int (a Struct holds every number as a double,
    and inputs such as max_tokens must be integers)."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        n = value.number_value
        return int(n) if math.isfinite(n) and n.is_integer() and abs(n) <= _MAX_EXACT_INTEGER else n
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: plain(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [plain(v) for v in value.list_value.values]
    return None


def prediction_input(pb: struct_pb2.Struct) -> dict[str, Any]:
    return {k: plain(v) for k, v in pb.fields.items()}


def model_ref(model: str, version: str) -> tuple[str, str]:
    """(model, version) of a request; one of them is required."""
    if not model and not version:
        raise InvalidArgument.for_field("version", "set model (owner/name) or version", reason="MISSING_FIELD")
    return model, version


def webhook(url: str) -> str | None:
    if url and not url.startswith(("http://", "https://")):
        raise InvalidArgument.for_field("webhook", "must be an http:// or https:// URL")
    return url or None


def webhook_events(pb: Sequence[predictions_pb2.WebhookEvent.ValueType]) -> list[str] | None:
    """Event names of a filter; None (every event) when empty."""
    names: list[str] = []
    for value in pb:
        event = _WEBHOOK_EVENTS_BACK.get(value)
        if event is None:
            raise InvalidArgument.for_field("webhook_events_filter", f"unknown webhook event {value}")
        names.append(event.value)
    return names or None


def wait_seconds(pb: predictions_pb2.CreatePredictionRequest) -> float | None:
    if not pb.HasField("wait_seconds"):
        return None
    if not 1 <= pb.wait_seconds <= 60:
        raise InvalidArgument.for_field("wait_seconds", "must be in [1, 60]")
    return float(pb.wait_seconds)


def json_value(value: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    if value is None:
        v.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        v.bool_value = value
    elif isinstance(value, int | float):
        v.number_value = value
    elif isinstance(value, str):
        v.string_value = value
    elif isinstance(value, dict):
        v.struct_value.update(value)
    else:
        v.list_value.extend(value)
    return v


def prediction(p: Prediction) -> predictions_pb2.Prediction:
    m = p.metrics
    pb = predictions_pb2.Prediction(
        id=p.id,
        model=p.model,
        version=p.version,
        output=json_value(p.output),
        status=PREDICTION_STATUSES[p.status],
        error=p.error or "",
        logs=p.logs,
        metrics=predictions_pb2.PredictionMetrics(
            predict_time_seconds=m.get("predict_time", 0.0),
            total_time_seconds=m.get("total_time", 0.0),
            input_token_count=int(m.get("input_token_count", 0)),
            output_token_count=int(m.get("output_token_count", 0)),
            tokens_per_second=m.get("tokens_per_second", 0.0),
            time_to_first_token_seconds=m.get("time_to_first_token", 0.0),
        ),
        create_time=timestamp(p.created),
        webhook=p.webhook or "",
        webhook_events_filter=[WEBHOOK_EVENTS[e] for e in p.webhook_events_filter],
    )
    pb.input.update(p.input)
    if p.started is not None:
        pb.start_time.CopyFrom(timestamp(p.started))
    if p.completed is not None:
        pb.complete_time.CopyFrom(timestamp(p.completed))
    return pb


def last_event_id(text: str) -> int:
    """The event a stream resumes after (0 = from the start)."""
    if not text:
        return 0
    if not text.isdigit():
        raise InvalidArgument.for_field("last_event_id", "must be an event_id from a previous stream")
    return int(text)


def prediction_event(e: PredictionEvent, status: PredictionStatus) -> predictions_pb2.StreamPredictionResponse:
    """One stream message; `status` is the prediction's, for the final done event."""
    Response = predictions_pb2.StreamPredictionResponse
    event_id = str(e.id)
    if e.kind == "output":
        return Response(event_id=event_id, output=e.data)
    if e.kind == "logs":
        return Response(event_id=event_id, logs=e.data)
    if e.kind == "error":
        return Response(event_id=event_id, error=e.data)
    return Response(event_id=event_id, done=predictions_pb2.PredictionDone(status=PREDICTION_STATUSES[status]))


# Chat

CHAT_ROLES = {
    chat_pb2.CHAT_ROLE_SYSTEM: ChatRole.SYSTEM,
    chat_pb2.CHAT_ROLE_DEVELOPER: ChatRole.DEVELOPER,
    chat_pb2.CHAT_ROLE_USER: ChatRole.USER,
    chat_pb2.CHAT_ROLE_ASSISTANT: ChatRole.ASSISTANT,
}


def chat_messages(pb: Sequence[chat_pb2.ChatMessage], field: str) -> tuple[ChatMessage, ...]:
    messages = []
    for i, message in enumerate(pb):
        role = CHAT_ROLES.get(message.role)
        if role is None:
            raise InvalidArgument.for_field(f"{field}[{i}].role", "must be system, developer, user or assistant")
        messages.append(ChatMessage(role, message.content))
    return tuple(messages)


def chat_request(pb: chat_pb2.CompleteRequest | chat_pb2.CompleteStreamRequest, deadline: float | None) -> ChatRequest:
    return ChatRequest(
        messages=chat_messages(pb.messages, "messages"),
        model=pb.model,
        sampling=sampling_overrides(pb.sampling),
        n=pb.n or 1,  # proto3 cannot tell 0 from absent: absent is one choice
        user=pb.user,
        deadline=deadline,
    )


def chat_response(r: ChatResult) -> chat_pb2.CompleteResponse:
    return chat_pb2.CompleteResponse(
        id=r.id,
        model=r.model,
        create_time=timestamp(r.created),
        choices=[
            chat_pb2.ChatChoice(
                index=c.index,
                message=chat_pb2.ChatMessage(role=chat_pb2.CHAT_ROLE_ASSISTANT, content=c.text),
                finish_reason=FINISH_REASONS[c.finish_reason],
                logprobs=[logprob(lp) for lp in c.logprobs],
            )
            for c in r.choices
        ],
        usage=usage(r.usage),
        timings=timings(r.timings, r.usage.completion_tokens),
        seed=r.seed,
    )


def chat_chunk(
    chat: PreparedChat, choices: Sequence[chat_pb2.ChoiceDelta] = (), end_usage: Usage | None = None
) -> chat_pb2.CompleteStreamResponse:
    """One CompleteStream message; `end_usage` goes on the last one."""
    return chat_pb2.CompleteStreamResponse(
        id=chat.id,
        model=chat.model,
        create_time=timestamp(chat.created),
        choices=choices,
        usage=usage(end_usage) if end_usage is not None else None,
    )


def choice_delta(index: int, event: Delta | Finished) -> chat_pb2.ChoiceDelta:
    """A choice's generated tokens, or its end (an empty delta carrying the finish reason)."""
    if isinstance(event, Delta):
        return chat_pb2.ChoiceDelta(index=index, delta=delta(event))
    end = common_pb2.GenerationDelta(offset=event.usage.completion_tokens)
    return chat_pb2.ChoiceDelta(index=index, delta=end, finish_reason=FINISH_REASONS[event.reason])


def chat_session(s: ChatSession, expire_time: float) -> chat_pb2.Session:
    return chat_pb2.Session(
        session_id=s.id,
        model=s.model,
        turns=s.turns,
        state_tokens=s.state_tokens,
        create_time=timestamp(s.created),
        last_used_time=timestamp(s.last_used),
        expire_time=timestamp(expire_time),
    )


def turn_delta(turn_id: str, d: Delta) -> chat_pb2.ConverseResponse:
    return chat_pb2.ConverseResponse(delta=chat_pb2.TurnDelta(turn_id=turn_id, delta=delta(d)))


def turn_end(turn_id: str, f: Finished, session_tokens: int, text: str) -> chat_pb2.ConverseResponse:
    """The end of a turn. The engine counts only the turn's new text as its prompt; the tokens the session's
    state already held (`session_tokens`) were not read again, so they count as cached."""
    turn_usage = Usage(f.usage.prompt_tokens, f.usage.completion_tokens, session_tokens + f.usage.cached_tokens)
    return chat_pb2.ConverseResponse(
        turn_end=chat_pb2.TurnEnd(
            turn_id=turn_id,
            finish_reason=FINISH_REASONS[f.reason],
            usage=usage(turn_usage),
            timings=timings(f.timings, f.usage.completion_tokens),
            text=text,
        )
    )


def turn_error(turn_id: str, status: status_pb2.Status) -> chat_pb2.ConverseResponse:
    return chat_pb2.ConverseResponse(error=chat_pb2.TurnError(turn_id=turn_id, status=status))
