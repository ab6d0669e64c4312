"""The engine thread: takes commands, runs steps back to back, and hands events to the callers' loops.

The step loop runs in its own thread and never waits on the network: callers on any thread submit
requests and commands through a queue (admission limits are checked at once, in the caller's thread),
and each step's events go out in one batch per event loop. A failing step fails the requests in it,
a failing request fails alone; the loop goes on.
"""

from __future__ import annotations

import contextvars
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from service.errors import (
    FailedPrecondition,
    RwkvdError,
)

from .config import EngineConfig
from .observer import EngineObserver, RequestSample, StepSample
from .protocol import EngineStats, FinishReason, GenerationRequest, StateRef, TokenEvent, check_admission, check_request
from .runner import LaunchedStep, Runner
from .scheduler import Scheduler, StepPlan
from .sequence import Outlet, Phase, Sequence, Sink
from .snapshot import StateSnapshot
from .tokenizer import WorldTokenizer

log = logging.getLogger("rwkvd.engine")
T = TypeVar("T")


class Engine:
    def __init__(self, runner: Runner, tokenizer: WorldTokenizer, config: EngineConfig) -> None:
        self._runner = runner
        self._tokenizer = tokenizer
        self._config = config
        self._scheduler = Scheduler(config.max_batch_tokens, config.prefill_chunk)
        self._cv = threading.Condition()
        self._commands: deque[Callable[[], None]] = deque()
        self._queued = 0  # submitted, not yet holding a slot (guarded by _cv)
        self._live: set[str] = set()  # request ids not yet finished (guarded by _cv)
        self._stopping = False
        self._finished_seqs: list[Sequence] = []  # finished this iteration, events not yet delivered
        self._unemitted: list[Sequence] = []  # accepted a token whose text _flush() decodes
        self._with_deadline: set[Sequence] = set()  # live sequences with a deadline (checked every step)
        # Launch step N+1 before decoding step N's text and delivering its events (see _iterate).
        self._overlap = config.overlap_on(runner.device.type)
        self._exited = threading.Event()
        self.steps = 0
        # Cumulative seconds per phase of the step loop (read by benchmarks and metrics).
        self._clock = {"schedule": 0.0, "forward": 0.0, "sample": 0.0, "postprocess": 0.0, "deliver": 0.0}
        # Set once before serving (metrics, request log, traces); called in the engine thread.
        self.observer: EngineObserver | None = None

    # Methods up to validate may be called from any thread; those after it run in the engine thread.

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancels whatever still runs, then waits for the loop to exit."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._exited.wait(timeout)

    @property
    def model_version(self) -> str:
        return self._runner.model_version

    def submit(self, request: GenerationRequest, sink: Sink, api: str = "internal") -> None:
        """Queues a request; raises at once if it is invalid or the engine is full or stopping.

        `api` labels the request for the observer (the front end it came through)."""
        try:
            self._submit(request, sink, api)
        except RwkvdError as exc:
            if self.observer is not None:
                self.observer.on_rejected(api, exc.kind.name.lower())
            raise

    def _submit(self, request: GenerationRequest, sink: Sink, api: str) -> None:
        self.validate(request)
        start = request.start_state
        assert start is None or isinstance(start, StateSnapshot)
        if request.sampling.seed is not None:
            seed = request.sampling.seed
        elif start is not None and request.inherit_sampler:
            seed = start.seed
        else:
            seed = secrets.randbits(63)
        seq = Sequence(request, sink, self._tokenizer, seed)
        seq.api = api
        observer = self.observer
        if observer is not None and observer.wants_origin:
            seq.origin = contextvars.copy_context()  # submit runs in the caller's context
        with self._cv:
            # Submitted requests take the free slots first; only those beyond them wait in the queue.
            check_admission(
                request.request_id,
                stopping=self._stopping,
                in_use=request.request_id in self._live,
                waiting=self._queued - self._runner.free_slots,
                max_queued=self._config.max_queued,
            )
            self._queued += 1
            self._live.add(request.request_id)
            self._commands.append(lambda: self._add(seq))
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        self._post(lambda: self._abort(request_id))

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Runs fn in the engine thread between steps (for state copies); its result or error in the future."""
        future: Future[T] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

        self._post(run)
        return future

    def snapshot_of(self, request_id: str) -> StateSnapshot:
        """(Engine thread.) The current state of a live request."""
        seq = self._scheduler.by_id.get(request_id)
        if seq is None:
            raise FailedPrecondition(f"request {request_id!r} is not running", reason="NOT_RUNNING")
        if seq.slot is None:
            raise FailedPrecondition(f"request {request_id!r} has not started yet", reason="NOT_STARTED")
        return self._runner.snapshot(seq)

    def step_clock(self) -> dict[str, float]:
        """A copy of the per-phase clock plus the step count (approximate if read while stepping)."""
        return {**self._clock, "steps": float(self.steps)}

    def stats(self) -> EngineStats:
        cache = self._runner.prefix_cache
        return EngineStats(
            running=len(self._scheduler.running),
            waiting=len(self._scheduler.waiting),
            slots_in_use=self._runner.pool.in_use,
            slots_total=self._runner.pool.capacity,
            prefix_cache_entries=len(cache),
            prefix_cache_hits=cache.hits,
            prefix_cache_misses=cache.misses,
            steps=self.steps,
        )

    def _post(self, command: Callable[[], None]) -> None:
        with self._cv:
            self._commands.append(command)
            self._cv.notify()

    def validate(self, request: GenerationRequest) -> None:
        version = self._runner.model_version
        check_request(
            request,
            vocab_size=self._runner.model.shape.vocab_size,
            max_prompt_tokens=self._config.max_prompt_tokens,
            max_new_tokens=self._config.max_new_tokens,
            state_ok=lambda s: isinstance(s, StateSnapshot) and s.model_version == version,
        )

    def run(self) -> None:
        """The step loop, in the engine thread, until shutdown()."""
        try:
            self._loop()
        finally:
            self._exited.set()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._commands and self._scheduler.idle and not self._stopping:
                    self._cv.wait()
            if not self._iterate():
                return

    def _iterate(self) -> bool:
        """Commands, then one step; False once stopped. Its locals (the step's rows, the commands) die on
        return, so nothing of a finished request stays referenced while the loop waits for work.

        With overlap on, the host work that does not decide the next step (decoding text, handing events
        to the loops) runs while the device computes: the step is launched first, the previous step's text
        and events go out, then the step's tokens are read and accepted. Without it (on a CPU, where a launch
        is the whole computation) each step's events go out as soon as it ends."""
        with self._cv:
            commands = list(self._commands)
            self._commands.clear()
            stopping = self._stopping
        for command in commands:
            try:
                command()
            except Exception:  # a bug in one command must not stop the loop every request depends on
                log.exception("engine command failed")
        if stopping:
            for seq in list(self._scheduler.all()):
                self._finish(seq, FinishReason.CANCELLED)
            self._flush()
            return False
        t0 = time.perf_counter()
        self._expire()
        self._admit()
        plan = self._scheduler.plan()
        self._clock["schedule"] += time.perf_counter() - t0
        launched = self._launch(plan) if plan.rows else None
        if self._overlap:
            self._flush()
        if launched is not None:
            self._accept(plan, launched)
        if not self._overlap or self._scheduler.idle:  # idle: no next step to hide this behind
            self._flush()
        elif self._finished_seqs:  # ends go out now rather than after the next launch (which may capture a graph)
            t0 = time.perf_counter()
            self._deliver(only_finished=True)
            self._clock["deliver"] += time.perf_counter() - t0
        return True

    def _flush(self) -> None:
        """Decodes the text deferred by the last accepted step, then delivers every event waiting."""
        t0 = time.perf_counter()
        for seq in self._unemitted:
            try:
                seq.emit_text()
            except Exception as exc:  # this request alone fails
                log.exception("request %s failed decoding its text", seq.id)
                self._finish(seq, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")
        self._unemitted.clear()
        self._deliver()
        self._clock["deliver"] += time.perf_counter() - t0

    def _admit(self) -> None:
        while self._runner.free_slots > 0 and self._scheduler.waiting:
            seq = self._scheduler.admit_next()
            assert seq is not None
            with self._cv:
                self._queued -= 1
            start = seq.request.start_state
            try:
                self._runner.admit(seq, start if isinstance(start, StateSnapshot) else None)
            except Exception as exc:
                log.exception("admitting %s failed", seq.id)
                self._finish(seq, FinishReason.ERROR, error=f"admission failed: {exc}")
                continue
            if seq.params.max_tokens == 0 and seq.fed >= seq.target:
                self._finish(seq, FinishReason.LENGTH)  # nothing to read: the prompt is its pending token

    def _add(self, seq: Sequence) -> None:
        self._scheduler.add(seq)
        if seq.request.deadline is not None:
            self._with_deadline.add(seq)

    def _expire(self) -> None:
        if not self._with_deadline:
            return
        now = time.monotonic()
        for seq in list(self._with_deadline):
            deadline = seq.request.deadline
            if deadline is not None and now >= deadline:
                self._finish(seq, FinishReason.DEADLINE)

    def _launch(self, plan: StepPlan) -> _Launched | None:
        step_start = time.monotonic()
        started = time.perf_counter()
        try:
            return _Launched(self._runner.launch(plan), step_start, started)
        except Exception as exc:  # the step is lost; its rows' states may be half-updated
            self._fail_step(plan, exc)
            return None

    def _fail_step(self, plan: StepPlan, exc: Exception) -> None:
        log.error("engine step failed (%d rows)", len(plan.rows), exc_info=exc)
        for row in plan.rows:
            if row.seq.phase is not Phase.DONE:  # not already ended while the step ran (a failure in _flush)
                self._finish(row.seq, FinishReason.ERROR, error=f"engine step failed: {type(exc).__name__}")

    def _accept(self, plan: StepPlan, launched: _Launched) -> None:
        """Reads the step's tokens (the one wait for the device) and moves every row on: read offsets, prefix
        cache, sampled tokens, finishes. Text that cannot end a row is left for _flush() when overlapping."""
        try:
            result = launched.step.result()
        except Exception as exc:
            self._fail_step(plan, exc)
            return
        step_start, started = launched.step_start, launched.started
        self.steps += 1
        self._clock["forward"] += result.forward_seconds
        self._clock["sample"] += result.sample_seconds
        post_start = time.perf_counter()
        now = time.monotonic()
        sample_rows, sampled_tokens, sampled_logprobs = (
            result.sample_rows,
            result.sampled.tokens,
            result.sampled.logprobs,
        )
        k = 0  # sample_rows is ascending: the next sampled row's place in it
        # For the observer: a few list appends per row, handed over once after the loop.
        tokens = prefill_tokens = 0
        first_tokens: list[tuple[str, float]] = []
        gaps: list[tuple[str, float]] = []
        for i, row in enumerate(plan.rows):
            seq = row.seq
            j = None
            if k < len(sample_rows) and sample_rows[k] == i:
                j, k = k, k + 1
            if seq.phase is Phase.DONE:
                continue  # ended while its step ran (its text failed to decode in _flush): nothing more of it
            try:
                tokens += row.end - row.start
                if seq.phase is Phase.PREFILL:
                    prefill_tokens += row.end - row.start
                seq.mark_read(row.end, step_start, now)
                if row.end in seq.cache_points:
                    self._runner.cache_prefix(seq)
                if j is not None:
                    last = seq.clock.last_token
                    if seq.on_token(sampled_tokens[j], sampled_logprobs[j], now, self._overlap):
                        self._unemitted.append(seq)
                    if last is None:
                        first_tokens.append((seq.api, now - seq.clock.arrival))
                    else:
                        gaps.append((seq.api, now - last))
                if seq.finish_reason is not None:
                    self._finish(seq, seq.finish_reason)
                elif seq.params.max_tokens == 0 and seq.fed >= seq.target:
                    self._finish(seq, FinishReason.LENGTH)
            except Exception as exc:  # this request alone fails
                log.exception("request %s failed after a step", seq.id)
                self._finish(seq, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")
        ended = time.perf_counter()
        if self.observer is not None:
            self.observer.on_step(
                StepSample(
                    rows=len(plan.rows),
                    prefill_tokens=prefill_tokens,
                    decode_tokens=tokens - prefill_tokens,
                    seconds=ended - started,
                    forward_seconds=result.forward_seconds,
                    sample_seconds=result.sample_seconds,
                    first_tokens=first_tokens,
                    token_gaps=gaps,
                )
            )
        self._clock["postprocess"] += time.perf_counter() - post_start  # the observer's share included

    def _abort(self, request_id: str) -> None:
        seq = self._scheduler.by_id.get(request_id)
        if seq is not None:
            self._finish(seq, FinishReason.CANCELLED)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        state: StateRef | None = None
        if seq.phase is Phase.WAITING:
            with self._cv:
                self._queued -= 1
            if seq.request.keep_state:
                state = seq.request.start_state
        elif seq.slot is not None:
            if reason is not FinishReason.ERROR:
                try:
                    if seq.request.keep_state:
                        state = self._runner.snapshot(seq)
                    self._runner.cache_prefix(seq)
                except Exception as exc:  # a device error copying the state (out of memory): this request fails
                    log.exception("request %s: keeping its state failed", seq.id)
                    state, reason, error = None, FinishReason.ERROR, f"keeping the state failed: {type(exc).__name__}"
            self._runner.release(seq)
        finished = seq.finished_event(reason, state, error)
        seq.outbox.append(finished)
        self._scheduler.remove(seq)
        self._with_deadline.discard(seq)
        self._finished_seqs.append(seq)
        with self._cv:
            self._live.discard(seq.id)
        if self.observer is not None:
            c = seq.clock
            self.observer.on_request_end(
                RequestSample(
                    request_id=seq.id,
                    api=seq.api,
                    reason=reason,
                    usage=finished.usage,
                    arrival=c.arrival,
                    prefill_start=c.prefill_start,
                    prefill_end=c.prefill_end,
                    first_token=c.first_token,
                    last_token=c.last_token,
                    end=time.monotonic(),
                    error=error,
                    origin=seq.origin,
                )
            )

    def _deliver(self, only_finished: bool = False) -> None:
        """One hand-over per outlet with the events waiting: every request's, or the finished ones' only
        (their outboxes are complete: text is never deferred past a request's end)."""
        batches: dict[Outlet, list[tuple[Sink, list[TokenEvent]]]] = {}
        interval = self._config.stream_interval
        running = () if only_finished else self._scheduler.running
        for seq in (*running, *self._finished_seqs):
            if seq.outbox:
                events = seq.take_events(interval)
                if events:
                    batches.setdefault(seq.sink.outlet, []).append((seq.sink, events))
        self._finished_seqs.clear()
        for outlet, items in batches.items():
            outlet.send(items)


@dataclass(frozen=True)
class _Launched:
    step: LaunchedStep
    step_start: float  # monotonic, for request clocks
    started: float  # perf_counter, for the step's duration
