"""The wire between a front end and its engine process (service/engine/pipe.py), on a local socket pair."""

from __future__ import annotations

import random
import socket
import threading

import pytest

from service.engine.pipe import FrameReader, FrameSender, FrameWriter, read_frame
from service.engine.protocol import Delta, Finished, FinishReason, Timings, Usage

MESSAGES: list[object] = [
    ("events", [("r1", [Delta("r1", 0, (1, 2), "héllo 🙂")])], None),
    ("end", Finished("r1", FinishReason.LENGTH, Usage(3, 2, 0), Timings(0.1, 0.2, 0.3, 0.4), 7)),
    ("call", 1, "import", bytes(range(256)) * 1000),  # 256 kB: the writer's no-copy path
    ("bye",),
]


def received_bytes(messages: list[object]) -> bytes:
    """What a FrameWriter puts on a socket for `messages` (written from a thread: they exceed its buffer)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:

        def write() -> None:
            writer = FrameWriter(ours)
            for m in messages:
                writer.send(m)
            ours.shutdown(socket.SHUT_WR)

        thread = threading.Thread(target=write)
        thread.start()
        theirs.settimeout(10)
        chunks = []
        while chunk := theirs.recv(1 << 16):
            chunks.append(chunk)
        thread.join()
        return b"".join(chunks)


def test_frames_come_back_whole_whatever_the_chunks() -> None:
    data = received_bytes(MESSAGES)
    assert FrameReader().feed(data) == MESSAGES
    # Fed in random pieces, down to single bytes: every message once, in order, as soon as it is complete.
    rng = random.Random(5)
    reader = FrameReader()
    got: list[object] = []
    i = 0
    while i < len(data):
        n = rng.choice([1, 2, 7, 100, 5000, 70000])
        got += reader.feed(data[i : i + n])
        i += n
    assert got == MESSAGES


def test_a_blocking_reader_reads_the_same_frames() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        data = received_bytes(MESSAGES)
        writer = threading.Thread(target=lambda: (theirs.sendall(data), theirs.shutdown(socket.SHUT_WR)))
        writer.start()
        stream = ours.makefile("rb")
        assert [read_frame(stream) for _ in MESSAGES] == MESSAGES
        assert read_frame(stream) is None  # the end of the stream
        writer.join()


def test_a_failed_send_stops_sending_but_keeps_what_the_peer_sent_readable() -> None:
    ours, theirs = socket.socketpair()
    FrameWriter(theirs).send(("bye",))  # the peer's last words, then it goes away
    theirs.close()
    failures: list[BaseException] = []
    told = threading.Event()

    def on_error(exc: BaseException) -> None:
        failures.append(exc)
        told.set()

    sender = FrameSender(ours, on_error)
    sender.send(("release", 1))  # fails: nobody reads
    assert told.wait(10)
    sender.send(("release", 2))  # dropped, and not a second failure
    # The socket is still open: the peer's bye is read after the failed send.
    ours.settimeout(10)
    assert FrameReader().feed(ours.recv(1 << 16)) == [("bye",)]
    sender.close()
    sender._thread.join(10)
    assert len(failures) == 1
    assert isinstance(failures[0], OSError)
    assert ours.fileno() == -1  # closed by close(), from the sender's thread


def test_a_frame_that_is_not_a_pickle_raises() -> None:
    with pytest.raises(Exception):  # noqa: B017, PT011  # whatever pickle raises on garbage
        FrameReader().feed(b"\x00\x00\x00\x00\x00\x00\x00\x04junk")
