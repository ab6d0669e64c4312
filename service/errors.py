"""Domain errors with stable UPPER_SNAKE reasons, and the one table that maps them to the wire.

Every layer raises these. `ErrorKind` is the table: each kind names its gRPC status code and its
HTTP status; service/grpc and service/http read it and nothing else decides a status. This module
imports nothing of the project, so the engine and the domain can both raise from it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class ErrorKind(enum.Enum):
    """The one error table: (gRPC status code name, HTTP status)."""

    INVALID_ARGUMENT = ("INVALID_ARGUMENT", 400)
    NOT_FOUND = ("NOT_FOUND", 404)
    ALREADY_EXISTS = ("ALREADY_EXISTS", 409)
    FAILED_PRECONDITION = ("FAILED_PRECONDITION", 409)
    PERMISSION_DENIED = ("PERMISSION_DENIED", 403)
    UNAUTHENTICATED = ("UNAUTHENTICATED", 401)
    RESOURCE_EXHAUSTED = ("RESOURCE_EXHAUSTED", 429)
    UNAVAILABLE = ("UNAVAILABLE", 503)
    DEADLINE_EXCEEDED = ("DEADLINE_EXCEEDED", 504)
    CANCELLED = ("CANCELLED", 499)
    UNIMPLEMENTED = ("UNIMPLEMENTED", 501)
    INTERNAL = ("INTERNAL", 500)

    @property
    def grpc_code_name(self) -> str:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: its path as the client wrote it (e.g. "sampling.temperature") and why."""

    field: str
    description: str


@dataclass(frozen=True)
class ResourceRef:
    """The resource an error is about (google.rpc.ResourceInfo)."""

    type: str
    name: str


@dataclass
class RwkvdError(Exception):
    """Base of every error a client may see. `reason` is stable and machine-readable."""

    message: str
    reason: str = "INTERNAL"
    violations: Sequence[FieldViolation] = ()
    resource: ResourceRef | None = None
    # Seconds after which a retry may succeed (google.rpc.RetryInfo / HTTP Retry-After).
    retry_after: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    kind = ErrorKind.INTERNAL

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    @property
    def first_field(self) -> str | None:
        """The first offending field, if any (for dialects that name one field, e.g. OpenAI's param)."""
        return self.violations[0].field if self.violations else None


class InvalidArgument(RwkvdError):
    kind = ErrorKind.INVALID_ARGUMENT

    @classmethod
    def for_field(cls, field_path: str, description: str, reason: str = "INVALID_ARGUMENT") -> InvalidArgument:
        return cls(f"{field_path}: {description}", reason=reason, violations=(FieldViolation(field_path, description),))

    @classmethod
    def for_fields(cls, violations: Sequence[FieldViolation], reason: str = "INVALID_ARGUMENT") -> InvalidArgument:
        text = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(text, reason=reason, violations=tuple(violations))


class NotFound(RwkvdError):
    kind = ErrorKind.NOT_FOUND

    @classmethod
    def resource_missing(cls, type_: str, name: str, reason: str, detail: str = "") -> NotFound:
        text = f"{type_} {name!r} not found" + (f": {detail}" if detail else "")
        return cls(text, reason=reason, resource=ResourceRef(type_, name))


class AlreadyExists(RwkvdError):
    kind = ErrorKind.ALREADY_EXISTS


class FailedPrecondition(RwkvdError):
    kind = ErrorKind.FAILED_PRECONDITION


class PermissionDenied(RwkvdError):
    kind = ErrorKind.PERMISSION_DENIED


class Unauthenticated(RwkvdError):
    kind = ErrorKind.UNAUTHENTICATED


class ResourceExhausted(RwkvdError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(RwkvdError):
    kind = ErrorKind.UNAVAILABLE


class DeadlineExceeded(RwkvdError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Cancelled(RwkvdError):
    kind = ErrorKind.CANCELLED


class Unimplemented(RwkvdError):
    kind = ErrorKind.UNIMPLEMENTED


class InternalError(RwkvdError):
    kind = ErrorKind.INTERNAL
