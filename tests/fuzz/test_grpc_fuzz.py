"""Property-based tests of the gRPC API: random requests to every RPC of a real server.

Whatever a request holds, the answer is never INTERNAL, UNKNOWN or another sign of a server fault, and every
INVALID_ARGUMENT carries a google.rpc.BadRequest whose violations name fields of the request that was sent
("sampling.top_p", "messages[0].content", "input.max_tokens": the first part is a field of the message).
Unary RPCs get whole random requests; streaming RPCs a random first message (and Converse a few), read to
their end.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message as pb_message
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rwkvd.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    common_pb2,
    completions_pb2,
    completions_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    predictions_pb2,
    predictions_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)

from tests.fuzz.conftest import EXAMPLES, ThreadedServer
from tests.fuzz.strategies import MODEL, POOL, PREDICTION_INPUTS, messages, mostly
from tests.reliability_support import rpc_details

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI never meets a new one by chance
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
TIMEOUT = 20.0  # seconds per call: generations are capped (conftest), so only a hang would reach it
# Codes that only a server fault produces (or, for DEADLINE_EXCEEDED here, a hang).
FAULTS = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
SERVICES: list[tuple[ServiceDescriptor, Any]] = [
    (models_pb2.DESCRIPTOR.services_by_name["ModelService"], models_pb2_grpc.ModelServiceStub),
    (completions_pb2.DESCRIPTOR.services_by_name["CompletionService"], completions_pb2_grpc.CompletionServiceStub),
    (tasks_pb2.DESCRIPTOR.services_by_name["TaskService"], tasks_pb2_grpc.TaskServiceStub),
    (predictions_pb2.DESCRIPTOR.services_by_name["PredictionService"], predictions_pb2_grpc.PredictionServiceStub),
    (chat_pb2.DESCRIPTOR.services_by_name["ChatService"], chat_pb2_grpc.ChatServiceStub),
]
METHODS = [(service, stub, method) for service, stub in SERVICES for method in service.methods]
UNARY = {f"{s.name}.{m.name}": (stub, m) for s, stub, m in METHODS if not m.client_streaming and not m.server_streaming}
SERVER_STREAMING = {
    f"{s.name}.{m.name}": (stub, m) for s, stub, m in METHODS if not m.client_streaming and m.server_streaming
}


def brief(request: Any) -> str:
    """A request for a failure message (a huge random string would bury the rest)."""
    text = str(request)
    return text if len(text) < 800 else text[:800] + f"... ({len(text)} characters)"


def names_a_field(path: str, descriptors: list[Descriptor], struct_keys: set[str]) -> bool:
    """Whether a violation's path ("sampling.top_p", "messages[0].content", "input.max_tokens") follows fields of
    one of the messages; inside a google.protobuf.Struct (prediction inputs) the key must be an input the
    request gave or one the server knows."""
    parts = [p for p in re.split(r"\.|\[\d+\]", path) if p]
    for descriptor in descriptors:
        current: Descriptor | None = descriptor
        for i, part in enumerate(parts):
            if current is None:
                break
            if current.full_name == "google.protobuf.Struct":
                return i == len(parts) - 1 and part in struct_keys
            field = current.fields_by_name.get(part)
            if field is None:
                if i == len(parts) - 1 and part in current.oneofs_by_name:  # a oneof none of whose fields is set
                    return True
                break
            current = field.message_type
        else:
            if parts:
                return True
    return False


def check_status(code: grpc.StatusCode, fields: list[str] | None, request: Any, descriptors: list[Descriptor]) -> None:
    """The properties of one failed call (or in-band error): no fault, and bad input names its fields."""
    assert code not in FAULTS, f"{code.name} for {brief(request)}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert fields, f"INVALID_ARGUMENT without a BadRequest field for {brief(request)}"
        given = set(request.input.keys()) if hasattr(request, "input") else set()
        wrong = [f for f in fields if not names_a_field(f, descriptors, given | set(PREDICTION_INPUTS))]
        assert not wrong, f"violations {wrong} name no field of {brief(request)}"


def check_error(err: grpc.RpcError, request: Any, descriptors: list[Descriptor] | None = None) -> None:
    details = rpc_details(err)
    code = err.code()  # type: ignore[attr-defined]
    check_status(code, details.fields if details else None, request, descriptors or [request.DESCRIPTOR])


# ---- the server's world: real ids for the requests to name --------------------------------------------


@pytest.fixture(scope="module")
def channel(server: ThreadedServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as opened:
        yield opened


@pytest.fixture(scope="module", autouse=True)
def world(server: ThreadedServer, channel: grpc.Channel) -> None:
    """Tasks, a template, a prediction and chat sessions to name, and what ids the APIs accept."""
    tasks = tasks_pb2_grpc.TaskServiceStub(channel)
    greedy = common_pb2.SamplingParams(max_tokens=3, temperature=0)
    made = []
    for kind in (tasks_pb2.TASK_KIND_TEMPORARY, tasks_pb2.TASK_KIND_PERSISTENT):
        request = tasks_pb2.CreateTaskStreamRequest(kind=kind, prompt=common_pb2.Prompt(text="Hello"), sampling=greedy)
        made.append(list(tasks.CreateTaskStream(request))[-1].finished.task_id)
    template = tasks.SaveTaskAsTemplate(tasks_pb2.SaveTaskAsTemplateRequest(task_id=made[1])).task.task_id
    running = tasks.CreateTask(tasks_pb2.CreateTaskRequest(prompt=common_pb2.Prompt(text="Hi"))).task.task_id
    predictions = predictions_pb2_grpc.PredictionServiceStub(channel)
    run = predictions_pb2.RunPredictionRequest(model=MODEL)
    run.input.update({"prompt": "Hi", "max_tokens": 2})
    prediction = predictions.RunPrediction(run).prediction
    chat = chat_pb2_grpc.ChatServiceStub(channel)
    history = [chat_pb2.ChatMessage(role=chat_pb2.CHAT_ROLE_SYSTEM, content="Be brief.")]
    opened = next(iter(chat.Converse(iter([chat_pb2.ConverseRequest(open=chat_pb2.OpenSession(history=history))]))))
    session = opened.opened.session.session_id
    state = chat.ExportSession(chat_pb2.ExportSessionRequest(session_id=session)).state
    version = models_pb2_grpc.ModelServiceStub(channel).ListModels(models_pb2.ListModelsRequest()).models[0].version
    POOL.values.update(
        task_id=[*made, template, running, "TMP_0", "TASK_" + "f" * 32],
        template_id=[template, made[0]],
        session_id=[session, "sess_missing"],
        id=[prediction.id, MODEL, version, f"{MODEL}:{version}", "no-such-prediction"],
        model=["", MODEL, version, f"{MODEL}:{version}", f"{MODEL}:0123", "local/other"],
        state=[state, state[: len(state) // 2], b"{}\n" + state.split(b"\n", 1)[1]],
        page_token=["", base64.urlsafe_b64encode(made[0].encode()).decode(), "!!!", "AAAA"],
        cursor=["", prediction.id, "0", "-1"],
    )
    assert server.idle()


# ---- unary RPCs ------------------------------------------------------------------------------------------


def request_class(method: MethodDescriptor) -> type[pb_message.Message]:
    return message_factory.GetMessageClass(method.input_type)


@pytest.mark.parametrize("name", UNARY)
@FUZZ
@given(data=st.data())
def test_unary_rpcs_never_fail_inside_and_name_bad_fields(
    server: ThreadedServer, channel: grpc.Channel, name: str, data: st.DataObject
) -> None:
    stub_class, method = UNARY[name]
    request = data.draw(messages(method.input_type), label="request")
    call = getattr(stub_class(channel), method.name)
    try:
        call(request, timeout=TIMEOUT)
    except grpc.RpcError as err:
        check_error(err, request)


def test_every_rpc_is_fuzzed() -> None:
    streamed = {f"{s.name}.{m.name}" for s, _, m in METHODS if m.server_streaming or m.client_streaming}
    assert set(UNARY) | streamed == {f"{s.name}.{m.name}" for s, _, m in METHODS}
    assert streamed == set(SERVER_STREAMING) | {"ChatService.Converse"}


# ---- streaming RPCs -------------------------------------------------------------------------------------

MAX_MESSAGES = 200  # a stream longer than this is cut (cancelled) by the test


@pytest.mark.parametrize("name", SERVER_STREAMING)
@FUZZ
@given(data=st.data())
def test_streaming_rpcs_never_fail_inside_and_name_bad_fields(
    server: ThreadedServer, channel: grpc.Channel, name: str, data: st.DataObject
) -> None:
    stub_class, method = SERVER_STREAMING[name]
    request = data.draw(messages(method.input_type), label="request")
    call = getattr(stub_class(channel), method.name)(request, timeout=TIMEOUT)
    try:
        for count, _ in enumerate(call):
            if count == MAX_MESSAGES:
                call.cancel()
                break
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED:  # type: ignore[attr-defined]
            check_error(err, request)


# What a Converse error may name: a field of the request, or of the open or turn message it concerns.
CONVERSE = [chat_pb2.ConverseRequest.DESCRIPTOR, chat_pb2.OpenSession.DESCRIPTOR, chat_pb2.UserTurn.DESCRIPTOR]
# A conversation: mostly an open first (else the stream ends at once), then turns, cancels and stray opens.
conversations = st.tuples(
    mostly(
        messages(chat_pb2.OpenSession.DESCRIPTOR).map(lambda o: chat_pb2.ConverseRequest(open=o)),
        messages(chat_pb2.ConverseRequest.DESCRIPTOR),
    ),
    st.lists(messages(chat_pb2.ConverseRequest.DESCRIPTOR), max_size=3),
).map(lambda t: [t[0], *t[1]])


@FUZZ
@given(requests=conversations)
def test_converse_never_fails_inside_and_names_bad_fields(
    server: ThreadedServer, channel: grpc.Channel, requests: list[chat_pb2.ConverseRequest]
) -> None:
    call = chat_pb2_grpc.ChatServiceStub(channel).Converse(iter(requests), timeout=TIMEOUT)
    try:
        for response in call:
            if response.WhichOneof("event") == "error":  # a failed turn, answered in-band
                status = response.error.status
                fields = [
                    v.field
                    for d in status.details
                    if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)
                    for v in _unpack_bad_request(d).field_violations
                ]
                check_status(CODES[status.code], fields, requests, CONVERSE)
    except grpc.RpcError as err:
        check_error(err, requests, CONVERSE)


def _unpack_bad_request(detail: Any) -> error_details_pb2.BadRequest:
    bad = error_details_pb2.BadRequest()
    detail.Unpack(bad)
    return bad


CODES = {code.value[0]: code for code in grpc.StatusCode}


def test_the_server_is_idle_after_the_fuzzing(server: ThreadedServer) -> None:
    """Nothing the random requests started is left running (or stuck) in the engine."""
    assert server.idle()


def bad_fields(err: grpc.RpcError) -> list[str]:
    details = rpc_details(err)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err  # type: ignore[attr-defined]
    assert details is not None
    return details.fields


def test_what_the_fuzzing_found(server: ThreadedServer, channel: grpc.Channel) -> None:
    """The cases these properties first failed on, kept as plain examples (each named the engine's "prompt" or
    "sampling.*" instead of the field the client wrote)."""
    huge = [chat_pb2.ChatMessage(role=chat_pb2.CHAT_ROLE_USER, content="huge " * 2000)]
    chat = chat_pb2_grpc.ChatServiceStub(channel)
    with pytest.raises(grpc.RpcError) as too_long:
        chat.Complete(chat_pb2.CompleteRequest(messages=huge), timeout=TIMEOUT)
    assert bad_fields(too_long.value) == ["messages"]
    with pytest.raises(grpc.RpcError) as too_long:
        list(chat.CompleteStream(chat_pb2.CompleteStreamRequest(messages=huge), timeout=TIMEOUT))
    assert bad_fields(too_long.value) == ["messages"]

    open_huge = chat_pb2.ConverseRequest(open=chat_pb2.OpenSession(history=huge))
    with pytest.raises(grpc.RpcError) as too_long:
        list(chat.Converse(iter([open_huge]), timeout=TIMEOUT))
    assert bad_fields(too_long.value) == ["history"]
    turn = chat_pb2.ConverseRequest(turn=chat_pb2.UserTurn(turn_id="t", content="huge " * 2000))
    replies = list(chat.Converse(iter([chat_pb2.ConverseRequest(open=chat_pb2.OpenSession()), turn]), timeout=TIMEOUT))
    error = replies[-1].error
    assert error.turn_id == "t"
    bad = [
        v.field
        for d in error.status.details
        if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)
        for v in _unpack_bad_request(d).field_violations
    ]
    assert bad == ["content"]

    # Beyond the engine's --max-new-tokens (4096 on this server), below the prediction API's own bound.
    predictions = predictions_pb2_grpc.PredictionServiceStub(channel)
    create = predictions_pb2.CreatePredictionRequest(model=MODEL)
    create.input.update({"prompt": "x", "max_new_tokens": 5000})
    with pytest.raises(grpc.RpcError) as too_many:
        predictions.CreatePrediction(create, timeout=TIMEOUT)
    assert bad_fields(too_many.value) == ["input.max_tokens"]
