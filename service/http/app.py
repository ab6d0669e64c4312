"""The HTTP application: health, /metrics and the dialects' routers behind bearer auth.

Mounted: the RWKV-Server Task API (rwkv_tasks), the Replicate / RockAI predictions API (replicate) and
the OpenAI API (openai).
Readiness is shared with the gRPC health service through `Readiness`, so one SIGTERM flips both.
Middleware, outermost first: tracing (when on), observation (API label, error counts, access log), auth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service.domain.chat import ChatCompletions
from service.domain.completions import Completions
from service.domain.predictions import PredictionManager
from service.domain.tasks import TaskManager
from service.engine.protocol import EngineClient
from service.metrics import Metrics
from service.tracing import Tracing

from . import openai, replicate, rwkv_tasks
from .auth import BearerAuth
from .observe import ObserveMiddleware


@dataclass
class Readiness:
    ready: bool = False


def create_app(
    engine: EngineClient,
    readiness: Readiness,
    tasks: TaskManager,
    predictions: PredictionManager,
    chat: ChatCompletions,
    completions: Completions,
    public_url: str | None = None,
    api_keys: Sequence[str] = (),
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    app = FastAPI(title="rwkvd", version="0.1.0", docs_url="/docs", redoc_url=None)
    app.add_middleware(BearerAuth, keys=api_keys)
    app.add_middleware(ObserveMiddleware, count_error=metrics.count_error if metrics is not None else None)
    if tracing is not None:
        tracing.instrument_http(app)
    app.include_router(rwkv_tasks.create_router(tasks))
    app.include_router(replicate.create_router(predictions, engine, public_url))
    app.include_router(openai.create_router(engine, chat, completions))

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", response_model=None)
    async def ready() -> JSONResponse:
        if readiness.ready:
            return JSONResponse({"status": "ready", "model": engine.model.id})
        return JSONResponse({"status": "not ready"}, status_code=503)

    if metrics is not None:

        @app.get("/metrics", include_in_schema=False)
        async def prometheus(request: Request) -> Response:
            body, content_type = metrics.render(request.headers.get("accept", ""))
            return Response(body, media_type=content_type)

    return app
