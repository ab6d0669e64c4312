"""The in-process EngineClient: async generators over the engine thread, and building it from config.

Each generate() call gets an asyncio queue that the engine thread fills once per step; under load
several deltas are waiting and are merged into one (fewer, larger messages for the front ends).
Leaving the iterator before the end aborts the request, so a vanished client frees its slot at the
next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar, cast

import torch

from .backend import ModelBackend
from .checkpoint import Checkpoint, load_checkpoint, validate_state_dict
from .config import EngineConfig
from .cuda_graphs import graphs_enabled
from .engine import Engine
from .generator import DEMO_SEED, demo_shape, generate_state_dict, state_dict_sha256
from .model import TorchRwkv7
from .observer import EngineObserver, ObserverGroup, request_api
from .prefix_cache import PrefixCache
from .protocol import (
    Delta,
    EngineStats,
    Finished,
    GenerationRequest,
    ModelInfo,
    StateRef,
    TokenEvent,
    foreign_state,
)
from .runner import Runner
from .sequence import Sink
from .snapshot import StateSnapshot, from_bytes, to_bytes
from .tokenizer import WorldTokenizer

log = logging.getLogger("rwkvd.engine")
T = TypeVar("T")
DEMO_MODEL_ID = "local/rwkv7-demo"


class LoopOutlet:
    """Hands a step's events to the consumers on one event loop: a single callback per step."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def send(self, batch: list[tuple[Sink, list[TokenEvent]]]) -> None:
        with contextlib.suppress(RuntimeError):  # that loop is closed: its consumers are gone
            self.loop.call_soon_threadsafe(_deliver_all, batch)


def _deliver_all(batch: list[tuple[Sink, list[TokenEvent]]]) -> None:
    for sink, events in batch:
        cast(QueueSink, sink).deliver(events)  # a LoopOutlet's sinks are QueueSinks


# One outlet per event loop, so that a step's events for all of a loop's requests go in one callback.
_outlets: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopOutlet] = weakref.WeakKeyDictionary()


def loop_outlet(loop: asyncio.AbstractEventLoop) -> LoopOutlet:
    outlet = _outlets.get(loop)
    if outlet is None:
        outlet = _outlets[loop] = LoopOutlet(loop)
    return outlet


class QueueSink:
    """One request's events, queued on the event loop of its consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.outlet = loop_outlet(loop)
        self.queue: asyncio.Queue[list[TokenEvent]] = asyncio.Queue()

    def deliver(self, events: list[TokenEvent]) -> None:
        self.queue.put_nowait(events)


def coalesce(events: list[TokenEvent]) -> list[TokenEvent]:
    """Merges runs of consecutive deltas into one delta each (order and content kept)."""
    out: list[TokenEvent] = []
    for ev in events:
        last = out[-1] if out else None
        if isinstance(ev, Delta) and isinstance(last, Delta) and last.offset + len(last.token_ids) == ev.offset:
            out[-1] = Delta(
                ev.request_id,
                last.offset,
                last.token_ids + ev.token_ids,
                last.text + ev.text,
                last.logprobs + ev.logprobs,
            )
        else:
            out.append(ev)
    return out


class EventStream:
    """One request's events, merged per read; aborts the request if closed or dropped before the end."""

    def __init__(self, abort: Callable[[str], None], sink: QueueSink, request_id: str) -> None:
        self._abort = abort
        self._sink = sink
        self._request_id = request_id
        self._ready: deque[TokenEvent] = deque()
        self._finished = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if not self._ready:
            if self._finished:
                raise StopAsyncIteration
            batch = await self._sink.queue.get()
            while not self._sink.queue.empty():
                batch.extend(self._sink.queue.get_nowait())
            self._ready.extend(coalesce(batch))
        event = self._ready.popleft()
        if isinstance(event, Finished):
            self._finished = True
        return event

    async def aclose(self) -> None:
        self._abandon()

    def _abandon(self) -> None:
        if not self._finished:
            self._finished = True
            self._ready.clear()
            self._abort(self._request_id)

    def __del__(self) -> None:
        # A consumer cancelled mid-iteration (a client that went away) drops its stream: free the slot.
        self._abandon()


class LocalEngineClient:
    def __init__(self, engine: Engine, tokenizer: WorldTokenizer, model: ModelInfo, runner: Runner) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self._model = model
        self._runner = runner

    @property
    def model(self) -> ModelInfo:
        return self._model

    @property
    def tokenizer(self) -> WorldTokenizer:
        return self._tokenizer

    def generate(self, request: GenerationRequest) -> EventStream:
        sink = QueueSink(asyncio.get_running_loop())
        # raises here, before the caller has started anything; the API label comes from the caller's context
        self._engine.submit(request, sink, request_api.get())
        return EventStream(self._engine.abort, sink, request.request_id)

    def check(self, request: GenerationRequest) -> None:
        self._engine.validate(request)

    async def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

    async def snapshot(self, request_id: str) -> StateRef:
        return await asyncio.wrap_future(self.call_later(lambda: self.snapshot_now(request_id)))

    async def export_state(self, state: StateRef) -> bytes:
        return await asyncio.wrap_future(self.call_later(lambda: self.export_now(state)))

    async def import_state(self, data: bytes) -> StateRef:
        # Parsing and device copies run in the engine thread, off the event loop and between steps.
        return await asyncio.wrap_future(self.call_later(lambda: self.import_now(data)))

    # For callers without an event loop (the engine process's host): submission with a sink of their own,
    # aborting, and work in the engine thread. The *_now methods run in the engine thread only.

    def submit(self, request: GenerationRequest, sink: Sink, api: str) -> None:
        self._engine.submit(request, sink, api)

    def abort_nowait(self, request_id: str) -> None:
        """The request ends at the next step."""
        self._engine.abort(request_id)

    def call_later(self, fn: Callable[[], T]) -> Future[T]:
        """Runs fn in the engine thread between steps."""
        return self._engine.call(fn)

    def snapshot_now(self, request_id: str) -> StateSnapshot:
        return self._engine.snapshot_of(request_id)

    def export_now(self, state: StateRef) -> bytes:
        if not isinstance(state, StateSnapshot) or state.model_version != self._model.version:
            raise foreign_state()
        return to_bytes(state)

    def import_now(self, data: bytes) -> StateSnapshot:
        """A state from its bytes; one saved under another --dtype or --state-dtype is converted (from_bytes)."""
        model, pool = self._runner.model, self._runner.pool
        return from_bytes(
            data,
            model_version=self._model.version,
            shape=model.shape,
            device=model.device,
            dtype=model.dtype,
            state_dtype=pool.state_dtype,
        )

    def step_clock(self) -> dict[str, float]:
        """Cumulative seconds the engine thread spent per phase of its steps, and the step count."""
        return self._engine.step_clock()

    def stats(self) -> EngineStats:
        return self._engine.stats()

    def observe(self, observer: EngineObserver) -> None:
        """Reports steps and request ends to `observer` from now on (set it before serving).

        Always through an ObserverGroup, which contains an observer's errors: the engine thread calls
        the observer unguarded."""
        self._engine.observer = ObserverGroup.guarding(observer)

    def device_memory(self) -> dict[str, int]:
        """Bytes of device memory (allocated, reserved by torch's allocator, total) on CUDA; empty elsewhere."""
        device = self._runner.device
        if device.type != "cuda":
            return {}
        # Allocator counters are host-side reads: no sync with the engine thread's stream.
        return {
            "allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device),
            "total": torch.cuda.get_device_properties(device).total_memory,
        }

    def run(self) -> None:
        """The engine's step loop (build_engine runs it in the engine thread)."""
        self._engine.run()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._engine.shutdown(timeout)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype setting (--dtype, --state-dtype) as a torch dtype; "auto" is fp16 on CUDA, else fp32."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_weights(config: EngineConfig) -> tuple[Checkpoint, str, bool]:
    """The checkpoint to serve, its model id, and whether it is the built-in demo."""
    if config.model_path is None:
        tensors = generate_state_dict(demo_shape(), seed=DEMO_SEED, dtype=torch.float32)
        ckpt = validate_state_dict(tensors, source="built-in demo", sha256=state_dict_sha256(tensors))
        log.warning("serving the built-in DEMO model: random weights, its text is noise (use --model PATH)")
        return ckpt, config.model_id or DEMO_MODEL_ID, True
    ckpt = load_checkpoint(config.model_path)
    stem = Path(config.model_path).stem.replace("/", "-")
    return ckpt, config.model_id or f"local/{stem}", False


def build_backend(config: EngineConfig, ckpt: Checkpoint) -> ModelBackend:
    """torch anywhere; triton on CUDA (the default there), or on a CPU under TRITON_INTERPRET=1 (tests)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if config.backend == "triton" or (config.backend == "auto" and device.type == "cuda"):
        if device.type != "cuda" and not interpreted:
            raise ValueError("the triton backend needs a CUDA device (or TRITON_INTERPRET=1 to test it on a CPU)")
        from .triton_backend import TritonRwkv7  # imported only when used: triton is a GPU dependency

        return TritonRwkv7(ckpt, device, dtype)
    return TorchRwkv7(ckpt, device, dtype)


def build_engine(config: EngineConfig, load: Callable[[], Checkpoint] | None = None) -> LocalEngineClient:
    """Starts the engine thread, which loads the model and then runs steps; returns once it is ready.

    `load` supplies the weights instead of config.model_path (benchmarks generate them in memory).
    Every torch operation of the engine runs in that one thread, loading included: with libgomp, a
    second live thread that has run parallel ops makes each parallel region of the engine thread cost
    ~80 us instead of ~5 us on a small machine (measured), which slows a step's many small ops ~4x.
    """
    ready: Future[LocalEngineClient] = Future()

    def engine_thread() -> None:
        try:
            client = _assemble(config, load)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(client)
        client.run()

    threading.Thread(target=engine_thread, name="rwkvd-engine", daemon=True).start()
    return ready.result()


def _assemble(config: EngineConfig, load: Callable[[], Checkpoint] | None) -> LocalEngineClient:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    started = time.time()
    if load is not None:
        ckpt = load()
        ckpt_id, demo = config.model_id or "local/" + Path(ckpt.source).stem.replace(" ", "-"), False
    else:
        ckpt, ckpt_id, demo = load_weights(config)
    backend = build_backend(config, ckpt)
    tokenizer = WorldTokenizer()
    if backend.shape.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"vocabulary of {backend.shape.vocab_size} tokens; rwkvd needs the World vocabulary (65536)")
    runner = Runner(
        backend,
        config.max_batch_size,
        ckpt.sha256,
        PrefixCache(config.prefix_cache_entries, config.prefix_cache_min_tokens),
        cuda_graphs=graphs_enabled(config.cuda_graphs, backend.device),
        state_dtype=resolve_dtype(config.state_dtype, backend.device),
    )
    engine = Engine(runner, tokenizer, config)
    s = ckpt.shape
    info = ModelInfo(
        id=ckpt_id,
        version=ckpt.sha256,
        architecture="rwkv7",
        n_layer=s.n_layer,
        n_embd=s.n_embd,
        n_head=s.n_head,
        head_size=s.head_size,
        vocab_size=s.vocab_size,
        ffn_dim=s.ffn_dim,
        lora=(s.decay_lora, s.aaa_lora, s.mv_lora, s.gate_lora),
        parameter_count=ckpt.parameter_count,
        checkpoint_dtype=ckpt.dtype_name,
        dtype=str(backend.dtype).removeprefix("torch."),
        state_dtype=str(runner.pool.state_dtype).removeprefix("torch."),
        backend=backend.name,
        device=str(backend.device),
        demo=demo,
        source=ckpt.source,
        load_time=started,
        max_batch_size=config.max_batch_size,
        aliases=config.model_aliases,
    )
    log.info(
        "model %s (%s, L%d C%d, %.1fM params, %s, %s WKV state) on %s/%s ready in %.1fs",
        ckpt_id,
        ckpt.sha256[:12],
        s.n_layer,
        s.n_embd,
        ckpt.parameter_count / 1e6,
        info.dtype,
        info.state_dtype,
        backend.name,
        backend.device,
        time.time() - started,
    )
    return LocalEngineClient(engine, tokenizer, info, runner)
