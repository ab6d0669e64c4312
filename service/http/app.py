"""The HTTP application: health endpoints and the OpenAI model list (more dialects mount here later).

Readiness is shared with the gRPC health service through `Readiness`, so one SIGTERM flips both.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from service.engine.protocol import EngineClient


@dataclass
class Readiness:
    ready: bool = False


def create_app(engine: EngineClient, readiness: Readiness) -> FastAPI:
    app = FastAPI(title="rwkvd", version="0.1.0", docs_url="/docs", redoc_url=None)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", response_model=None)
    async def ready() -> JSONResponse:
        if readiness.ready:
            return JSONResponse({"status": "ready", "model": engine.model.id})
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, object]:
        m = engine.model
        return {
            "object": "list",
            "data": [{"id": m.id, "object": "model", "created": int(m.load_time), "owned_by": m.id.split("/")[0]}],
        }

    return app
