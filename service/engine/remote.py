"""The EngineClient of a front end whose engine runs in a process of its own (`--engine-process`).

Why a process: in one CPython process the event loop (every stream's gRPC or HTTP work) and the engine's
step loop share one GIL, and under a few hundred streams they take turns (bench/README.md, "Host
ceilings"). Here the engine process steps, samples and decodes text; this process only turns its events
into messages, and the two run on two cores.

What stays in this process: admission. Validation, duplicate request ids and the queue limit are decided
here, from the requests submitted and not yet seen to end, so generate() raises at once exactly as the
in-process client does (the engine process takes every request it is sent). States stay in the engine
process; this process holds RemoteState handles, released when their last reference goes. Observers run
here: the engine process forwards its samples, and the submitting call's context (tracing) is kept here
per request. Event-loop bound: every method but shutdown() runs on the loop the client started on.

If the engine process dies, every open stream ends with an error, pending calls fail UNAVAILABLE, new
requests are refused, and `on_lost` is called (the app stops, so that an orchestrator restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import RwkvdError, Unavailable

from .config import EngineConfig
from .local import EventStream, QueueSink
from .observer import EngineObserver, ObserverGroup, RequestSample, request_api
from .pipe import FrameReader, FrameSender, FrameWriter, RemoteState
from .protocol import (
    EngineStats,
    Finished,
    GenerationRequest,
    ModelInfo,
    StateRef,
    TokenEvent,
    check_admission,
    check_request,
    foreign_state,
)
from .tokenizer import WorldTokenizer

log = logging.getLogger("rwkvd.engine")

# The command that starts an engine process; the socket's descriptor is appended. A benchmark may replace it
# (bench/simulated_device.py runs the engine process with its simulated device).
WORKER_COMMAND: list[str] = [sys.executable, "-m", "service.engine.worker"]
# Socket buffers: a step's events for a thousand streams fit without the engine process waiting for a read.
SOCKET_BUFFER_BYTES = 4 << 20
READ_BYTES = 1 << 20


class EngineStartError(RuntimeError):
    """The engine process did not start (a bad checkpoint, no device); its log says more."""


@dataclass(slots=True)
class _Open:
    """A request submitted and not yet seen to end (and what its end says if the engine process dies)."""

    sink: QueueSink
    prompt_tokens: int
    api: str
    arrival: float  # time.monotonic()


async def start_engine_process(config: EngineConfig, log_level: str, log_format: str) -> ProcessEngineClient:
    """Starts an engine process, waits until its model is loaded, and returns its client on this loop."""
    process, sock, reader, first = await asyncio.to_thread(_spawn, config, log_level, log_format)
    hello = first[0]
    assert isinstance(hello, tuple)  # _spawn checked it: ("ready", ModelInfo, engine token)
    client = ProcessEngineClient(process, sock, reader, hello[1], hello[2], config)
    for message in first[1:]:
        client._dispatch(message)
    return client


def _spawn(
    config: EngineConfig, log_level: str, log_format: str
) -> tuple[subprocess.Popen[bytes], socket.socket, FrameReader, list[object]]:
    """(A worker thread.) Starts the process and blocks until its first message: model loaded, or failed."""
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    process = subprocess.Popen([*WORKER_COMMAND, str(theirs.fileno())], pass_fds=(theirs.fileno(),))
    theirs.close()
    reader = FrameReader()
    first: list[object] = []
    try:
        FrameWriter(ours).send(("start", config, log_level, log_format))
        while not first and (data := ours.recv(READ_BYTES)):
            first = reader.feed(data)
    except BaseException:
        process.kill()
        raise
    finally:
        hello = first[0] if first else None
        if not (isinstance(hello, tuple) and hello[0] == "ready"):
            process.wait()
            ours.close()
    if not (isinstance(hello, tuple) and hello[0] == "ready"):
        why = hello[1] if isinstance(hello, tuple) and hello[0] == "failed" else f"exit code {process.returncode}"
        raise EngineStartError(f"the engine process did not start: {why}")
    return process, ours, reader, first


class ProcessEngineClient:
    def __init__(
        self,
        process: subprocess.Popen[bytes],
        sock: socket.socket,
        reader: FrameReader,
        model: ModelInfo,
        token: str,
        config: EngineConfig,
    ) -> None:
        self._process = process
        self._sock = sock
        self._fd = sock.fileno()
        self._reader = reader
        self._model = model
        self._token = token
        self._config = config
        self._tokenizer = WorldTokenizer()
        self._loop = asyncio.get_running_loop()
        self._open: dict[str, _Open] = {}
        self._origins: dict[str, contextvars.Context] = {}
        self._calls: dict[int, asyncio.Future[object]] = {}
        self._call_ids = itertools.count(1)
        self._observer: ObserverGroup | None = None
        self._stats = EngineStats(0, 0, 0, config.max_batch_size, 0, 0, 0, 0)
        self._clock: dict[str, float] = {}
        self._memory: dict[str, int] = {}
        self._stopping = False
        self._lost: str | None = None  # why the engine process is gone, if it went unasked
        self._ended = threading.Event()  # its last message has been read (bye, or the end of the stream)
        # Called on the loop if the engine process ends without being asked to.
        self.on_lost: Callable[[], None] | None = None
        # Writes go through a thread of their own (blocking writes); the loop reads only when data is there.
        sock.settimeout(None)
        self._sender = FrameSender(sock, self._send_failed)
        self._inbox = memoryview(bytearray(READ_BYTES))
        self._loop.add_reader(self._fd, self._on_readable)

    # EngineClient

    @property
    def model(self) -> ModelInfo:
        return self._model

    @property
    def tokenizer(self) -> WorldTokenizer:
        return self._tokenizer

    def generate(self, request: GenerationRequest) -> EventStream:
        api = request_api.get()
        try:
            self._admit(request)
        except RwkvdError as exc:
            if self._observer is not None:
                self._observer.on_rejected(api, exc.kind.name.lower())
            raise
        sink = QueueSink(self._loop)
        self._open[request.request_id] = _Open(sink, len(request.prompt), api, time.monotonic())
        if self._observer is not None and self._observer.wants_origin:
            self._origins[request.request_id] = contextvars.copy_context()
        self._sender.send(("submit", request, api))
        return EventStream(self._abort_nowait, sink, request.request_id)

    def check(self, request: GenerationRequest) -> None:
        check_request(
            request,
            vocab_size=self._model.vocab_size,
            max_prompt_tokens=self._config.max_prompt_tokens,
            max_new_tokens=self._config.max_new_tokens,
            state_ok=self._ours,
        )

    async def abort(self, request_id: str) -> None:
        self._abort_nowait(request_id)

    async def snapshot(self, request_id: str) -> StateRef:
        return await self._call("snapshot", request_id)  # type: ignore[return-value]  # a RemoteState

    async def export_state(self, state: StateRef) -> bytes:
        if not self._ours(state):
            raise foreign_state()
        return await self._call("export", state)  # type: ignore[return-value]  # the engine returns bytes

    async def import_state(self, data: bytes) -> StateRef:
        return await self._call("import", data)  # type: ignore[return-value]  # a RemoteState

    def stats(self) -> EngineStats:
        """The engine's counts as of its latest step or delivery."""
        return self._stats

    # What the app and metrics use beside EngineClient (as LocalEngineClient offers them).

    def observe(self, observer: EngineObserver) -> None:
        self._observer = ObserverGroup.guarding(observer)

    def step_clock(self) -> dict[str, float]:
        return dict(self._clock)

    def device_memory(self) -> dict[str, int]:
        return dict(self._memory)

    async def states_kept(self) -> int:
        """How many states the engine process keeps for this front end (handles not yet released)."""
        kept = await self._call("states", None)
        assert isinstance(kept, int)
        return kept

    @property
    def pid(self) -> int:
        return self._process.pid

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the engine process (what still runs is cancelled and its ends delivered) and waits for it.
        Blocking: call it off the loop (the loop reads the last events meanwhile)."""
        self._stopping = True
        self._sender.send(("shutdown",))
        deadline = time.monotonic() + timeout
        self._ended.wait(timeout)
        try:
            code = self._process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.error("the engine process did not stop within %.0fs; killing it", timeout)
            self._process.kill()
            code = self._process.wait()
        if code != 0 and self._lost is None:
            log.error("the engine process exited with code %s while stopping", code)

    # Internals

    def _admit(self, request: GenerationRequest) -> None:
        if self._lost is not None:
            raise Unavailable(self._lost, reason="ENGINE_UNAVAILABLE", retry_after=5.0)
        self.check(request)
        check_admission(
            request.request_id,
            stopping=self._stopping,
            in_use=request.request_id in self._open,
            # As the engine counts (queued minus free slots): everything open beyond the slots waits.
            waiting=len(self._open) - self._config.max_batch_size,
            max_queued=self._config.max_queued,
        )

    def _ours(self, state: StateRef) -> bool:
        return isinstance(state, RemoteState) and state.engine == self._token

    def _abort_nowait(self, request_id: str) -> None:
        # Also from EventStream.__del__, on whatever thread collects it, mid-send included: it only queues.
        if request_id in self._open and not self._ended.is_set():
            self._sender.send(("abort", request_id))

    async def _call(self, op: str, argument: object) -> object:
        if self._lost is not None or self._ended.is_set():
            raise Unavailable(self._lost or "the engine is shutting down", reason="ENGINE_UNAVAILABLE")
        call_id = next(self._call_ids)
        future: asyncio.Future[object] = self._loop.create_future()
        self._calls[call_id] = future
        self._sender.send(("call", call_id, op, argument))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)  # answered, or its caller went away

    def _adopt(self, state: RemoteState) -> RemoteState:
        """From now on the engine process keeps `state` exactly as long as this process references it."""
        finalizer = weakref.finalize(state, self._release, state.handle)
        finalizer.atexit = False
        return state

    def _release(self, handle: int) -> None:
        # A finalizer, on whatever thread collects the handle, mid-send included: it only queues.
        if not self._ended.is_set():
            self._sender.send(("release", handle))

    def _send_failed(self, exc: BaseException) -> None:
        """(The sender's thread.) A frame could not be sent whole: the engine process cannot be spoken to."""
        if self._stopping:  # it exits after its bye: a late release finds the socket closed, and that is all
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(self._broken, f"sending to the engine process failed: {exc!r}")

    def _broken(self, why: str) -> None:
        """The pipe to the engine process is unusable: stop it and fail what it had."""
        if self._ended.is_set():
            return
        log.critical("%s; stopping the engine process", why)
        self._process.kill()
        self._end(why)

    def _on_readable(self) -> None:
        try:
            # Into one buffer kept for the purpose: recv(n) would allocate (and, this large, map) n bytes a call.
            size = self._sock.recv_into(self._inbox)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError:
            size = 0
        if not size:
            self._end()
            return
        try:
            messages = self._reader.feed(self._inbox[:size])
        except Exception as exc:  # a corrupt frame: nothing after it can be trusted
            self._broken(f"a frame from the engine process could not be read: {exc!r}")
            return
        for message in messages:
            self._dispatch(message)

    def _dispatch(self, message: object) -> None:
        assert isinstance(message, tuple)
        kind = message[0]
        if kind == "events":
            self._stats = message[2]
            for request_id, events in message[1]:
                self._deliver(request_id, events)
        elif kind == "step":
            step, self._stats, self._clock, self._memory = message[1:]
            if self._observer is not None:
                self._observer.on_step(step)
        elif kind == "end":
            self._on_request_end(message[1])
        elif kind == "reply":
            _, call_id, ok, value = message
            if isinstance(value, RemoteState):
                self._adopt(value)  # first: if its caller went away, dropping it here releases it there
            future = self._calls.pop(call_id, None)
            if future is None or future.done():  # its caller went away
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        elif kind == "bye":
            self._end()
        else:
            log.error("the engine process sent an unknown message %r", kind)

    def _deliver(self, request_id: str, events: list[TokenEvent]) -> None:
        last = events[-1]
        if isinstance(last, Finished):
            opened = self._open.pop(request_id, None)
            self._origins.pop(request_id, None)  # its sample came first, if the engine took it at all
            if isinstance(last.state, RemoteState):
                self._adopt(last.state)
        else:
            opened = self._open.get(request_id)
        if opened is not None:
            opened.sink.deliver(events)

    def _on_request_end(self, sample: RequestSample) -> None:
        sample.origin = self._origins.pop(sample.request_id, None)
        if self._observer is not None:
            self._observer.on_request_end(sample)

    def _end(self, why: str | None = None) -> None:
        """The engine process's stream ended: after its bye when asked to stop; else it died (or `why`)."""
        if self._ended.is_set():
            return
        self._loop.remove_reader(self._fd)
        lost = not self._stopping or why is not None
        if lost:
            code = self._process.poll()
            self._lost = why or "the engine process ended unexpectedly" + (
                f" (exit code {code})" if code is not None else ""
            )
            log.critical("%s; failing its %d open requests", self._lost, len(self._open))
        why = self._lost or "the engine stopped"
        for request_id, opened in self._open.items():
            ended = Finished.unserved(request_id, opened.prompt_tokens, why)
            opened.sink.deliver([ended])
            # counted and traced like any failed request
            self._on_request_end(RequestSample.unserved(request_id, opened.api, ended.usage, opened.arrival, why))
        self._open.clear()
        self._origins.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(Unavailable(why, reason="ENGINE_UNAVAILABLE"))
        self._calls.clear()
        self._ended.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # a send blocked on a full socket returns (and fails)
        self._sender.close()
        if lost and self.on_lost is not None:
            self.on_lost()
