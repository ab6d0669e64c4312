"""The channel: bearer auth, retries while the server is not up yet, TLS, and the settings' checks."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
import rwkvd
from rwkvd._channel import ChannelSettings, service_config
from rwkvd.v1 import models_pb2, models_pb2_grpc

from tests.support import grpc_target, running_app

KEY = "k1"
on_auth_loop = pytest.mark.asyncio(loop_scope="module")  # the loop auth_target's server lives on


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def auth_target() -> AsyncIterator[str]:
    async with running_app(api_keys=(KEY,)) as app:
        yield grpc_target(app)


@on_auth_loop
@pytest.mark.parametrize("api_key", [None, "wrong"])
async def test_calls_without_the_right_key_are_unauthenticated(auth_target: str, api_key: str | None) -> None:
    async with rwkvd.AsyncClient(auth_target, api_key=api_key) as client:
        with pytest.raises(rwkvd.Unauthenticated) as unary:
            await client.list_models()
        with pytest.raises(rwkvd.Unauthenticated):
            async for _ in client.complete_stream("x", max_tokens=1):
                pass
    assert unary.value.reason == "UNAUTHENTICATED"


@on_auth_loop
async def test_the_right_key_is_sent_on_every_kind_of_call(auth_target: str) -> None:
    async with rwkvd.AsyncClient(auth_target, api_key=KEY) as client:
        assert [m.id for m in await client.list_models()] == ["local/rwkv7-demo"]
        events = [e async for e in client.complete_stream("x", max_tokens=2, ignore_eos=True)]
        assert events[-1].finished.usage.completion_tokens == 2
        models = await client.call(lambda s: s.models.ListModels(models_pb2.ListModelsRequest()))
        assert len(models.models) == 1


@on_auth_loop
async def test_metadata_given_per_call_wins(auth_target: str) -> None:
    async with rwkvd.AsyncClient(auth_target, api_key="wrong") as client:
        mine = (("authorization", f"Bearer {KEY}"),)
        models = await client.call(lambda s: s.models.ListModels(models_pb2.ListModelsRequest(), metadata=mine))
    assert len(models.models) == 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_calls_are_retried_until_the_server_listens() -> None:
    port = _free_port()
    up, done = asyncio.Event(), asyncio.Event()

    async def serve_later() -> None:
        await asyncio.sleep(0.3)
        async with running_app(grpc_port=port):
            up.set()
            await done.wait()

    async with rwkvd.AsyncClient(f"127.0.0.1:{port}") as client:
        server = asyncio.create_task(serve_later())
        try:
            models = await client.list_models()
        finally:
            done.set()
            await server
    assert up.is_set()
    assert [m.id for m in models] == ["local/rwkv7-demo"]


async def test_without_retries_an_absent_server_is_unavailable_at_once() -> None:
    started = time.monotonic()
    async with rwkvd.AsyncClient(f"127.0.0.1:{_free_port()}", max_attempts=1) as client:
        with pytest.raises(rwkvd.Unavailable):
            await client.list_models()
    assert time.monotonic() - started < 2


def test_retry_policy() -> None:
    [method] = json.loads(service_config(5))["methodConfig"]
    assert method["name"] == [{}]
    assert method["retryPolicy"]["maxAttempts"] == 5
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "retryPolicy" not in json.loads(service_config(1))["methodConfig"][0]


@pytest.mark.parametrize(
    "settings",
    [
        {"max_attempts": 0},
        {"timeout": 0},
        {"root_certificates": b"pem"},
        {"tls": True, "private_key": b"pem"},
    ],
)
def test_settings_are_checked(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        ChannelSettings("localhost:1", **settings)


class _EchoModels(models_pb2_grpc.ModelServiceServicer):
    """Answers with one model named after the authorization header it received."""

    async def ListModels(self, request: Any, context: Any) -> models_pb2.ListModelsResponse:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        return models_pb2.ListModelsResponse(models=[models_pb2.Model(id=auth)])

    async def GetModel(self, request: Any, context: Any) -> models_pb2.GetModelResponse:
        [model] = (await self.ListModels(request, context)).models
        return models_pb2.GetModelResponse(model=model)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A self-signed certificate for "localhost": (private key, certificate), PEM."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    key, cert = (tmp_path_factory.mktemp("tls") / name for name in ("key.pem", "cert.pem"))
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-addext", "subjectAltName=DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return key.read_bytes(), cert.read_bytes()


async def test_mutual_tls_with_a_bearer_token(certificate: tuple[bytes, bytes]) -> None:
    # The one self-signed certificate serves as server identity, client identity and the root of both.
    pem_key, pem_cert = certificate
    server = grpc.aio.server()
    models_pb2_grpc.add_ModelServiceServicer_to_server(_EchoModels(), server)
    credentials = grpc.ssl_server_credentials(
        [(pem_key, pem_cert)], root_certificates=pem_cert, require_client_auth=True
    )
    port = server.add_secure_port("localhost:0", credentials)
    await server.start()
    try:
        async with rwkvd.AsyncClient(
            f"localhost:{port}",
            api_key="s3cret",
            tls=True,
            root_certificates=pem_cert,
            private_key=pem_key,
            certificate_chain=pem_cert,
        ) as client:
            assert [m.id for m in await client.list_models()] == ["Bearer s3cret"]
        async with rwkvd.AsyncClient(f"localhost:{port}", max_attempts=1) as plaintext:
            with pytest.raises(rwkvd.Unavailable):
                await plaintext.list_models(timeout=5)
    finally:
        await server.stop(0)
