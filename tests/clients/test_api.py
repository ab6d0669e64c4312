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


def public_methods(cls: type) -> set[str]:
    return {name for name, value in vars(cls).items() if callable(value) and not name.startswith("_")}


def test_sync_methods_have_the_async_signatures() -> None:
    names = public_methods(rwkvd.AsyncClient) - {"close"}  # the same, but the sync one also stops its thread
    assert names == public_methods(rwkvd.Client) - {"close"}
    assert {"run", "run_async", "stream", "stream_async", "cancel", "create_task", "get_task"} <= names
    for name in names:
        sync, asynchronous = getattr(rwkvd.Client, name), getattr(rwkvd.AsyncClient, name)
        # Methods that make tasks return the blocking Task handle instead of the AsyncTask.
        parameters = inspect.signature(sync).parameters
        assert list(parameters.values())[1:] == list(inspect.signature(asynchronous).parameters.values())[1:], name
        assert sync.__doc__ == asynchronous.__doc__
    assert inspect.signature(rwkvd.Client.create_task).return_annotation == "Task"
    assert inspect.signature(rwkvd.Client.__init__) == inspect.signature(rwkvd.AsyncClient.__init__)


def test_task_handles_have_the_same_operations() -> None:
    names = public_methods(rwkvd.AsyncTask)
    assert names == public_methods(rwkvd.Task)
    assert names == {"refresh", "wait", "stream", "events", "fork", "continue_", "as_template", "stop", "delete"}
    for name in names:
        sync, asynchronous = getattr(rwkvd.Task, name), getattr(rwkvd.AsyncTask, name)
        parameters = inspect.signature(sync).parameters
        assert list(parameters.values())[1:] == list(inspect.signature(asynchronous).parameters.values())[1:], name
        assert sync.__doc__ == asynchronous.__doc__


def test_chat_session_handles_have_the_same_operations() -> None:
    names = public_methods(rwkvd.AsyncChatSession)
    assert names == public_methods(rwkvd.ChatSession)
    assert names == {"open", "close", "send", "ask", "cancel", "refresh", "export"}
    for name in names:
        sync, asynchronous = getattr(rwkvd.ChatSession, name), getattr(rwkvd.AsyncChatSession, name)
        parameters = inspect.signature(sync).parameters
        assert list(parameters.values())[1:] == list(inspect.signature(asynchronous).parameters.values())[1:], name
        assert sync.__doc__ == asynchronous.__doc__, name
    assert inspect.signature(rwkvd.Client.chat).return_annotation == "ChatSession"


def test_streams_are_generators_that_start_on_first_use() -> None:
    client = rwkvd.Client("127.0.0.1:1", max_attempts=1)
    try:
        stream = client.complete_stream("x")  # nothing is sent yet: no error although nothing listens there
        assert inspect.isgenerator(stream)
        stream.close()
    finally:
        client.close()
