"""AsyncClient: the typed asyncio client of rwkvd, one method per supported call plus raw stubs for the rest.

Every failed call raises the typed exception of rwkvd.errors. Unary calls get the client's default
deadline unless given `timeout=`; streams get none unless given one. (`timeout=` is the gRPC deadline,
which travels to the server so it can drop the work; asyncio.timeout cannot do that, hence the
ASYNC109 exemptions.)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeAlias, TypeVar, Unpack

import grpc

from ._channel import ChannelSettings, open_channel
from .errors import from_rpc_error
from .params import SamplingOptions, prompt_message, sampling_params
from .v1 import (
    chat_pb2_grpc,
    completions_pb2,
    completions_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    predictions_pb2_grpc,
    tasks_pb2_grpc,
)

if TYPE_CHECKING:  # the async stub classes exist in the .pyi files only
    from .v1.chat_pb2_grpc import ChatServiceAsyncStub
    from .v1.completions_pb2_grpc import CompletionServiceAsyncStub
    from .v1.models_pb2_grpc import ModelServiceAsyncStub
    from .v1.predictions_pb2_grpc import PredictionServiceAsyncStub
    from .v1.tasks_pb2_grpc import TaskServiceAsyncStub

R = TypeVar("R")
T = TypeVar("T")
# What a raw stub's server-streaming or bidirectional method returns.
StreamingCall: TypeAlias = "grpc.aio.UnaryStreamCall[Any, T] | grpc.aio.StreamStreamCall[Any, T]"


@dataclass(frozen=True)
class Stubs:
    """The generated async stub of every service, on the client's channel (auth, retries, deadlines apply).

    Their calls raise grpc.aio.AioRpcError; wrap them in AsyncClient.call() to get typed exceptions.
    """

    models: ModelServiceAsyncStub
    completions: CompletionServiceAsyncStub
    tasks: TaskServiceAsyncStub
    predictions: PredictionServiceAsyncStub
    chat: ChatServiceAsyncStub

    @classmethod
    def on(cls, channel: grpc.aio.Channel) -> Stubs:
        return cls(
            models=models_pb2_grpc.ModelServiceStub(channel),
            completions=completions_pb2_grpc.CompletionServiceStub(channel),
            tasks=tasks_pb2_grpc.TaskServiceStub(channel),
            predictions=predictions_pb2_grpc.PredictionServiceStub(channel),
            chat=chat_pb2_grpc.ChatServiceStub(channel),
        )


class AsyncClient:
    """A connection to one rwkvd server; create it inside the event loop that uses it.

    target: "host:port" (or any gRPC target, e.g. "dns:///svc:50051").
    api_key: sent as `authorization: Bearer <key>` on every call (use TLS beyond a trusted network).
    tls: connect with TLS; root_certificates (PEM) replaces the system roots, and private_key plus
        certificate_chain (PEM) present a client certificate.
    timeout: default deadline in seconds of unary calls; None = none.
    max_attempts: attempts per call while the server answers UNAVAILABLE (at most 5); 1 = no retries.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        timeout: float | None = 60.0,
        max_attempts: int = 5,
    ) -> None:
        settings = ChannelSettings(
            target,
            api_key=api_key,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            timeout=timeout,
            max_attempts=max_attempts,
        )
        self._channel = open_channel(settings)
        self.stubs = Stubs.on(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls still in flight are cancelled."""
        await self._channel.close()

    async def call(self, rpc: Callable[[Stubs], Awaitable[R]]) -> R:
        """Runs a unary call on a raw stub with typed errors: `await client.call(lambda s: s.tasks.GetTask(req))`."""
        try:
            return await rpc(self.stubs)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def list_models(self, *, timeout: float | None = None) -> list[models_pb2.Model]:  # noqa: ASYNC109
        """The models this server serves."""
        response = await self.call(lambda s: s.models.ListModels(models_pb2.ListModelsRequest(), timeout=timeout))
        return list(response.models)

    async def get_model(self, id: str, *, timeout: float | None = None) -> models_pb2.Model:  # noqa: ASYNC109
        """One model by "owner/name" id or version (sha256); NotFound if this server does not serve it."""
        request = models_pb2.GetModelRequest(id=id)
        response = await self.call(lambda s: s.models.GetModel(request, timeout=timeout))
        return response.model

    async def complete(
        self,
        prompt: str | Sequence[int],
        *,
        model: str = "",
        suffix: str = "",
        timeout: float | None = None,  # noqa: ASYNC109
        **sampling: Unpack[SamplingOptions],
    ) -> completions_pb2.CreateCompletionResponse:
        """Continues `prompt` (text, or token ids) and answers once with the whole completion.

        model: "owner/name"; "" = the served model. suffix: text after the completion (fill in the
        middle). The sampling keyword arguments are those of SamplingOptions.
        """
        request = completions_pb2.CreateCompletionRequest(
            model=model, prompt=prompt_message(prompt), sampling=sampling_params(**sampling), suffix=suffix
        )
        return await self.call(lambda s: s.completions.CreateCompletion(request, timeout=timeout))

    def complete_stream(
        self,
        prompt: str | Sequence[int],
        *,
        model: str = "",
        suffix: str = "",
        timeout: float | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> AsyncGenerator[completions_pb2.CreateCompletionStreamResponse, None]:
        """Like complete(), streamed: a `started` event, `delta` events, then a `finished` event.

        The call starts at the first iteration. Leaving the loop early, or cancelling the task that
        reads, cancels it and the server frees its engine slot; wrap the stream in
        contextlib.aclosing() for that to happen at once rather than when the generator is collected.
        """
        request = completions_pb2.CreateCompletionStreamRequest(
            model=model, prompt=prompt_message(prompt), sampling=sampling_params(**sampling), suffix=suffix
        )
        return self.stream(lambda s: s.completions.CreateCompletionStream(request, timeout=timeout))

    async def stream(self, rpc: Callable[[Stubs], StreamingCall[T]]) -> AsyncGenerator[T, None]:
        """Runs a streaming call on a raw stub with typed errors, cancelling it when the generator closes."""
        call = rpc(self.stubs)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()  # no-op once the call has ended
