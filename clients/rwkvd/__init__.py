"""rwkvd: the typed Python client of rwkvd, the RWKV-7 gRPC inference server.

    with rwkvd.Client("localhost:50051") as client:
        print(client.complete("The capital of France is", max_tokens=16).text)
        with client.chat(history=[("system", "You are terse.")]) as chat:
            print("".join(chat.send("What is RWKV?")), chat.last_turn.usage)
        print(client.create_task("Once upon a time", max_tokens=64).wait().result)
        print("".join(client.run("local/rwkv7-demo", input={"prompt": "Hi!"})))

AsyncClient is the asyncio client; Client runs one on a private event loop for synchronous code.
Chat sessions are AsyncChatSession / ChatSession handles, tasks AsyncTask / Task handles, and
predictions Prediction records. Failed calls raise the exceptions below (all subclasses of
RwkvdError); a prediction that fails raises PredictionError.
The generated messages and stubs live in rwkvd.v1.
"""

from ._version import __version__
from .chat import AsyncChatSession, ChatRole, ChatSession, MessageLike, TurnResult
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
    from_status,
)
from .params import SamplingOptions
from .predictions import Prediction, PredictionError, PredictionPage, PredictionStatus, WebhookEvent
from .sync_client import Client
from .tasks import AsyncTask, FinishReason, Task, TaskKind, TaskStatus

__all__ = [
    "AlreadyExists",
    "AsyncChatSession",
    "AsyncClient",
    "AsyncTask",
    "Cancelled",
    "ChatRole",
    "ChatSession",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "FinishReason",
    "Internal",
    "InvalidArgument",
    "MessageLike",
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
    "TurnResult",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "WebhookEvent",
    "__version__",
    "from_rpc_error",
    "from_status",
]
