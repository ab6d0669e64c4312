"""The gRPC server on loopback: health, reflection, ModelService, auth, error details, and the UNIMPLEMENTED
answer of a service that is registered before it is built."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rwkvd.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    common_pb2,
    completions_pb2,
    completions_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
)

from service.grpc.interceptors import ObserveInterceptor
from service.grpc.server import READINESS
from service.grpc.servicers.unimplemented import unimplemented_servicer
from tests.support import grpc_target, running_app

PUBLIC_SERVICES = {
    "rwkvd.v1.ModelService",
    "rwkvd.v1.CompletionService",
    "rwkvd.v1.TaskService",
    "rwkvd.v1.PredictionService",
    "rwkvd.v1.ChatService",
}


def details_of(err: grpc.aio.AioRpcError) -> tuple[status_pb2.Status, dict[str, object]]:
    """The google.rpc.Status in the trailers, and its details unpacked by type name."""
    raw = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    status = status_pb2.Status.FromString(raw)
    unpacked: dict[str, object] = {}
    for any_ in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.ResourceInfo):
            if any_.Is(cls.DESCRIPTOR):
                msg = cls()
                any_.Unpack(msg)
                unpacked[cls.DESCRIPTOR.name] = msg
    return status, unpacked


async def test_health_reflection_and_models() -> None:
    async with running_app() as app, grpc.aio.insecure_channel(grpc_target(app)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for name in ("", READINESS, *sorted(PUBLIC_SERVICES)):  # every public service is built
            assert (await health.Check(health_pb2.HealthCheckRequest(service=name))).status == serving, name

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed: set[str] = set()
        async for reply in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
            listed |= {s.name for s in reply.list_services_response.service}
        assert PUBLIC_SERVICES | {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed

        models = models_pb2_grpc.ModelServiceStub(channel)
        listing = await models.ListModels(models_pb2.ListModelsRequest())
        assert [m.id for m in listing.models] == ["local/rwkv7-demo"]
        demo = listing.models[0]
        assert (demo.demo, demo.architecture, demo.backend, demo.device) == (True, "rwkv7", "torch", "cpu")
        assert (demo.dtype, demo.state_dtype) == ("float32", "float32")  # --state-dtype's default
        assert len(demo.version) == 64  # sha256 hex of the weights
        int(demo.version, 16)
        assert (demo.shape.n_layer, demo.shape.n_embd, demo.shape.vocab_size) == (2, 128, 65536)
        assert demo.parameter_count > 1_000_000
        by_version = await models.GetModel(models_pb2.GetModelRequest(id=demo.version))
        assert by_version.model.id == demo.id
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await models.GetModel(models_pb2.GetModelRequest(id="someone/else"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        _, found = details_of(missing.value)
        assert found["ErrorInfo"].reason == "MODEL_NOT_FOUND"  # type: ignore[attr-defined]
        assert found["ResourceInfo"].resource_name == "someone/else"  # type: ignore[attr-defined]


async def test_bad_input_names_the_field_and_other_calls_go_on() -> None:
    async with running_app() as app, grpc.aio.insecure_channel(grpc_target(app)) as channel:
        stub = completions_pb2_grpc.CompletionServiceStub(channel)
        bad = completions_pb2.CreateCompletionRequest(
            prompt=common_pb2.Prompt(text="hi"), sampling=common_pb2.SamplingParams(temperature=7.5, top_p=1.5)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateCompletion(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status, found = details_of(err.value)
        fields = {v.field for v in found["BadRequest"].field_violations}  # type: ignore[attr-defined]
        assert fields == {"sampling.temperature", "sampling.top_p"}
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.CreateCompletion(completions_pb2.CreateCompletionRequest())
        _, found = details_of(missing.value)
        assert [v.field for v in found["BadRequest"].field_violations] == ["prompt"]  # type: ignore[attr-defined]

        good = completions_pb2.CreateCompletionRequest(
            prompt=common_pb2.Prompt(text="hi"), sampling=common_pb2.SamplingParams(max_tokens=4, ignore_eos=True)
        )
        reply = await stub.CreateCompletion(good)
        assert reply.usage.completion_tokens == 4
        assert reply.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_a_registered_but_unbuilt_service_answers_unimplemented_naming_the_rpc() -> None:
    # Every public service is built today; the server still registers a placeholder for one that is not
    # (GrpcServer, build=None), so that clients, reflection and transcoding see the whole API shape.
    server = grpc.aio.server(interceptors=[ObserveInterceptor()])
    descriptor = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
    placeholder = unimplemented_servicer(chat_pb2_grpc.ChatServiceServicer, descriptor, "planned for v2")
    chat_pb2_grpc.add_ChatServiceServicer_to_server(placeholder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.GetSession(chat_pb2.GetSessionRequest(session_id="x"))
            with pytest.raises(grpc.aio.AioRpcError) as streaming:
                async for _ in stub.CompleteStream(chat_pb2.CompleteStreamRequest()):
                    pass
            with pytest.raises(grpc.aio.AioRpcError) as bidi:
                async for _ in stub.Converse(iter([chat_pb2.ConverseRequest(open=chat_pb2.OpenSession())])):
                    pass
    finally:
        await server.stop(0)
    for err, method in ((unary, "GetSession"), (streaming, "CompleteStream"), (bidi, "Converse")):
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert f"ChatService/{method} is not implemented in this version of rwkvd (planned for v2)" in (
            err.value.details() or ""
        )
        _, found = details_of(err.value)
        assert found["ErrorInfo"].reason == "NOT_IMPLEMENTED"  # type: ignore[attr-defined]


async def test_auth_guards_everything_but_health_and_reflection() -> None:
    async with running_app(api_keys=("key-one", "key-two")) as app:
        target = grpc_target(app)
        request = models_pb2.ListModelsRequest()
        async with grpc.aio.insecure_channel(target) as channel:
            stub = models_pb2_grpc.ModelServiceStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "Basic key-one"),)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ListModels(request, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            # streaming RPCs are guarded too
            stream = completions_pb2_grpc.CompletionServiceStub(channel).CreateCompletionStream(
                completions_pb2.CreateCompletionStreamRequest(prompt=common_pb2.Prompt(text="x"))
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stream:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            for key in ("key-one", "key-two"):
                ok = await stub.ListModels(request, metadata=(("authorization", f"Bearer {key}"),))
                assert ok.models[0].id == "local/rwkv7-demo"
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            listed = [
                reply
                async for reply in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            ]
            assert listed[0].list_services_response.service


async def test_second_server_on_the_same_port_fails_to_bind() -> None:
    async with running_app() as app:
        assert app.grpc is not None
        with pytest.raises(RuntimeError):
            async with running_app(grpc_port=app.grpc.port):
                pass
