"""Bearer-token auth for the HTTP API: the same keys as gRPC, with the exemptions real clients need.

Exempt: health probes (kubelets send no credentials), GET /metrics (Prometheus scrapes from inside
the cluster), GET /v1/models (the rwkv-api test suite's liveness probe), and prediction stream URLs
(the RockAI SDK fetches them without a token; their ids are unguessable). A refusal is a 401 in the
shape of the dialect the path belongs to.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

_EXEMPT = (
    re.compile(r"^/health/"),
    re.compile(r"^/metrics$"),
    re.compile(r"^/v1/models/?$"),
    re.compile(r"^/v1/predictions/[^/]+/stream$"),
)
_REPLICATE = re.compile(r"^/v1/(predictions|models/[^/]+/[^/]+|deployments|run)")
MESSAGE = "missing or invalid bearer token"


class BearerAuth:
    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self._app = app
        self._keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or self._exempt(scope):
            await self._app(scope, receive, send)
            return
        if self._authorized(scope):
            await self._app(scope, receive, send)
            return
        status, content_type, body = _refusal(scope["path"])
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _exempt(scope: Scope) -> bool:
        return scope["method"] in ("GET", "HEAD") and any(p.match(scope["path"]) for p in _EXEMPT)

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    given = token.strip().encode()
                    return any([hmac.compare_digest(given, k) for k in self._keys])  # no early exit: timing
        return False


def _refusal(path: str) -> tuple[int, bytes, bytes]:
    if path.startswith("/v1/tasks"):  # RWKV-Server (FastAPI) shape
        body: dict[str, object] = {"detail": MESSAGE}
        return 401, b"application/json", json.dumps(body).encode()
    if _REPLICATE.match(path):  # Replicate problem details
        body = {"type": "about:blank", "title": "Unauthenticated", "status": 401, "detail": MESSAGE}
        return 401, b"application/problem+json", json.dumps(body).encode()
    body = {"error": {"message": MESSAGE, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return 401, b"application/json", json.dumps(body).encode()  # OpenAI shape
