"""Typed exceptions for gRPC errors: one class per status code, with the google.rpc details decoded.

The server sends a google.rpc.Status in the `grpc-status-details-bin` trailer (or, for a failed turn of
a chat session, in-band); its ErrorInfo, BadRequest, RetryInfo and ResourceInfo details become
attributes here, so callers never unpack Any.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One rejected request field, as a path from the request root (e.g. "sampling.temperature")."""

    field: str
    description: str


class RwkvdError(Exception):
    """Base of every error the client raises for a failed call; also used as is for codes without a subclass.

    `reason` is the stable, machine-readable UPPER_SNAKE cause (ErrorInfo.reason; "" when the server
    sent none, e.g. for errors made by gRPC itself such as a passed deadline). `metadata` is
    ErrorInfo.metadata. `retry_delay` is RetryInfo's delay in seconds; `resource` is ResourceInfo's
    (type, name).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        field_violations: Iterable[FieldViolation] = (),
        retry_delay: float | None = None,
        resource: tuple[str, str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.field_violations = list(field_violations)
        self.retry_delay = retry_delay
        self.resource = resource
        self.metadata = dict(metadata or {})

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickling re-calls the class with self.args (the message alone), which would lose
        # the details: errors cross process boundaries (multiprocessing, ProcessPoolExecutor) whole.
        details: dict[str, Any] = {
            "reason": self.reason,
            "domain": self.domain,
            "field_violations": self.field_violations,
            "retry_delay": self.retry_delay,
            "resource": self.resource,
            "metadata": self.metadata,
        }
        return (functools.partial(type(self), **details), (self.code, self.message))


class InvalidArgument(RwkvdError):
    """The request is malformed or a value is out of range; `field_violations` names the fields."""


class NotFound(RwkvdError):
    """The model, task, prediction or session does not exist here; `resource` says which."""


class AlreadyExists(RwkvdError):
    pass


class FailedPrecondition(RwkvdError):
    """The resource is not in a state that allows the call (e.g. continuing a running task)."""


class PermissionDenied(RwkvdError):
    pass


class Unauthenticated(RwkvdError):
    """No bearer token, or one the server does not accept."""


class ResourceExhausted(RwkvdError):
    """The server is at capacity; retry after `retry_delay` seconds when given."""


class Unavailable(RwkvdError):
    """The server cannot be reached or is draining; already retried by the channel's retry policy."""


class DeadlineExceeded(RwkvdError):
    """The call's deadline (its `timeout=`) passed before it ended."""


class Cancelled(RwkvdError):
    pass


class Unimplemented(RwkvdError):
    """This server does not implement the method (reason NOT_IMPLEMENTED for APIs not built yet)."""


class Internal(RwkvdError):
    """A server bug."""


_BY_CODE: dict[grpc.StatusCode, type[RwkvdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
}


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def from_rpc_error(err: grpc.RpcError) -> RwkvdError:
    """The typed exception for a failed call (grpc.aio.AioRpcError or a sync grpc.RpcError)."""
    code, message, trailers = _call_parts(err)
    return _BY_CODE.get(code, RwkvdError)(code, message, **_decoded(_status_details(trailers)))


def from_status(status: status_pb2.Status) -> RwkvdError:
    """The typed exception for a google.rpc.Status sent in-band (a failed turn of a chat session)."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, RwkvdError)(code, status.message, **_decoded(status.details))


def _decoded(details: Iterable[Any]) -> dict[str, Any]:
    """RwkvdError's keyword arguments from the Any-packed details of a google.rpc.Status."""
    info: dict[str, Any] = {}
    for detail in details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            error_info = error_details_pb2.ErrorInfo()
            detail.Unpack(error_info)
            info.update(reason=error_info.reason, domain=error_info.domain, metadata=dict(error_info.metadata))
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            info["field_violations"] = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            info["retry_delay"] = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            detail.Unpack(resource)
            info["resource"] = (resource.resource_type, resource.resource_name)
    return info


def _call_parts(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, Iterable[tuple[str, str | bytes]]]:
    # The aio error and the sync one (which is also a grpc.Call) expose the same three accessors,
    # but share no typed base that declares them.
    if isinstance(err, grpc.aio.AioRpcError | grpc.Call):
        return err.code(), err.details() or "", err.trailing_metadata() or ()
    return grpc.StatusCode.UNKNOWN, str(err), ()


def _status_details(trailers: Iterable[tuple[str, str | bytes]]) -> list[Any]:
    """The Any-packed details of the google.rpc.Status trailer; none if absent or unreadable."""
    for key, value in trailers:
        if key == DETAILS_KEY and isinstance(value, bytes):
            try:
                return list(status_pb2.Status.FromString(value).details)
            except DecodeError:  # a malformed trailer must not hide the call's own error
                return []
    return []
