"""The engine process: one Engine serving one front end over a socket (`python -m service.engine.worker FD`).

The front end (service/engine/remote.py) starts this process with one end of a socket pair as FD and sends
("start", EngineConfig, log_level, log_format). This process builds the engine exactly as an in-process
server would (its own engine thread, the model loaded there) and answers ("ready", ModelInfo, token).
Then its main thread reads commands until ("shutdown",) or the end of the stream: a front end that dies
closes the socket, and this process cancels what runs and exits rather than computing for nobody.

States stay here. A state a request finishes with, a snapshot or an import is kept under a handle that
goes to the front end as a RemoteState; the front end sends ("release", handle) when it no longer holds
it. Events leave once per step as one frame (PipeOutlet), the observer's samples as they come.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import cast

from service import logs
from service.errors import InternalError, RwkvdError

from .config import EngineConfig
from .local import LocalEngineClient, build_engine
from .observer import RequestSample, StepSample
from .pipe import FrameWriter, RemoteState, read_frame
from .protocol import (
    Finished,
    GenerationRequest,
    StateRef,
    TokenEvent,
    foreign_state,
)
from .sequence import Sink
from .snapshot import StateSnapshot

log = logging.getLogger("rwkvd.engine")
# Device memory goes out with step samples at most this often (it is read at scrape time; reading it costs).
MEMORY_EVERY_SECONDS = 0.5


class _PipeSink:
    def __init__(self, request_id: str, outlet: PipeOutlet) -> None:
        self.request_id = request_id
        self.outlet = outlet


class PipeOutlet:
    """A step's events for every request of the front end, as one frame (with the engine's counts)."""

    def __init__(self, host: EngineHost) -> None:
        self._host = host

    def send(self, batch: list[tuple[Sink, list[TokenEvent]]]) -> None:
        host = self._host
        items: list[tuple[str, list[TokenEvent]]] = []
        for sink, events in batch:
            last = events[-1]
            if isinstance(last, Finished) and last.state is not None:
                events[-1] = dataclasses.replace(last, state=host.keep(last.state))
            items.append((cast(_PipeSink, sink).request_id, events))  # this outlet's sinks are _PipeSinks
        host.writer.send(("events", items, host.client.stats()))


class _Forwarder:
    """The engine's observer in this process: sends each sample to the front end's observers."""

    wants_origin = False  # a context cannot cross processes; the front end keeps each request's own

    def __init__(self, host: EngineHost) -> None:
        self._host = host
        self._memory_at = 0.0
        self._memory: dict[str, int] = {}

    def on_step(self, step: StepSample) -> None:
        client = self._host.client
        now = time.monotonic()
        if now - self._memory_at >= MEMORY_EVERY_SECONDS:
            self._memory_at, self._memory = now, client.device_memory()
        self._host.writer.send(("step", step, client.stats(), client.step_clock(), self._memory))

    def on_request_end(self, request: RequestSample) -> None:
        self._host.writer.send(("end", request))

    def on_rejected(self, api: str, kind: str) -> None:
        pass  # the front end decides admission and counts its refusals; this process refuses only when stopping


class EngineHost:
    """Runs commands from the front end against the local engine and keeps the states it handed out."""

    def __init__(self, client: LocalEngineClient, writer: FrameWriter) -> None:
        self.client = client
        self.writer = writer
        self.token = secrets.token_hex(8)  # names this process in its handles
        self._outlet = PipeOutlet(self)
        self._states: dict[int, StateSnapshot] = {}
        self._handles = itertools.count(1)
        self._lock = threading.Lock()  # the handle table: the engine thread adds, the reader resolves and drops
        client.observe(_Forwarder(self))

    def keep(self, state: StateRef) -> RemoteState:
        """Keeps a state of this engine under a new handle; what the front end holds of it."""
        assert isinstance(state, StateSnapshot)
        with self._lock:
            handle = next(self._handles)
            self._states[handle] = state
        return RemoteState(
            handle=handle,
            engine=self.token,
            model_version=state.model_version,
            token_count=state.token_count,
            pending_token=state.pending_token,
            nbytes=state.nbytes,
            generated_tokens=state.generated_tokens,
        )

    @property
    def states_kept(self) -> int:
        with self._lock:
            return len(self._states)

    def serve(self, read: Callable[[], object | None]) -> None:
        """Runs commands until shutdown or the end of the stream, then stops the engine (cancelling what runs)."""
        while True:
            try:
                message = read()
            except Exception:  # a corrupt frame: nothing after it can be trusted
                log.exception("engine process: a command could not be read; stopping")
                break
            if message is None:
                break
            if not isinstance(message, tuple) or not message:
                log.error("engine process: a malformed command %r", message)
                continue
            kind = message[0]
            if kind == "shutdown":
                break
            try:
                self._command(kind, message[1:])
            except Exception:  # one bad command must not end the process every request depends on
                log.exception("engine process: command %s failed", kind)
        self.client.shutdown()
        self.writer.send(("bye",))

    def _command(self, kind: str, args: tuple[object, ...]) -> None:
        if kind == "submit":
            request, api = args
            assert isinstance(request, GenerationRequest)
            assert isinstance(api, str)
            self._submit(request, api)
        elif kind == "abort":
            (request_id,) = args
            assert isinstance(request_id, str)
            self.client.abort_nowait(request_id)
        elif kind == "release":
            (handle,) = args
            with self._lock:
                self._states.pop(handle, None)  # type: ignore[call-overload]
        elif kind == "call":
            call_id, op, argument = args
            self._call(call_id, str(op), argument)
        else:
            log.error("engine process: unknown command %r", kind)

    def _submit(self, request: GenerationRequest, api: str) -> None:
        if request.start_state is not None:
            try:
                kept = self._lookup(request.start_state)
            except RwkvdError:  # released before it was used: the front end held no reference (a bug there)
                self._refuse(request, api, "the start state was released")
                return
            request = dataclasses.replace(request, start_state=kept)
        try:
            self.client.submit(request, _PipeSink(request.request_id, self._outlet), api)
        except RwkvdError as exc:  # the front end admitted it; the engine refuses only while stopping
            self._refuse(request, api, str(exc))
        except Exception as exc:  # a bug: the request still ends, and says so
            log.exception("engine process: submitting %s failed", request.request_id)
            self._refuse(request, api, f"submission failed: {type(exc).__name__}: {exc}")

    def _refuse(self, request: GenerationRequest, api: str, why: str) -> None:
        """Ends a request this process could not take, as the front end expects every request to end (and
        its observers count every request).

        Sent from the engine thread, as everything this process writes but its bye: the reader thread never
        waits on a full socket, so the front end's writes always drain."""
        ended = Finished.unserved(request.request_id, len(request.prompt), why, seed=request.sampling.seed or 0)
        sample = RequestSample.unserved(request.request_id, api, ended.usage, time.monotonic(), why)

        def send() -> None:
            self.writer.send(("end", sample))
            self.writer.send(("events", [(request.request_id, [ended])], self.client.stats()))

        self.client.call_later(send)

    def _call(self, call_id: object, op: str, argument: object) -> None:
        """Runs a call in the engine thread (between steps) and sends its result or error from there."""

        def run_and_reply() -> None:
            try:
                self.writer.send(("reply", call_id, True, self._run(op, argument)))
            except RwkvdError as exc:
                self.writer.send(("reply", call_id, False, exc))
            except Exception as exc:
                log.exception("engine process: call %s failed", op)
                self.writer.send(("reply", call_id, False, InternalError(f"{type(exc).__name__}: {exc}")))

        self.client.call_later(run_and_reply)

    def _run(self, op: str, argument: object) -> object:
        """(Engine thread.) One call's work."""
        if op == "snapshot":
            return self.keep(self.client.snapshot_now(str(argument)))
        if op == "export":
            return self.client.export_now(self._lookup(argument))
        if op == "import":
            return self.keep(self.client.import_now(cast(bytes, argument)))
        if op == "states":
            return self.states_kept
        raise InternalError(f"unknown engine call {op!r}")

    def _lookup(self, state: object) -> StateSnapshot:
        """The state a handle of this process names (refused if released, or another process's)."""
        kept = None
        if isinstance(state, RemoteState) and state.engine == self.token:
            with self._lock:
                kept = self._states.get(state.handle)
        if kept is None:
            raise foreign_state()
        return kept


def main(argv: Sequence[str]) -> int:
    # The front end decides when this process ends (shutdown, or closing the socket): a Ctrl-C in a terminal,
    # which reaches the whole process group, or a signal to the group must not end it under the front end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    stream = sock.makefile("rb")
    writer = FrameWriter(sock)
    start = read_frame(stream)
    if not (isinstance(start, tuple) and len(start) == 4 and start[0] == "start"):
        print(f"rwkvd engine process: expected a start message, got {start!r}", file=sys.stderr)
        return 2
    _, config, log_level, log_format = start
    assert isinstance(config, EngineConfig)
    logs.configure(str(log_level), str(log_format))
    try:
        client = build_engine(config)
    except Exception as exc:
        log.exception("engine process: the engine did not start")
        writer.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    host = EngineHost(client, writer)
    writer.send(("ready", client.model, host.token))
    host.serve(lambda: read_frame(stream))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
