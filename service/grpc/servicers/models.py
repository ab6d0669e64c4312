"""ModelService: the loaded model, as the engine reports it."""

from __future__ import annotations

from rwkvd.v1 import models_pb2, models_pb2_grpc

from service.domain.models import resolve_model
from service.engine.protocol import EngineClient
from service.grpc import convert
from service.grpc.calls import Context


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        return models_pb2.ListModelsResponse(models=[convert.model(self._engine.model)])

    async def GetModel(self, request: models_pb2.GetModelRequest, context: Context) -> models_pb2.GetModelResponse:
        return models_pb2.GetModelResponse(model=convert.model(resolve_model(self._engine, request.id, field="id")))
