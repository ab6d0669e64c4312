"""The public surface of the package: exports, version, and Client mirroring AsyncClient."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import grpc
import rwkvd


def test_exports() -> None:
    assert rwkvd.__version__ == version("rwkvd")
    for name in rwkvd.__all__:
        assert hasattr(rwkvd, name), name
    for code in grpc.StatusCode:
        error = rwkvd.from_rpc_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata()))
        assert isinstance(error, rwkvd.RwkvdError)


def test_sync_methods_have_the_async_signatures() -> None:
    for name in ("call", "stream", "list_models", "get_model", "complete", "complete_stream"):
        sync, asynchronous = getattr(rwkvd.Client, name), getattr(rwkvd.AsyncClient, name)
        assert inspect.signature(sync) == inspect.signature(asynchronous), name
        assert sync.__doc__ == asynchronous.__doc__
    assert inspect.signature(rwkvd.Client.__init__) == inspect.signature(rwkvd.AsyncClient.__init__)


def test_streams_are_generators_that_start_on_first_use() -> None:
    client = rwkvd.Client("127.0.0.1:1", max_attempts=1)
    try:
        stream = client.complete_stream("x")  # nothing is sent yet: no error although nothing listens there
        assert inspect.isgenerator(stream)
        stream.close()
    finally:
        client.close()
