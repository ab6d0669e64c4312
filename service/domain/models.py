"""Which model a request means: the served model by id, version, or default (empty)."""

from __future__ import annotations

from service.engine.protocol import EngineClient, ModelInfo
from service.errors import NotFound


def resolve_model(engine: EngineClient, requested: str, field: str = "model") -> ModelInfo:
    """The served model if `requested` names it ("owner/name", "owner/name:version", its version, or "")."""
    model = engine.model
    name, _, version = requested.partition(":")
    if requested in ("", model.id, model.version, *model.aliases) or (
        name == model.id and version in ("", model.version)
    ):
        return model
    raise NotFound.resource_missing(
        "model", requested, reason="MODEL_NOT_FOUND", detail=f"this server serves {model.id} (version {model.version})"
    )
