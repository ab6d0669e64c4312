"""Servicers for services whose behaviour is not built yet: every RPC answers UNIMPLEMENTED, naming itself.

Registered so that clients, reflection and transcoding see the whole API shape today; each is replaced
by its real servicer when that capability lands. Health reports these services NOT_SERVING.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from service.errors import Unimplemented
from service.grpc.calls import Context


def unimplemented_servicer(base: type, service: ServiceDescriptor, planned: str) -> Any:
    """An instance of a subclass of the generated `base` whose every method raises Unimplemented."""

    def error(method: str) -> Unimplemented:
        return Unimplemented(
            f"{service.full_name}/{method} is not implemented in this version of rwkvd ({planned})",
            reason="NOT_IMPLEMENTED",
        )

    methods: dict[str, Any] = {}
    for m in service.methods:
        if m.server_streaming:

            async def streaming(self: Any, request: Any, context: Context, _name: str = m.name) -> AsyncIterator[Any]:
                raise error(_name)
                yield  # pragma: no cover - makes this an async generator

            methods[m.name] = streaming
        else:

            async def unary(self: Any, request: Any, context: Context, _name: str = m.name) -> Any:
                raise error(_name)

            methods[m.name] = unary
    return type(f"Unimplemented{service.name}", (base,), methods)()
