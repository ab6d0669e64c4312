"""The composition root: builds engine, domain and both servers, and owns startup and the ordered shutdown.

Shutdown on SIGTERM (Kubernetes): readiness goes NOT_SERVING on gRPC health and HTTP /health/ready
while calls are still accepted; after drain_seconds both servers stop taking new calls and give
in-flight ones grace_seconds; then the engine stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from service.config import ServerConfig
from service.domain.completions import Completions
from service.engine.local import LocalEngineClient, build_engine
from service.grpc.server import GrpcServer, Services
from service.http.app import Readiness, create_app
from service.http.server import HttpServer

log = logging.getLogger("rwkvd")


class App:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.readiness = Readiness()
        self.engine: LocalEngineClient | None = None
        self.grpc: GrpcServer | None = None
        self.http: HttpServer | None = None

    async def start(self) -> None:
        cfg = self.config
        # In a worker thread: loading takes a while, and torch must not run parallel ops on the main thread
        # (with libgomp that makes every parallel region of the engine thread ~15x more expensive).
        self.engine = await asyncio.to_thread(build_engine, cfg.engine)
        try:
            services = Services(engine=self.engine, completions=Completions(self.engine))
            self.grpc = GrpcServer(cfg, services)
            await self.grpc.start()
            if cfg.http_port >= 0:
                app = create_app(self.engine, self.readiness)
                self.http = HttpServer(app, cfg.host, cfg.http_port, cfg.grace_seconds)
                await self.http.start()
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

    async def run(self) -> None:
        """Starts, serves until SIGTERM or SIGINT, then shuts down in order."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)  # a second signal now kills the process the default way
        await self.shutdown()
