"""Per-call helpers shared by the servicers: the context type and the call's deadline."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

# grpc's classes are generic only in their stubs; the aliases exist for the type checker alone.
if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext


def deadline_of(context: Context) -> float | None:
    """The client's deadline as a time.monotonic() value, so the engine can drop the request when it passes."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
