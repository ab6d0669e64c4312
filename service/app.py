"""The composition root: builds engine, store, domain and both servers; owns startup and the ordered shutdown.

Shutdown on SIGTERM (Kubernetes): readiness goes NOT_SERVING on gRPC health and HTTP /health/ready
while calls are still accepted; after drain_seconds both servers stop taking new calls and give
in-flight ones grace_seconds; then the engine stops (cancelling what still runs), tasks and
predictions record how they ended, pending webhooks get a moment, and the store closes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from typing import TYPE_CHECKING

import torch

from service.config import ServerConfig
from service.domain.chat import ChatCompletions
from service.domain.completions import Completions
from service.domain.predictions import PredictionManager
from service.domain.sessions import SessionLimits, SessionManager
from service.domain.tasks import TaskLimits, TaskManager
from service.domain.webhooks import WebhookDelivery
from service.engine.local import LocalEngineClient, build_engine
from service.engine.observer import EngineObserver, ObserverGroup
from service.engine.remote import ProcessEngineClient, start_engine_process
from service.grpc.interceptors import CallObserver
from service.grpc.server import GrpcServer, Services
from service.http import replicate
from service.http.app import Readiness, create_app
from service.http.limits import HttpLimits
from service.http.server import HttpServer, TlsFiles
from service.metrics import Metrics
from service.request_log import RequestLog
from service.store.sqlite import Store
from service.tracing import Tracing, build_tracing, tracing_wanted

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger("rwkvd")


class App:
    def __init__(self, config: ServerConfig, tracer_provider: TracerProvider | None = None) -> None:
        """`tracer_provider` turns tracing on with that provider (tests); otherwise --otel and OTEL_* decide."""
        self.config = config
        self._tracer_provider = tracer_provider
        self.metrics: Metrics | None = None
        self.tracing: Tracing | None = None
        self.readiness = Readiness()
        self.engine: LocalEngineClient | ProcessEngineClient | None = None
        self.engine_lost = False  # the engine process died: the app stops and exits non-zero
        self.store: Store | None = None
        self.tasks: TaskManager | None = None
        self.predictions: PredictionManager | None = None
        self.webhooks: WebhookDelivery | None = None
        self.grpc: GrpcServer | None = None
        self.http: HttpServer | None = None
        # Where clients reach the HTTP API (prediction URLs, webhooks): --public-url, else the listener.
        self.base_url = config.public_url or ""
        self._stop = asyncio.Event()  # run() serves until it is set

    async def start(self) -> None:
        cfg = self.config
        if cfg.engine_process_on(torch.cuda.is_available()):
            self.engine = await start_engine_process(cfg.engine, cfg.log_level, cfg.log_format)
            self.engine.on_lost = self._engine_lost
        else:
            # Build in a worker thread: loading takes a while, and the engine thread does all torch work.
            self.engine = await asyncio.to_thread(build_engine, cfg.engine)
        try:
            metrics = self.metrics = Metrics(self.engine)
            wanted = tracing_wanted(cfg.otel, os.environ)
            tracing = self.tracing = build_tracing(wanted, os.environ, self._tracer_provider)
            observers: list[EngineObserver] = [metrics, RequestLog(self.engine.model.id)]
            if tracing is not None:
                observers.append(tracing)
            self.engine.observe(ObserverGroup(observers))
            self.store = await Store.open(cfg.data_dir)
            self.tasks = TaskManager(self.engine, self.store, TaskLimits(max_temporary=cfg.max_temporary_tasks))
            await self.tasks.start()
            self.webhooks = WebhookDelivery(lambda p: replicate.render_prediction(p, self.base_url))
            self.predictions = PredictionManager(self.engine, self.store, notify=self.webhooks.notify)
            completions = Completions(self.engine)
            chat = ChatCompletions(self.engine)
            sessions = SessionManager(self.engine, SessionLimits(cfg.max_sessions, cfg.session_idle_seconds))
            services = Services(
                engine=self.engine,
                completions=completions,
                tasks=self.tasks,
                predictions=self.predictions,
                chat=chat,
                sessions=sessions,
                observe=CallObserver(
                    count_error=functools.partial(metrics.count_error, "grpc"),
                    tracing=tracing.grpc_interceptor() if tracing else None,
                ),
            )
            self.grpc = GrpcServer(cfg, services)
            await self.grpc.start()
            if cfg.http_port >= 0:
                app = create_app(
                    self.engine,
                    self.readiness,
                    self.tasks,
                    self.predictions,
                    chat,
                    completions,
                    cfg.public_url,
                    cfg.api_keys,
                    metrics=metrics,
                    tracing=tracing,
                )
                limits = HttpLimits(cfg.max_request_bytes, cfg.http_max_concurrency)
                tls = TlsFiles(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert and cfg.tls_key else None
                self.http = HttpServer(
                    app, cfg.host, cfg.http_port, cfg.grace_seconds, limits, tls, count_error=metrics.count_error
                )
                await self.http.start()
                scheme = "https" if tls else "http"
                self.base_url = cfg.public_url or f"{scheme}://{_reachable(cfg.host)}:{self.http.port}"
        except BaseException:  # a port in use, say: stop what started, then report
            await self._stop_all(grace=0)
            raise
        self.readiness.ready = True
        log.info("rwkvd ready: gRPC :%d, HTTP %s", self.grpc.port, f":{self.http.port}" if self.http else "off")

    async def shutdown(self) -> None:
        log.info("draining: not ready, accepting calls for %.1fs more", self.config.drain_seconds)
        self.readiness.ready = False
        if self.grpc is not None:
            await self.grpc.set_ready(False)
        await asyncio.sleep(self.config.drain_seconds)
        log.info("stopping servers; in-flight calls have %.1fs", self.config.grace_seconds)
        await self._stop_all(self.config.grace_seconds)
        log.info("stopped")

    async def _stop_all(self, grace: float) -> None:
        stops = []
        if self.grpc is not None:
            stops.append(self.grpc.stop(grace))
        if self.http is not None:
            stops.append(self.http.stop())
        await asyncio.gather(*stops)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        for domain in (self.tasks, self.predictions):
            if domain is not None:
                await domain.close()  # rounds and predictions cut by the engine stop are recorded
        if self.webhooks is not None:
            await self.webhooks.close()
        if self.store is not None:
            await self.store.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # the engine's last spans are in by now

    def _engine_lost(self) -> None:
        """The engine process died: stop serving (health goes NOT_SERVING at once) and exit non-zero."""
        self.engine_lost = True
        self.readiness.ready = False
        self._stop.set()

    async def run(self) -> int:
        """Starts, serves until SIGTERM or SIGINT (or the engine process dies), then shuts down in order.
        Returns the exit status: 0, or 1 when the engine process died."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        await self._stop.wait()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)  # a second signal now kills the process the default way
        await self.shutdown()
        return 1 if self.engine_lost else 0


def _reachable(host: str) -> str:
    """A host name for URLs: a wildcard bind address is not one."""
    return "localhost" if host in ("0.0.0.0", "::", "") else host
