"""The grpc.aio channel: target, TLS, bearer auth, default deadlines, retries, message sizes, keepalive.

Auth and the default deadline are applied by client interceptors, one per call kind (grpc.aio files
an interceptor under the first kind it implements only), so they hold for every RPC on the channel,
raw stub calls included, and bearer tokens work on insecure channels too (call credentials do not).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from ._version import __version__

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's limit: long prompts and exported states

# The server accepts pings 10 s apart or more, with or without calls; pinging idle connections
# finds a dead one (a restarted pod, a dropped NAT entry) before a call waits on it.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


@dataclass(frozen=True)
class ChannelSettings:
    target: str
    api_key: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    # Default deadline (seconds) of unary calls made without one; streams never get a default.
    timeout: float | None = 60.0
    # Attempts per call while the server answers UNAVAILABLE (gRPC caps this at 5); 1 = no retries.
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be > 0 or None")
        if not self.tls and (self.root_certificates or self.private_key or self.certificate_chain):
            raise ValueError("certificates are given but tls=False")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("a client certificate needs both private_key and certificate_chain")


def service_config(max_attempts: int) -> str:
    """Retries UNAVAILABLE (unreachable, restarting or draining server) with exponential backoff.

    gRPC retries a call only while no response message has arrived, so a stream is never replayed
    after its first token.
    """
    method: dict[str, Any] = {"name": [{}]}  # every method of every service
    if max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.5s",
            "maxBackoff": "5s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method]})


def channel_options(settings: ChannelSettings) -> list[tuple[str, str | int]]:
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(settings.max_attempts)),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.primary_user_agent", f"rwkvd-python/{__version__}"),
        *KEEPALIVE_OPTIONS,
    ]


def open_channel(settings: ChannelSettings) -> grpc.aio.Channel:
    """A channel bound to the running event loop (create it inside the loop that will use it)."""
    interceptors = _interceptors(settings)
    options = channel_options(settings)
    if not settings.tls:
        return grpc.aio.insecure_channel(settings.target, options=options, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=settings.root_certificates,
        private_key=settings.private_key,
        certificate_chain=settings.certificate_chain,
    )
    return grpc.aio.secure_channel(settings.target, credentials, options=options, interceptors=interceptors)


@dataclass(frozen=True)
class _CallDefaults:
    """What every call gets unless it says otherwise: the bearer token and, for unary calls, a deadline.

    Only unary-unary calls get the default deadline: a stream in either direction may rightly run
    for as long as its user wants.
    """

    api_key: str | None
    timeout: float | None

    def apply(self, details: grpc.aio.ClientCallDetails, unary: bool) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if self.api_key is not None and metadata.get("authorization") is None:
            metadata["authorization"] = f"Bearer {self.api_key}"
        timeout = details.timeout
        if timeout is None and unary:
            timeout = self.timeout
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc's interceptor methods are generic in the stubs only; these aliases keep the signatures readable.
_Details = grpc.aio.ClientCallDetails
_Requests = AsyncIterable[Any] | Iterable[Any]


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_unary_unary(
        self, continuation: Callable[[_Details, Any], Awaitable[Any]], client_call_details: _Details, request: Any
    ) -> Any:
        return await continuation(self._defaults.apply(client_call_details, unary=True), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_unary_stream(
        self, continuation: Callable[[_Details, Any], Awaitable[Any]], client_call_details: _Details, request: Any
    ) -> Any:
        return await continuation(self._defaults.apply(client_call_details, unary=False), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_stream_unary(
        self,
        continuation: Callable[[_Details, _Requests], Awaitable[Any]],
        client_call_details: _Details,
        request_iterator: _Requests,
    ) -> Any:
        return await continuation(self._defaults.apply(client_call_details, unary=False), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_stream_stream(
        self,
        continuation: Callable[[_Details, _Requests], Awaitable[Any]],
        client_call_details: _Details,
        request_iterator: _Requests,
    ) -> Any:
        return await continuation(self._defaults.apply(client_call_details, unary=False), request_iterator)


def _interceptors(settings: ChannelSettings) -> list[grpc.aio.ClientInterceptor]:
    defaults = _CallDefaults(settings.api_key, settings.timeout)
    return [_UnaryUnary(defaults), _UnaryStream(defaults), _StreamUnary(defaults), _StreamStream(defaults)]
