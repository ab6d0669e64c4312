"""AsyncClient: the typed asyncio client of rwkvd: models, completions, chat, tasks and predictions, plus raw stubs.

Every failed call raises the typed exception of rwkvd.errors. Unary calls get the client's default
deadline unless given `timeout=`; streams get none unless given one. (`timeout=` is the gRPC deadline,
which travels to the server so it can drop the work; asyncio.timeout cannot do that, hence the
ASYNC109 exemptions.)
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeAlias, TypeVar, Unpack

import grpc

from ._channel import ChannelSettings, open_channel
from .chat import AsyncChatSession, MessageLike, chat_messages
from .errors import RwkvdError, from_rpc_error
from .params import SamplingOptions, prompt_message, sampling_params
from .predictions import (
    WEBHOOK_EVENT_VALUES,
    Prediction,
    PredictionError,
    PredictionPage,
    WebhookEvent,
    input_struct,
)
from .tasks import KIND_VALUES, AsyncTask, TaskKind
from .v1 import (
    chat_pb2,
    chat_pb2_grpc,
    completions_pb2,
    completions_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    predictions_pb2,
    predictions_pb2_grpc,
    tasks_pb2,
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
        return self.call_stream(lambda s: s.completions.CreateCompletionStream(request, timeout=timeout))

    async def call_stream(self, rpc: Callable[[Stubs], StreamingCall[T]]) -> AsyncGenerator[T, None]:
        """Runs a streaming call on a raw stub with typed errors, cancelling it when the generator closes."""
        call = rpc(self.stubs)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()  # no-op once the call has ended

    # Chat: completions of structured messages, and sessions whose RNN state stays on the server.

    async def complete_chat(
        self,
        messages: Sequence[MessageLike],
        *,
        model: str = "",
        n: int = 1,
        user: str = "",
        timeout: float | None = None,  # noqa: ASYNC109
        **sampling: Unpack[SamplingOptions],
    ) -> chat_pb2.CompleteResponse:
        """The assistant's reply to `messages` (ChatMessage, {"role": ..., "content": ...} or (role, content);
        roles "system", "developer", "user", "assistant"), in the RWKV chat format.

        n: choices to generate (1..8), forked from one read of the prompt. user: an end-user id for the
        server's logs. The sampling keyword arguments are those of SamplingOptions (chat defaults:
        max_tokens=1024, top_p=0.3, mild presence and frequency penalties; a stop at the next "User:").
        """
        request = chat_pb2.CompleteRequest(**_chat_request(messages, model, n, user, sampling))
        return await self.call(lambda s: s.chat.Complete(request, timeout=timeout))

    def complete_chat_stream(
        self,
        messages: Sequence[MessageLike],
        *,
        model: str = "",
        n: int = 1,
        user: str = "",
        timeout: float | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> AsyncGenerator[chat_pb2.CompleteStreamResponse, None]:
        """Like complete_chat(), streamed: a first message once the prompt is read (no choices), then deltas
        of every choice (`choices[i].index` says which; a choice's last carries its finish_reason); the
        last message has the usage. Leaving early cancels the call and frees the engine slots."""
        request = chat_pb2.CompleteStreamRequest(**_chat_request(messages, model, n, user, sampling))
        return self.call_stream(lambda s: s.chat.CompleteStream(request, timeout=timeout))

    def chat(
        self,
        session_id: str | None = None,
        *,
        history: Sequence[MessageLike] | None = None,
        template_id: str | None = None,
        model: str = "",
        timeout: float | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> AsyncChatSession:
        """A chat session, opened by `async with` (or `await ....open()`): a new one, or `session_id` resumed.

        A new session starts from a template task's state (`template_id`, a "_TMPL_" id) and/or reads
        `history` first (e.g. the system prompt). The sampling keyword arguments are the session's
        defaults for every turn. timeout: a deadline for the whole conversation (none by default).
        """
        request = chat_pb2.OpenSession(
            session_id=session_id or "",
            model=model,
            template_id=template_id or "",
            history=chat_messages(history),
            sampling=sampling_params(**sampling),
        )
        return AsyncChatSession(self, request, timeout)

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> chat_pb2.Session:  # noqa: ASYNC109
        """A chat session by id: NotFound with reason SESSION_NOT_FOUND, SESSION_EXPIRED or SESSION_EVICTED."""
        request = chat_pb2.GetSessionRequest(session_id=session_id)
        return (await self.call(lambda s: s.chat.GetSession(request, timeout=timeout))).session

    async def export_session(self, session_id: str, *, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        """A chat session's state as bytes (FailedPrecondition while a turn runs)."""
        request = chat_pb2.ExportSessionRequest(session_id=session_id)
        return (await self.call(lambda s: s.chat.ExportSession(request, timeout=timeout))).state

    async def import_session(
        self,
        state: bytes,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        **sampling: Unpack[SamplingOptions],
    ) -> str:
        """A new session from exported bytes (a server serving the same model version); returns its id, for
        chat(session_id). The sampling keyword arguments are its defaults for every turn."""
        request = chat_pb2.ImportSessionRequest(state=state, sampling=sampling_params(**sampling))
        return (await self.call(lambda s: s.chat.ImportSession(request, timeout=timeout))).session.session_id

    async def delete_session(self, session_id: str, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Deletes a chat session (a running turn is stopped)."""
        request = chat_pb2.DeleteSessionRequest(session_id=session_id)
        await self.call(lambda s: s.chat.DeleteSession(request, timeout=timeout))

    # Tasks (RWKV-Server's model): generations that keep their RNN state.

    async def create_task(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        prefix: str | None = None,
        suffix: str = "",
        persistent: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
        **sampling: Unpack[SamplingOptions],
    ) -> AsyncTask:
        """Starts a task and returns it at once (status "prefill" or later); wait() or stream() follow it.

        prompt: text (read verbatim, no chat template) or token ids; or prefix and suffix for fill in
        the middle (the model writes what goes between). persistent: a stored "TASK_" task that survives
        restarts instead of a temporary "TMP_" one. The sampling keyword arguments are those of
        SamplingOptions; absent ones take the task API's defaults (RWKV-Server's).
        """
        request = tasks_pb2.CreateTaskRequest(**_task_request(prompt, prefix, suffix, persistent, sampling))
        response = await self.call(lambda s: s.tasks.CreateTask(request, timeout=timeout))
        return AsyncTask(self, response.task)

    def create_task_stream(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        prefix: str | None = None,
        suffix: str = "",
        persistent: bool = False,
        timeout: float | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> AsyncGenerator[tasks_pb2.CreateTaskStreamResponse, None]:
        """Like create_task(), streamed: `started` (with the task id), `delta`..., `finished`.

        Leaving the stream early does not stop the task: it runs on, and get_task() finds it.
        """
        request = tasks_pb2.CreateTaskStreamRequest(**_task_request(prompt, prefix, suffix, persistent, sampling))
        return self.call_stream(lambda s: s.tasks.CreateTaskStream(request, timeout=timeout))

    async def get_task(self, task_id: str, *, timeout: float | None = None) -> AsyncTask:  # noqa: ASYNC109
        """A task by id; NotFound with reason TASK_NOT_FOUND, or TASK_EVICTED for a temporary task dropped from
        memory."""
        request = tasks_pb2.GetTaskRequest(task_id=task_id)
        response = await self.call(lambda s: s.tasks.GetTask(request, timeout=timeout))
        return AsyncTask(self, response.task)

    async def list_tasks(
        self,
        *,
        kind: TaskKind | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> tasks_pb2.ListTasksResponse:
        """One page of the tasks in memory and in the store (ordered by id), with their counts.

        page_size: at most this many (0 = the server's default, 100); page_token: a previous page's
        next_page_token ("" on the last page).
        """
        request = tasks_pb2.ListTasksRequest(
            kind=KIND_VALUES[kind] if kind else tasks_pb2.TASK_KIND_UNSPECIFIED,
            page_size=page_size,
            page_token=page_token,
        )
        return await self.call(lambda s: s.tasks.ListTasks(request, timeout=timeout))

    # Predictions (Replicate / RockAI): run, stream, cancel, as RockAI's client names them.

    async def run(
        self,
        version: str | None = None,
        model: str | None = None,
        *,
        input: Mapping[str, Any],
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[str]:
        """Runs a prediction to its end and returns its output, the list of text chunks ("".join() them).

        version: a version id, "owner/name:version" or "owner/name"; or model: "owner/name". input: the
        model's inputs in Replicate's LLM naming (prompt, system_prompt, max_tokens, temperature, top_p,
        seed, stop_sequences, ...). Raises PredictionError if it fails or is canceled. timeout: a deadline
        for the whole run (none by default, however long the generation); when it passes, or the caller
        is cancelled, the prediction is cancelled.
        """
        output: list[str] = []
        async with aclosing(self.stream(version, model, input=input, timeout=timeout)) as chunks:
            async for chunk in chunks:
                output.append(chunk)
        return output

    async def stream(
        self,
        version: str | None = None,
        model: str | None = None,
        *,
        input: Mapping[str, Any],
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncGenerator[str, None]:
        """Runs a prediction and yields its output text chunks as they are generated.

        Arguments as for run(); raises PredictionError at the end if it failed or was canceled. The
        prediction starts at the first iteration; leaving the loop early cancels it.
        """
        prediction = await self.create_prediction(version=version, model=model, input=input)
        ended = False
        try:
            async with aclosing(self.prediction_events(prediction.id, timeout=timeout)) as events:
                async for event in events:
                    if event.HasField("output"):
                        yield event.output
                    elif event.HasField("done"):
                        ended = True
                        if event.done.status != predictions_pb2.PREDICTION_STATUS_SUCCEEDED:
                            raise PredictionError(await self.get_prediction(prediction.id))
        finally:
            if not ended:  # the caller left (or the deadline passed): nobody will read the rest
                with contextlib.suppress(RwkvdError, grpc.aio.UsageError):  # e.g. the channel is closed already
                    await self.cancel(prediction.id)

    run_async = run
    stream_async = stream

    async def cancel(self, id: str, *, timeout: float | None = None) -> Prediction:  # noqa: ASYNC109
        """Cancels a prediction and returns it once settled; one that has ended is returned unchanged."""
        request = predictions_pb2.CancelPredictionRequest(id=id)
        response = await self.call(lambda s: s.predictions.CancelPrediction(request, timeout=timeout))
        return Prediction.from_message(response.prediction)

    async def create_prediction(
        self,
        version: str | None = None,
        model: str | None = None,
        *,
        input: Mapping[str, Any],
        webhook: str | None = None,
        webhook_events_filter: Sequence[WebhookEvent] | None = None,
        wait: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Prediction:
        """Starts a prediction and returns it at once (status "starting"), or, with wait (1..60 seconds), once it
        has ended or that long has passed. webhook: a URL the server posts the prediction to on the
        events of webhook_events_filter (all of them by default)."""
        request = predictions_pb2.CreatePredictionRequest(
            model=model or "",
            version=version or "",
            input=input_struct(input),
            webhook=webhook or "",
            webhook_events_filter=[WEBHOOK_EVENT_VALUES[e] for e in webhook_events_filter or ()],
            wait_seconds=wait,
        )
        response = await self.call(lambda s: s.predictions.CreatePrediction(request, timeout=timeout))
        return Prediction.from_message(response.prediction)

    async def get_prediction(self, id: str, *, timeout: float | None = None) -> Prediction:  # noqa: ASYNC109
        request = predictions_pb2.GetPredictionRequest(id=id)
        response = await self.call(lambda s: s.predictions.GetPrediction(request, timeout=timeout))
        return Prediction.from_message(response.prediction)

    async def list_predictions(
        self,
        cursor: str | None = None,
        *,
        page_size: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> PredictionPage:
        """Predictions newest first, a page at a time: pass the page's next_cursor for the next one."""
        request = predictions_pb2.ListPredictionsRequest(cursor=cursor or "", page_size=page_size)
        response = await self.call(lambda s: s.predictions.ListPredictions(request, timeout=timeout))
        return PredictionPage([Prediction.from_message(p) for p in response.predictions], response.next_cursor or None)

    def prediction_events(
        self, id: str, *, last_event_id: str = "", timeout: float | None = None
    ) -> AsyncGenerator[predictions_pb2.StreamPredictionResponse, None]:
        """A prediction's events (`output`, `logs`, `error`, `done`), during or after its run, each with an
        event_id; pass the last one seen as last_event_id to resume after it."""
        request = predictions_pb2.StreamPredictionRequest(id=id, last_event_id=last_event_id)
        return self.call_stream(lambda s: s.predictions.StreamPrediction(request, timeout=timeout))


def _task_request(
    prompt: str | Sequence[int] | None,
    prefix: str | None,
    suffix: str,
    persistent: bool,
    sampling: SamplingOptions,
) -> dict[str, Any]:
    """The fields of CreateTaskRequest and CreateTaskStreamRequest."""
    fields: dict[str, Any] = {
        "kind": tasks_pb2.TASK_KIND_PERSISTENT if persistent else tasks_pb2.TASK_KIND_TEMPORARY,
        "sampling": sampling_params(**sampling),
    }
    if prefix is not None:
        if prompt is not None:
            raise TypeError("give prompt, or prefix and suffix (fill in the middle), not both")
        fields["fim"] = tasks_pb2.FillInTheMiddle(prefix=prefix, suffix=suffix)
    elif suffix:
        raise TypeError("suffix needs prefix (fill in the middle)")
    elif prompt is not None:
        fields["prompt"] = prompt_message(prompt)
    return fields


def _chat_request(
    messages: Sequence[MessageLike], model: str, n: int, user: str, sampling: SamplingOptions
) -> dict[str, Any]:
    """The fields of CompleteRequest and CompleteStreamRequest."""
    return {
        "model": model,
        "messages": chat_messages(messages),
        "n": n,
        "user": user,
        "sampling": sampling_params(**sampling),
    }
