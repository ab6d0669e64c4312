"""rwkvd: the typed Python client of rwkvd, the RWKV-7 gRPC inference server.

    with rwkvd.Client("localhost:50051") as client:
        print(client.complete("The capital of France is", max_tokens=16).text)

AsyncClient is the asyncio client; Client runs one on a private event loop for synchronous code.
Failed calls raise the exceptions below (all subclasses of RwkvdError). The generated messages and
stubs live in rwkvd.v1.
"""

from ._version import __version__
from .client import AsyncClient, Stubs
from .errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RwkvdError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from .params import SamplingOptions
from .sync_client import Client

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RwkvdError",
    "SamplingOptions",
    "Stubs",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "__version__",
    "from_rpc_error",
]
