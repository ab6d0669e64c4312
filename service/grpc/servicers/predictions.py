"""PredictionService: Replicate-style predictions over gRPC (create, get, list, cancel, run, stream events).

A prediction runs in the domain whatever its callers do: CreatePrediction's wait and StreamPrediction
only watch it. RunPrediction is the exception: its caller alone learns the prediction's id, so when
that call is cancelled the prediction is cancelled too, freeing its engine slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from rwkvd.v1 import predictions_pb2, predictions_pb2_grpc

from service.domain.predictions import Prediction, PredictionManager
from service.grpc import convert
from service.grpc.calls import Context

DEFAULT_PAGE_SIZE = 100


class PredictionServicer(predictions_pb2_grpc.PredictionServiceServicer):
    def __init__(self, predictions: PredictionManager) -> None:
        self._predictions = predictions

    async def CreatePrediction(
        self, request: predictions_pb2.CreatePredictionRequest, context: Context
    ) -> predictions_pb2.CreatePredictionResponse:
        wait = convert.wait_seconds(request)
        prediction = await self._create(request)
        if wait is not None:
            await prediction.wait(within=wait)
        return predictions_pb2.CreatePredictionResponse(prediction=convert.prediction(prediction))

    async def GetPrediction(
        self, request: predictions_pb2.GetPredictionRequest, context: Context
    ) -> predictions_pb2.GetPredictionResponse:
        prediction = await self._predictions.get(request.id)
        return predictions_pb2.GetPredictionResponse(prediction=convert.prediction(prediction))

    async def ListPredictions(
        self, request: predictions_pb2.ListPredictionsRequest, context: Context
    ) -> predictions_pb2.ListPredictionsResponse:
        page, cursor = await self._predictions.list(request.cursor or None, request.page_size or DEFAULT_PAGE_SIZE)
        return predictions_pb2.ListPredictionsResponse(
            predictions=[convert.prediction(p) for p in page], next_cursor=cursor or ""
        )

    async def CancelPrediction(
        self, request: predictions_pb2.CancelPredictionRequest, context: Context
    ) -> predictions_pb2.CancelPredictionResponse:
        prediction = await self._predictions.cancel(request.id)
        return predictions_pb2.CancelPredictionResponse(prediction=convert.prediction(prediction))

    async def RunPrediction(
        self, request: predictions_pb2.RunPredictionRequest, context: Context
    ) -> predictions_pb2.RunPredictionResponse:
        prediction = await self._create(request)
        try:
            await prediction.wait(within=None)
        except asyncio.CancelledError:
            await self._predictions.cancel(prediction.id)  # nobody else knows its id: free the slot
            raise
        return predictions_pb2.RunPredictionResponse(prediction=convert.prediction(prediction))

    async def StreamPrediction(
        self, request: predictions_pb2.StreamPredictionRequest, context: Context
    ) -> AsyncIterator[predictions_pb2.StreamPredictionResponse]:
        after = convert.last_event_id(request.last_event_id)
        prediction = await self._predictions.get(request.id)
        # Following only waits on the prediction's events: a cancelled call leaves nothing to clean up.
        async for event in prediction.follow(after):
            yield convert.prediction_event(event, prediction.status)

    async def _create(
        self, request: predictions_pb2.CreatePredictionRequest | predictions_pb2.RunPredictionRequest
    ) -> Prediction:
        model, version = convert.model_ref(request.model, request.version)
        if isinstance(request, predictions_pb2.CreatePredictionRequest):
            webhook = convert.webhook(request.webhook)
            events = convert.webhook_events(request.webhook_events_filter)
        else:
            webhook, events = None, None
        return await self._predictions.create(
            convert.prediction_input(request.input),
            model=model,
            version=version,
            webhook=webhook,
            webhook_events_filter=events,
        )
