"""Domain errors as gRPC statuses with google.rpc details (ErrorInfo always; BadRequest, RetryInfo,
ResourceInfo when the error carries them). The code comes from the one table in service.errors."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from service.errors import RwkvdError

ERROR_DOMAIN = "rwkvd"
DETAILS_KEY = "grpc-status-details-bin"


def code_of(error: RwkvdError) -> grpc.StatusCode:
    return grpc.StatusCode[error.kind.grpc_code_name]


def status_of(error: RwkvdError) -> status_pb2.Status:
    details: list[Any] = [
        error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=dict(error.metadata))
    ]
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if error.resource is not None:
        details.append(
            error_details_pb2.ResourceInfo(resource_type=error.resource.type, resource_name=error.resource.name)
        )
    packed = []
    for detail in details:
        box = any_pb2.Any()
        box.Pack(detail)
        packed.append(box)
    return status_pb2.Status(code=code_of(error).value[0], message=error.message, details=packed)


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: RwkvdError) -> NoReturn:
    """Ends the call with the error's status and details (raises grpc.aio.AbortError)."""
    status = status_of(error)
    await context.abort(code_of(error), error.message, trailing_metadata=((DETAILS_KEY, status.SerializeToString()),))
    raise AssertionError("context.abort returned")  # it always raises
