"""CompletionService: plain completions, unary and streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from rwkvd.v1 import completions_pb2, completions_pb2_grpc

from service.domain.completions import Completions
from service.engine.protocol import Delta, Finished, Started
from service.grpc import convert
from service.grpc.calls import Context, deadline_of


class CompletionServicer(completions_pb2_grpc.CompletionServiceServicer):
    def __init__(self, completions: Completions) -> None:
        self._completions = completions

    async def CreateCompletion(
        self, request: completions_pb2.CreateCompletionRequest, context: Context
    ) -> completions_pb2.CreateCompletionResponse:
        prepared = self._completions.prepare(convert.completion_request(request, deadline_of(context)))
        return convert.completion_response(await self._completions.complete(prepared))

    async def CreateCompletionStream(
        self, request: completions_pb2.CreateCompletionStreamRequest, context: Context
    ) -> AsyncIterator[completions_pb2.CreateCompletionStreamResponse]:
        prepared = self._completions.prepare(convert.completion_request(request, deadline_of(context)))
        Response = completions_pb2.CreateCompletionStreamResponse
        # aclosing: if the client cancels, the engine request is aborted here and its slot freed.
        async with aclosing(self._completions.stream(prepared)) as events:
            async for event in events:
                if isinstance(event, Started):
                    yield Response(
                        started=completions_pb2.CompletionStarted(
                            id=prepared.request_id,
                            model=self._completions.model_id,
                            prompt_tokens=event.prompt_tokens,
                            seed=event.seed,
                        )
                    )
                elif isinstance(event, Delta):
                    yield Response(delta=convert.delta(event))
                elif isinstance(event, Finished):
                    yield Response(
                        finished=completions_pb2.CompletionFinished(
                            finish_reason=convert.FINISH_REASONS[event.reason],
                            usage=convert.usage(event.usage),
                            timings=convert.timings(event.timings, event.usage.completion_tokens),
                        )
                    )
