"""The wire between a front end and its engine process: length-prefixed pickled frames, and state handles.

Both ends are ours and start together (the front end spawns the engine process and hands it one end of a
socket pair), so frames are pickles of the engine's own value types (GenerationRequest, the events, the
observer samples) and tuples naming the message, never anything a client sent as bytes. A frame is an
8-byte big-endian length and that many bytes of pickle.

Messages, front end to engine: ("start", EngineConfig, log_level, log_format) first, then
("submit", GenerationRequest, api), ("abort", request_id), ("call", call_id, op, argument) with op one of
snapshot / export / import / states, ("release", handle) and ("shutdown",).
Engine to front end: ("ready", ModelInfo, engine_token) or ("failed", text) first, then
("events", [(request_id, [TokenEvent, ...]), ...], EngineStats) once per step, ("step", StepSample,
EngineStats, step_clock, device_memory), ("end", RequestSample), ("reply", call_id, ok, value or error)
and ("bye",) after the last events of a shutdown.
"""

from __future__ import annotations

import contextlib
import pickle
import queue
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

_HEADER = struct.Struct("!Q")


@dataclass(frozen=True, eq=False)
class RemoteState:
    """A state kept in an engine process, as its front end holds it: a handle plus what StateRef reports.

    The front end releases the handle when its last reference goes (a finalizer sends ("release", handle));
    until then the engine process keeps the state. `engine` names the engine process that issued it, so a
    handle is never resolved by another one. Identity equality: two handles are two references."""

    handle: int
    engine: str
    model_version: str
    token_count: int
    pending_token: int | None
    nbytes: int
    generated_tokens: int


class FrameWriter:
    """Writes whole frames to a socket; several threads may write (a lock keeps frames whole)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, message: object) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            if len(data) < 1 << 16:
                self._sock.sendall(_HEADER.pack(len(data)) + data)
            else:  # a state's bytes: no copy to prepend the header
                self._sock.sendall(_HEADER.pack(len(data)))
                self._sock.sendall(data)


class FrameSender:
    """Sends frames from a thread of its own; callers only queue them, in order.

    For the front end: its event loop never waits on a full socket (a whole state may be on its way), and a
    finalizer that the garbage collector runs in the middle of another send (a dropped state handle or
    stream) only puts a message in a SimpleQueue, which is safe there, instead of taking a writer's lock
    that its own thread may hold. After a failed send nothing more is sent: `on_error` is told once, and the
    socket stays open for reading until close()."""

    _STOP = object()

    def __init__(self, sock: socket.socket, on_error: Callable[[BaseException], None]) -> None:
        self._writer = FrameWriter(sock)
        self._sock = sock
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name="rwkvd-engine-sender", daemon=True)
        self._thread.start()

    def send(self, message: object) -> None:
        self._queue.put(message)

    def close(self) -> None:
        """Sends what is queued, then closes the socket (from the sender's thread). The reader of the socket
        must have stopped watching it first: its descriptor number is free for reuse once closed."""
        self._queue.put(self._STOP)

    def _run(self) -> None:
        failed = False
        try:
            while (message := self._queue.get()) is not self._STOP:
                if failed:
                    continue  # nothing more goes out after a torn frame
                try:
                    self._writer.send(message)
                except BaseException as exc:
                    failed = True
                    # The peer reads the end of the stream; this side stays open, so what the peer sent
                    # before (its last events, a bye) is still read.
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_WR)
                    self._on_error(exc)
        finally:
            self._sock.close()


class FrameReader:
    """Splits bytes into messages as they arrive: for a non-blocking socket read on an event loop."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> list[object]:
        """The messages completed by `data`, in order (a partial frame stays for the next call)."""
        buffer = self._buffer
        buffer += data
        messages: list[object] = []
        start = 0
        end = len(buffer)
        with memoryview(buffer) as view:  # released before the buffer is resized below
            while end - start >= _HEADER.size:
                (size,) = _HEADER.unpack_from(view, start)
                if end - start - _HEADER.size < size:
                    break
                body = start + _HEADER.size
                messages.append(pickle.loads(view[body : body + size]))  # raises on a corrupt frame
                start = body + size
        if start:
            del buffer[:start]
        return messages


def read_frame(stream: BinaryIO) -> object | None:
    """The next message from a blocking stream (a socket's makefile("rb")); None at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    body = stream.read(size)
    if len(body) < size:
        return None
    message: object = pickle.loads(body)
    return message
