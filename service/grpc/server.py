"""The gRPC aio server: channel options, TLS, interceptors, servicers, health (per service) and reflection.

Health names: "" is the process (liveness: SERVING until exit); "rwkvd" is readiness (SERVING while
the engine is loaded and the server is not draining); each public service has its own status.
Limits: received messages above max_request_bytes and calls beyond grpc_max_concurrent_rpcs are refused
with RESOURCE_EXHAUSTED by gRPC itself, before any servicer runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from rwkvd.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    completions_pb2,
    completions_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    predictions_pb2,
    predictions_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)

from service.config import ServerConfig
from service.domain.chat import ChatCompletions
from service.domain.completions import Completions
from service.domain.predictions import PredictionManager
from service.domain.sessions import SessionManager
from service.domain.tasks import TaskManager
from service.engine.protocol import EngineClient

from .interceptors import AuthInterceptor, CallObserver, ObserveInterceptor
from .servicers.chat import ChatServicer
from .servicers.completions import CompletionServicer
from .servicers.models import ModelServicer
from .servicers.predictions import PredictionServicer
from .servicers.tasks import TaskServicer
from .servicers.unimplemented import unimplemented_servicer

log = logging.getLogger("rwkvd.grpc")
READINESS = "rwkvd"


@dataclass(frozen=True)
class Services:
    """The domain objects the servicers are built on."""

    engine: EngineClient
    completions: Completions
    tasks: TaskManager
    predictions: PredictionManager
    chat: ChatCompletions
    sessions: SessionManager
    observe: CallObserver | None = None  # metrics and tracing of calls


@dataclass(frozen=True)
class _Service:
    descriptor: ServiceDescriptor
    add: Callable[[Any, grpc.aio.Server], None]
    base: type
    build: Callable[[Services], Any] | None  # None: not implemented yet
    planned: str = ""


SERVICES = (
    _Service(
        models_pb2.DESCRIPTOR.services_by_name["ModelService"],
        models_pb2_grpc.add_ModelServiceServicer_to_server,
        models_pb2_grpc.ModelServiceServicer,
        lambda s: ModelServicer(s.engine),
    ),
    _Service(
        completions_pb2.DESCRIPTOR.services_by_name["CompletionService"],
        completions_pb2_grpc.add_CompletionServiceServicer_to_server,
        completions_pb2_grpc.CompletionServiceServicer,
        lambda s: CompletionServicer(s.completions),
    ),
    _Service(
        tasks_pb2.DESCRIPTOR.services_by_name["TaskService"],
        tasks_pb2_grpc.add_TaskServiceServicer_to_server,
        tasks_pb2_grpc.TaskServiceServicer,
        lambda s: TaskServicer(s.tasks),
    ),
    _Service(
        predictions_pb2.DESCRIPTOR.services_by_name["PredictionService"],
        predictions_pb2_grpc.add_PredictionServiceServicer_to_server,
        predictions_pb2_grpc.PredictionServiceServicer,
        lambda s: PredictionServicer(s.predictions),
    ),
    _Service(
        chat_pb2.DESCRIPTOR.services_by_name["ChatService"],
        chat_pb2_grpc.add_ChatServiceServicer_to_server,
        chat_pb2_grpc.ChatServiceServicer,
        lambda s: ChatServicer(s.chat, s.sessions, s.tasks),
    ),
)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    keepalive_ms = int(config.grpc_keepalive_seconds * 1000)
    options = [
        # gRPC turns SO_REUSEPORT on by default: a second server on the same port would silently take
        # half the traffic. Off, a second bind fails loudly.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", config.grpc_max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        # Accept client pings down to 10 s apart (with or without calls) instead of answering GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if config.grpc_max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", int(config.grpc_max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000)),
        ]
    return options


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS from --tls-cert/--tls-key (PEM files), read now so a bad path fails the start; None = plaintext.

    With --tls-client-ca, clients must present a certificate that CA signed (mutual TLS).
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    pair = (Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


class GrpcServer:
    def __init__(self, config: ServerConfig, services: Services) -> None:
        self._config = config
        self._server = grpc.aio.server(
            interceptors=[ObserveInterceptor(services.observe), AuthInterceptor(config.api_keys)],
            options=server_options(config),
            maximum_concurrent_rpcs=config.grpc_max_concurrent_rpcs,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._implemented: list[str] = []
        for svc in SERVICES:
            if svc.build is not None:
                svc.add(svc.build(services), self._server)
                self._implemented.append(svc.descriptor.full_name)
            else:
                svc.add(unimplemented_servicer(svc.base, svc.descriptor, svc.planned), self._server)
        names = [svc.descriptor.full_name for svc in SERVICES]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._server,
        )
        self.port = 0

    async def start(self) -> int:
        address = f"{self._config.host}:{self._config.grpc_port}"
        credentials = server_credentials(self._config)
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        await self._server.start()
        await self.set_ready(True)
        log.info("gRPC listening on %s:%d%s", self._config.host, self.port, " (TLS)" if credentials else "")
        return self.port

    async def set_ready(self, ready: bool) -> None:
        """Readiness and the implemented services follow `ready`; "" (liveness) stays SERVING."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", serving)
        await self.health.set(READINESS, serving if ready else not_serving)
        for svc in SERVICES:
            name = svc.descriptor.full_name
            await self.health.set(name, serving if ready and name in self._implemented else not_serving)

    async def stop(self, grace: float) -> None:
        """New calls get UNAVAILABLE at once; calls in flight get `grace` seconds to finish."""
        await self._server.stop(grace)
