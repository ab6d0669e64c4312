"""The Replicate / RockAI predictions API: /v1/predictions, /v1/models/{owner}/{name}/..., /v1/run, /v1/run_sse.

Translation only: request JSON and headers in, service.domain.predictions does the work, Replicate's
prediction JSON out (every field also under "data", which the RockAI SDK reads), named SSE events
out, and every domain error as Replicate's problem-details JSON (mapped in `_problem`, nowhere else).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from service.domain.models import resolve_model
from service.domain.predictions import PREDICTION_DEFAULTS, Prediction, PredictionManager, PredictionStatus
from service.engine.protocol import EngineClient, ModelInfo
from service.errors import ErrorKind, FieldViolation, InvalidArgument, RwkvdError

from . import sse
from .errors import headers_of, status_of

MAX_WAIT_SECONDS = 60  # Replicate's limit for `Prefer: wait=N`
PAGE_SIZE = 100  # Replicate's page size for GET /v1/predictions
# Below the RockAI sync client's 5 s read timeout (and replicate-python's 30 s) on silent streams.
KEEPALIVE_SECONDS = 4.0
# Replicate answers invalid input with 422; a body that is not JSON at all stays 400 (this reason).
_INVALID_JSON = "INVALID_JSON"
_TITLES = {
    ErrorKind.INVALID_ARGUMENT: "Input validation failed",
    ErrorKind.NOT_FOUND: "Not found",
    ErrorKind.RESOURCE_EXHAUSTED: "Too many requests",
    ErrorKind.UNAVAILABLE: "Service unavailable",
}


def render_prediction(prediction: Prediction, base_url: str) -> dict[str, Any]:
    """The prediction as Replicate's JSON (also what webhooks post), its fields repeated under "data" for RockAI."""
    return _dual(_prediction_fields(prediction, base_url))


def create_router(predictions: PredictionManager, engine: EngineClient, public_url: str | None) -> APIRouter:
    router = APIRouter(route_class=_ProblemRoute, tags=["predictions"])
    # Background cancels of run_sse predictions whose client went away (kept so they are not collected early).
    cancels: set[asyncio.Task[Prediction]] = set()

    def base_of(request: Request) -> str:
        return public_url.rstrip("/") if public_url else str(request.base_url).rstrip("/")

    async def create(request: Request, model: str, wait: float | None) -> Prediction:
        body = _json_object(await request.body())
        fields = _CreateBody.parse(body, model)
        prediction = await predictions.create(
            fields.input,
            model=fields.model,
            version=fields.version,
            webhook=fields.webhook,
            webhook_events_filter=fields.webhook_events_filter,
        )
        if wait is not None:
            await prediction.wait(within=wait)
        return prediction

    async def create_response(request: Request, model: str = "") -> JSONResponse:
        wait = _prefer_wait(request.headers.get("prefer"))  # checked before anything runs
        prediction = await create(request, model, wait)
        base = base_of(request)
        fields = _prediction_fields(prediction, base)
        if wait is not None and not prediction.status.terminal:
            # replicate-python's run() takes any status but "starting" after a wait as final (and with
            # partial output its polling iterator would skip what it already had): look not started yet.
            fields.update(status=PredictionStatus.STARTING.value, output=None, started_at=None)
        return JSONResponse(_dual(fields), status_code=201, headers={"Location": fields["urls"]["get"]})

    @router.post("/v1/predictions", status_code=201, summary="Create a prediction (version, or model)")
    async def create_prediction(request: Request) -> JSONResponse:
        return await create_response(request)

    @router.post("/v1/models/{owner}/{name}/predictions", status_code=201, summary="Create a prediction of a model")
    async def create_model_prediction(owner: str, name: str, request: Request) -> JSONResponse:
        return await create_response(request, f"{owner}/{name}")

    @router.post("/v1/deployments/{owner}/{name}/predictions", status_code=201, summary="Create (deployment = model)")
    async def create_deployment_prediction(owner: str, name: str, request: Request) -> JSONResponse:
        return await create_response(request, f"{owner}/{name}")

    @router.get("/v1/predictions", summary="List predictions, newest first")
    async def list_predictions(
        request: Request,
        cursor: str | None = None,
        page_size: Annotated[int, Query(ge=1, le=1000)] = PAGE_SIZE,
    ) -> JSONResponse:
        page, next_cursor = await predictions.list(cursor, page_size)
        base = base_of(request)
        next_url = None
        if next_cursor is not None:
            # Absolute: the client requests `next` verbatim. page_size rides along so every page has the same size.
            extra = f"&page_size={page_size}" if page_size != PAGE_SIZE else ""
            next_url = f"{base}/v1/predictions?cursor={quote(next_cursor)}{extra}"
        results = [render_prediction(p, base) for p in page]
        return JSONResponse({"next": next_url, "previous": None, "results": results})

    @router.get("/v1/predictions/{prediction_id}", summary="Get a prediction")
    async def get_prediction(prediction_id: str, request: Request) -> JSONResponse:
        return JSONResponse(render_prediction(await predictions.get(prediction_id), base_of(request)))

    @router.post("/v1/predictions/{prediction_id}/cancel", summary="Cancel a prediction (an ended one is unchanged)")
    async def cancel_prediction(prediction_id: str, request: Request) -> JSONResponse:
        return JSONResponse(render_prediction(await predictions.cancel(prediction_id), base_of(request)))

    @router.get("/v1/predictions/{prediction_id}/stream", summary="The prediction's events (SSE), during or after it")
    async def stream_prediction(prediction_id: str, last_event_id: Annotated[str | None, Header()] = None) -> Response:
        prediction = await predictions.get(prediction_id)
        after = _event_id(last_event_id, len(prediction.events))
        return sse.sse_response(_stream_events(prediction, after), KEEPALIVE_SECONDS)

    @router.post("/v1/run", summary="Run a prediction to its end and return it")
    async def run(request: Request) -> JSONResponse:
        prediction = await create(request, "", wait=None)
        await prediction.wait(within=None)
        return JSONResponse(render_prediction(prediction, base_of(request)))

    @router.post("/v1/run_sse", summary="Run a prediction, streaming its events (SSE)")
    async def run_sse(request: Request) -> Response:
        prediction = await create(request, "", wait=None)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for chunk in _stream_events(prediction, 0):
                    yield chunk
            finally:
                # The prediction belongs to this request: a client that hangs up frees the engine.
                if not prediction.status.terminal:
                    task = asyncio.create_task(predictions.cancel(prediction.id))
                    cancels.add(task)
                    task.add_done_callback(cancels.discard)

        return sse.sse_response(events(), KEEPALIVE_SECONDS)

    @router.get("/v1/models/{owner}/{name}", summary="The served model")
    async def get_model(owner: str, name: str, request: Request) -> JSONResponse:
        model = resolve_model(engine, f"{owner}/{name}")
        return JSONResponse(_model_json(model, base_of(request)))

    @router.get("/v1/models/{owner}/{name}/versions", summary="The served model's versions (one)")
    async def list_versions(owner: str, name: str) -> JSONResponse:
        model = resolve_model(engine, f"{owner}/{name}")
        return JSONResponse({"next": None, "previous": None, "results": [_version_json(model)]})

    @router.get("/v1/models/{owner}/{name}/versions/{version}", summary="A version, with its OpenAPI schema")
    async def get_version(owner: str, name: str, version: str) -> JSONResponse:
        model = resolve_model(engine, f"{owner}/{name}:{version}", field="version")
        return JSONResponse(_version_json(model))

    return router


class _ProblemRoute(APIRoute):
    """Routes whose domain and parameter errors come back as Replicate problem details."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RwkvdError as exc:
                return _problem(exc)
            except RequestValidationError as exc:
                return _problem(_from_validation(exc))

        return handle


def _problem(error: RwkvdError) -> JSONResponse:
    """The one mapping of domain errors to this dialect: RFC 7807 body, status from the error table (bad input: 422)."""
    status = status_of(error)
    if error.kind is ErrorKind.INVALID_ARGUMENT and error.reason != _INVALID_JSON:
        status = 422
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": "Invalid JSON" if error.reason == _INVALID_JSON else _TITLES.get(error.kind, "Error"),
        "status": status,
        "detail": error.message,
        "reason": error.reason,
    }
    if error.violations:
        body["invalid_fields"] = [{"field": v.field, "description": v.description} for v in error.violations]
    return JSONResponse(body, status_code=status, headers=headers_of(error), media_type="application/problem+json")


def _from_validation(exc: RequestValidationError) -> InvalidArgument:
    """FastAPI's checks of query parameters and headers, named as the client wrote them."""
    bad = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ())]
        bad.append(FieldViolation(".".join(loc[1:]) or ".".join(loc), str(err.get("msg", "invalid"))))
    return InvalidArgument.for_fields(bad)


@dataclass(frozen=True)
class _CreateBody:
    """The top level of a create body; unknown keys (stream, RockAI's extras) are ignored as Replicate does."""

    input: dict[str, Any]
    model: str
    version: str
    webhook: str | None
    webhook_events_filter: list[str] | None

    @classmethod
    def parse(cls, body: Mapping[str, Any], path_model: str) -> _CreateBody:
        bad: list[FieldViolation] = []

        def text(name: str) -> str:
            value = body.get(name)
            if value is None:
                return ""
            if not isinstance(value, str):
                bad.append(FieldViolation(name, "must be a string"))
                return ""
            return value

        raw_input = body.get("input")
        if raw_input is not None and not isinstance(raw_input, dict):
            bad.append(FieldViolation("input", "must be an object"))
        model = path_model or text("model")
        version = text("version")
        webhook = text("webhook")
        # The client's webhook_completed: the same URL, told only of the end (one URL per prediction here).
        completed_only = text("webhook_completed")
        events = body.get("webhook_events_filter")
        if events is not None and not (isinstance(events, list) and all(isinstance(e, str) for e in events)):
            bad.append(FieldViolation("webhook_events_filter", "must be a list of strings"))
            events = None
        if not webhook and completed_only:
            webhook, events = completed_only, ["completed"]
        if webhook and not webhook.startswith(("http://", "https://")):
            bad.append(FieldViolation("webhook", "must be an http(s) URL"))
        if not model and not version and not any(v.field in ("model", "version") for v in bad):
            bad.append(FieldViolation("version", "required: a version id or owner/name:version (or model)"))
        if bad:
            raise InvalidArgument.for_fields(bad)
        return cls(raw_input or {}, model, version, webhook or None, events)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_not_json) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}", reason=_INVALID_JSON) from None
    if not isinstance(body, dict):
        raise InvalidArgument.for_field("body", "must be a JSON object")
    return body


def _not_json(name: str) -> None:
    """NaN and Infinity are Python's JSON extensions, not JSON (and could not be echoed back)."""
    raise ValueError(f"{name} is not a JSON value")


def _prefer_wait(header: str | None) -> float | None:
    """Seconds to hold a create for `Prefer: wait` (60) or `Prefer: wait=N` (clamped to 1..60); None without."""
    for preference in (header or "").split(","):
        name, _, value = preference.partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.partition(";")[0].strip().strip('"')  # RFC 7240 parameters follow a ";"
        if not value:
            return MAX_WAIT_SECONDS
        try:
            seconds = int(value)
        except ValueError:
            raise InvalidArgument.for_field("Prefer", f"wait={value!r}: must be whole seconds, 1 to 60") from None
        return min(max(seconds, 1), MAX_WAIT_SECONDS)
    return None


def _event_id(last_event_id: str | None, known: int) -> int:
    """Resume point from Last-Event-Id: our ids are 1..known so far; anything else replays from the start."""
    try:
        after = int(last_event_id or 0)
    except ValueError:
        return 0
    return after if 0 < after <= known else 0


async def _stream_events(prediction: Prediction, after: int) -> AsyncIterator[bytes]:
    """Replicate's stream: output, error and done events, each with its id; ends after done.

    Logs stay out of the stream (they are in the prediction's `logs`): the RockAI SDKs yield the data of
    every event as model text.
    """
    async for event in prediction.follow(after):
        if event.kind == "logs":
            continue
        data = json.dumps({"detail": event.data}) if event.kind == "error" else event.data
        yield sse.event(data, event.kind, str(event.id))


def _prediction_fields(p: Prediction, base_url: str) -> dict[str, Any]:
    url = f"{base_url}/v1/predictions/{p.id}"
    fields: dict[str, Any] = {
        "id": p.id,
        "model": p.model,
        "version": p.version,
        "input": p.input,
        "output": None if p.output is None else list(p.output),
        "logs": p.logs,
        "error": p.error,
        "status": p.status.value,
        "created_at": _timestamp(p.created),
        "started_at": _timestamp(p.started),
        "completed_at": _timestamp(p.completed),
        "data_removed": False,
        "metrics": dict(p.metrics),
        # No web page here: "web" is the JSON view, so a link a user follows still works.
        "urls": {"get": url, "cancel": f"{url}/cancel", "stream": f"{url}/stream", "web": url},
        "source": "api",
    }
    if p.webhook:
        fields["webhook"] = p.webhook
        fields["webhook_events_filter"] = [e.value for e in p.webhook_events_filter]
    return fields


def _dual(fields: dict[str, Any]) -> dict[str, Any]:
    """RockAI's SDKs read `data.urls.stream` and `data.id`, replicate-python the top level: serve both."""
    return {**fields, "data": dict(fields)}


def _timestamp(unix: float | None) -> str | None:
    """RFC 3339 in UTC with a Z, as Replicate writes them."""
    if unix is None:
        return None
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _model_json(model: ModelInfo, base_url: str) -> dict[str, Any]:
    owner, _, name = model.id.partition("/")
    return {
        # OpenAI's model fields too: its SDK retrieves "owner/name" by this same path (the slash is decoded
        # before routing), and neither client objects to the other's fields.
        "id": model.id,
        "object": "model",
        "created": int(model.load_time),
        "owned_by": owner,
        "url": f"{base_url}/v1/models/{model.id}",
        "owner": owner,
        "name": name,
        "description": f"RWKV-7 language model ({model.parameter_count:,} parameters)",
        "visibility": "public",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": _version_json(model),
    }


def _version_json(model: ModelInfo) -> dict[str, Any]:
    return {
        "id": model.version,
        "created_at": _timestamp(model.load_time),
        # Any Cog version from 0.3.9 on makes replicate-python read x-cog-array-type from the schema.
        "cog_version": "0.9.0",
        "openapi_schema": {
            "openapi": "3.0.2",
            "info": {"title": model.id, "version": model.version},
            "paths": {},
            "components": {"schemas": {"Input": _INPUT_SCHEMA, "Output": _OUTPUT_SCHEMA}},
        },
    }


def _property(kind: str, order: int, description: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "x-order": order, "title": description.split(":")[0], "description": description, **extra}


# The inputs service.domain.prediction_input accepts (a test keeps the two in step).
_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Input",
    "required": ["prompt"],
    "properties": {
        "prompt": _property("string", 0, "Prompt: the user's message (or the whole text with prompt_template)"),
        "system_prompt": _property("string", 1, "System prompt: put before the user's message"),
        "prompt_template": _property("string", 2, "Prompt template: with {prompt} and {system_prompt}; none = chat"),
        "max_tokens": _property(
            "integer", 3, "Max tokens: to generate", default=PREDICTION_DEFAULTS.max_tokens, minimum=0
        ),
        "max_new_tokens": _property("integer", 4, "Max new tokens: the same as max_tokens", minimum=0),
        "min_tokens": _property("integer", 5, "Min tokens: before a stop may end it; -1 = none", minimum=-1),
        "min_new_tokens": _property("integer", 6, "Min new tokens: the same as min_tokens", minimum=-1),
        "temperature": _property(
            "number", 7, "Temperature: 0 = greedy", default=PREDICTION_DEFAULTS.temperature, minimum=0, maximum=5
        ),
        "top_p": _property("number", 8, "Top p: nucleus sampling", default=PREDICTION_DEFAULTS.top_p, maximum=1),
        "top_k": _property("integer", 9, "Top k: 0 = no limit", default=PREDICTION_DEFAULTS.top_k, minimum=-1),
        "presence_penalty": _property("number", 10, "Presence penalty: additive, RWKV style", default=0),
        "frequency_penalty": _property("number", 11, "Frequency penalty: additive, RWKV style", default=0),
        "repetition_penalty": _property("number", 12, "Repetition penalty: Hugging Face style, 1 = off", default=1),
        "penalty_decay": _property("number", 13, "Penalty decay: per token, of the penalties", default=1),
        "seed": _property("integer", 14, "Seed: for reproducible sampling", minimum=0),
        "stop_sequences": _property("string", 15, "Stop sequences: comma-separated (or a list)"),
    },
}
# What Cog writes for ConcatenateIterator[str]: replicate-python's run() then returns an iterator.
_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string"},
    "title": "Output",
    "x-cog-array-type": "iterator",
    "x-cog-array-display": "concatenate",
}
