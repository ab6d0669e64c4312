"""with_keepalive (service/http/sse.py): events in order, keep-alives only in silence, errors and early
closes reach the source, and a slow client holds the source back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.http.sse import KEEPALIVE, with_keepalive


class Source:
    """An async source that records how far it was read and whether its finally ran."""

    def __init__(self, items: list[bytes], gaps: dict[int, float] | None = None, fail_at: int | None = None) -> None:
        self.items = items
        self.gaps = gaps or {}  # seconds of silence before item i
        self.fail_at = fail_at
        self.produced = 0
        self.closed = False

    async def __call__(self) -> AsyncIterator[bytes]:
        try:
            for i, item in enumerate(self.items):
                if i in self.gaps:
                    await asyncio.sleep(self.gaps[i])
                if i == self.fail_at:
                    raise RuntimeError("source failed")
                self.produced += 1
                yield item
        finally:
            self.closed = True


async def collect(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [item async for item in stream]


async def test_events_pass_through_in_order_without_keepalives_when_busy() -> None:
    source = Source([b"%d" % i for i in range(200)])
    assert await collect(with_keepalive(source(), every=0.05)) == source.items
    assert source.closed


async def test_keepalives_fill_silences_only() -> None:
    source = Source([b"a", b"b", b"c"], gaps={1: 0.35})
    got = await collect(with_keepalive(source(), every=0.1))
    assert [g for g in got if g != KEEPALIVE] == [b"a", b"b", b"c"]
    assert got[0] == b"a"
    assert got[-1] == b"c"
    assert 2 <= got.count(KEEPALIVE) <= 4  # ~3 in a 0.35 s silence at one per 0.1 s
    assert got.index(b"b") > got.index(b"a") + 1  # the keep-alives came inside the silence


async def test_a_source_error_reaches_the_consumer_after_the_events_before_it() -> None:
    source = Source([b"a", b"b", b"c"], fail_at=2)
    got: list[bytes] = []

    async def read_all() -> None:
        async for item in with_keepalive(source(), every=1.0):
            got.append(item)

    with pytest.raises(RuntimeError, match="source failed"):
        await read_all()
    assert got == [b"a", b"b"]
    assert source.closed


@pytest.mark.parametrize("where", ["mid-stream", "in a silence"])
async def test_closing_early_closes_the_source(where: str) -> None:
    source = Source([b"a", b"b", b"c"], gaps={1: 30.0} if where == "in a silence" else {})
    stream = with_keepalive(source(), every=0.05)
    assert await anext(stream) == b"a"
    if where == "in a silence":
        assert await anext(stream) == KEEPALIVE  # waiting for b"b", 30 s away
    await stream.aclose()  # what StreamingResponse does when the client goes away
    assert source.closed


async def test_a_slow_client_holds_the_source_back() -> None:
    source = Source([b"%d" % i for i in range(100)])
    stream = with_keepalive(source(), every=1.0)
    assert await anext(stream) == b"0"
    await asyncio.sleep(0.05)  # the client does not read
    assert source.produced <= 3  # one item handed over, one in the queue, one waiting to go in
    assert [item async for item in stream] == source.items[1:]
