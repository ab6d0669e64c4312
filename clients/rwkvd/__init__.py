"""rwkvd: the typed Python client of rwkvd, the RWKV-7 gRPC inference server.

    with rwkvd.Client("localhost:50051") as client:
        print(client.complete("The capital of France is", max_tokens=16).text)
        print(client.create_task("Once upon a time", max_tokens=64).wait().result)
        print("".join(client.run("local/rwkv7-demo", input={"prompt": "Hi!"})))

AsyncClient is the asyncio client; Client runs one on a private event loop for synchronous code.
Tasks come back as AsyncTask / Task handles, predictions as Prediction records. Failed calls raise
the exceptions below (all subclasses of RwkvdError); a prediction that fails raises PredictionError.
The generated messages and stubs live in rwkvd.v1.
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
from .predictions import Prediction, PredictionError, PredictionPage, PredictionStatus, WebhookEvent
from .sync_client import Client
from .tasks import AsyncTask, FinishReason, Task, TaskKind, TaskStatus

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncTask",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "FinishReason",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Prediction",
    "PredictionError",
    "PredictionPage",
    "PredictionStatus",
    "ResourceExhausted",
    "RwkvdError",
    "SamplingOptions",
    "Stubs",
    "Task",
    "TaskKind",
    "TaskStatus",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "WebhookEvent",
    "__version__",
    "from_rpc_error",
]
