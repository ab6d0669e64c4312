"""gRPC errors to typed exceptions: the google.rpc details decoded, for aio and sync errors alike."""

from __future__ import annotations

import asyncio
import pickle

import grpc
import pytest
import rwkvd
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from rwkvd.errors import DETAILS_KEY, FieldViolation, from_rpc_error, from_status
from rwkvd.v1 import common_pb2, completions_pb2, completions_pb2_grpc

from tests.clients.conftest import Server

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _aio_error(code: grpc.StatusCode, *details: Message, trailer: bytes | None = None) -> grpc.aio.AioRpcError:
    packed = []
    for detail in details:
        box = any_pb2.Any()
        box.Pack(detail)
        packed.append(box)
    status = status_pb2.Status(code=code.value[0], message="why", details=packed)
    raw = status.SerializeToString() if trailer is None else trailer
    trailers = grpc.aio.Metadata(("x-other", "1"), (DETAILS_KEY, raw))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details="why")


async def test_every_detail_is_decoded() -> None:
    error = from_rpc_error(
        _aio_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="rwkvd", metadata={"queued": "64"}),
            error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(field="prompt", description="too long")]
            ),
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000)),
            error_details_pb2.ResourceInfo(resource_type="model", resource_name="local/x"),
        )
    )
    assert type(error) is rwkvd.ResourceExhausted
    assert (error.code, error.message, error.reason, error.domain) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "why",
        "QUEUE_FULL",
        "rwkvd",
    )
    assert error.metadata == {"queued": "64"}
    assert error.field_violations == [FieldViolation("prompt", "too long")]
    assert error.retry_delay == 1.5
    assert error.resource == ("model", "local/x")
    assert str(error) == "RESOURCE_EXHAUSTED [QUEUE_FULL]: why"


async def test_an_in_band_status_is_decoded_the_same_way() -> None:
    # A failed turn of a chat session comes as a google.rpc.Status inside a stream message, not as trailers.
    info, bad = any_pb2.Any(), any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="TURN_RUNNING", domain="rwkvd"))
    bad.Pack(error_details_pb2.BadRequest(field_violations=[{"field": "sampling.top_p", "description": "no"}]))
    status = status_pb2.Status(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="busy", details=[info, bad])
    error = from_status(status)
    assert type(error) is rwkvd.FailedPrecondition
    assert (error.code, error.message, error.reason, error.domain) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "busy",
        "TURN_RUNNING",
        "rwkvd",
    )
    assert error.field_violations == [FieldViolation("sampling.top_p", "no")]
    unknown = from_status(status_pb2.Status(code=99, message="?"))
    assert (type(unknown), unknown.code) == (rwkvd.RwkvdError, grpc.StatusCode.UNKNOWN)


async def test_errors_pickle_whole() -> None:
    error = from_rpc_error(
        _aio_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            error_details_pb2.ErrorInfo(reason="BAD", domain="rwkvd"),
            error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(field="f", description="d")]
            ),
        )
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is rwkvd.InvalidArgument
    assert (copy.code, copy.message, copy.reason, copy.field_violations) == (
        error.code,
        "why",
        "BAD",
        [FieldViolation("f", "d")],
    )
    assert str(copy) == str(error)


async def test_errors_without_details_and_codes_without_a_class() -> None:
    bare = from_rpc_error(grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()))
    assert type(bare) is rwkvd.Unavailable
    assert (bare.reason, bare.field_violations, bare.retry_delay, bare.resource, bare.metadata) == (
        "",
        [],
        None,
        None,
        {},
    )
    assert type(from_rpc_error(_aio_error(grpc.StatusCode.DATA_LOSS))) is rwkvd.RwkvdError
    assert type(from_rpc_error(_aio_error(grpc.StatusCode.INTERNAL, trailer=b"\xff not a status"))) is rwkvd.Internal


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, rwkvd.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, rwkvd.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, rwkvd.AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, rwkvd.FailedPrecondition),
        (grpc.StatusCode.PERMISSION_DENIED, rwkvd.PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, rwkvd.Unauthenticated),
        (grpc.StatusCode.DEADLINE_EXCEEDED, rwkvd.DeadlineExceeded),
        (grpc.StatusCode.CANCELLED, rwkvd.Cancelled),
        (grpc.StatusCode.UNIMPLEMENTED, rwkvd.Unimplemented),
        (grpc.StatusCode.UNKNOWN, rwkvd.RwkvdError),
    ],
)
async def test_one_class_per_code(code: grpc.StatusCode, cls: type[rwkvd.RwkvdError]) -> None:
    error = from_rpc_error(_aio_error(code))
    assert type(error) is cls
    assert error.code is code


async def test_sync_grpc_errors_are_decoded_too(server: Server) -> None:
    # A plain synchronous grpc channel, without this package's client: from_rpc_error is usable on its own.
    def call() -> rwkvd.RwkvdError:
        with grpc.insecure_channel(server.target) as channel:
            stub = completions_pb2_grpc.CompletionServiceStub(channel)
            request = completions_pb2.CreateCompletionRequest(model="nope/x", prompt=common_pb2.Prompt(text="x"))
            try:
                stub.CreateCompletion(request, timeout=10)
            except grpc.RpcError as err:
                return from_rpc_error(err)
        raise AssertionError("the call succeeded")

    error = await asyncio.to_thread(call)
    assert type(error) is rwkvd.NotFound
    assert error.resource == ("model", "nope/x")
    assert error.domain == "rwkvd"
