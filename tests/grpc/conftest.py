"""Helpers for the servicer tests: one real server per module, error details, and waiting for the engine.

Modules that use `app` run on the module's event loop, where the server lives:
`pytestmark = pytest.mark.asyncio(loop_scope="module")`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest_asyncio
from google.rpc import error_details_pb2, status_pb2

from service.app import App
from tests.support import grpc_target, running_app

# Low enough that a "huge prompt" is quick to build and refuse.
MAX_PROMPT_TOKENS = 2048


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app() -> AsyncIterator[App]:
    async with running_app(**{"engine.max_prompt_tokens": MAX_PROMPT_TOKENS}) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(grpc_target(app)) as opened:
        yield opened


def error_of(err: grpc.aio.AioRpcError) -> tuple[str, list[str], tuple[str, str] | None]:
    """(ErrorInfo.reason, BadRequest fields, ResourceInfo (type, name)) of a failed call."""
    raw = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    reason, fields, resource = "", [], None
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info_ = error_details_pb2.ResourceInfo()
            detail.Unpack(info_)
            resource = (info_.resource_type, info_.resource_name)
    return reason, fields, resource


async def slots_free(app: App, within: float = 5.0) -> bool:
    """Whether the engine holds no state slot (nothing running or waiting), polling up to `within` seconds."""
    assert app.engine is not None
    for _ in range(int(within / 0.02)):
        stats = app.engine.stats()
        if stats.slots_in_use == stats.running == stats.waiting == 0:
            return True
        await asyncio.sleep(0.02)
    return False
