"""Server configuration: frozen dataclasses built once from CLI flags and RWKVD_* environment variables.

Precedence: flag, then environment variable, then default. Every option is listed once in OPTIONS,
which builds both the argparse flags and the environment lookup, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.engine.config import EngineConfig


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    grpc_port: int = 50051
    http_port: int = 8000  # 0 = any free port; -1 = no HTTP listener
    data_dir: str = "./data"
    api_keys: tuple[str, ...] = ()
    # SIGTERM: readiness goes NOT_SERVING, then after drain_seconds the servers stop taking calls and
    # give in-flight ones grace_seconds to finish.
    drain_seconds: float = 5.0
    grace_seconds: float = 30.0
    log_level: str = "info"
    log_format: str = "text"  # text | json
    # OpenTelemetry tracing (also on when OTEL_TRACES_EXPORTER is set); exporter settings from OTEL_* variables.
    otel: bool = False
    # Largest gRPC message sent (ExportSession returns a whole state); received ones: max_request_bytes.
    grpc_max_message_bytes: int = 64 * 1024 * 1024
    grpc_keepalive_seconds: float = 30.0
    grpc_max_concurrent_rpcs: int = 10_000
    # Close connections after this long (balances long-lived HTTP/2 connections); 0 = never.
    grpc_max_connection_age_seconds: float = 0.0
    # Temporary tasks kept in memory (least recently used beyond are dropped; their ids say so).
    max_temporary_tasks: int = 256
    # Chat sessions kept (idle ones beyond are dropped, oldest first) and how long an idle one lives.
    max_sessions: int = 256
    session_idle_seconds: float = 1800.0
    # Base of the absolute URLs in prediction objects (urls.get/stream/cancel); None = the request's host.
    public_url: str | None = None
    # TLS on both ports when cert and key (PEM files) are given; a client CA also requires client certificates.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # Largest request accepted: an HTTP body (413 beyond) and a received gRPC message (RESOURCE_EXHAUSTED).
    # 64 MiB because ImportSession carries a whole RNN state (a 7.2B model's fp32 state is ~35 MB).
    max_request_bytes: int = 64 * 1024 * 1024
    # HTTP requests handled at once (streams included; health and metrics exempt); beyond: 429 + Retry-After.
    http_max_concurrency: int = 4096
    # Run the engine in a process of its own (service/engine/remote.py): the front ends' event loop and the
    # step loop then stop sharing one GIL, which caps streamed tokens per second under many streams.
    # auto = on when the engine runs on a CUDA device (on a CPU the engine's own threads want the cores).
    engine_process: str = "auto"  # auto | on | off
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        problems = []
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not -1 <= port <= 65535:
                problems.append(f"{name} must be in [-1, 65535]")
        if self.grpc_port == -1:
            problems.append("grpc_port cannot be disabled")
        if self.drain_seconds < 0 or self.grace_seconds < 0:
            problems.append("drain_seconds and grace_seconds must be >= 0")
        if self.log_format not in ("text", "json"):
            problems.append("log_format must be text or json")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            problems.append("log_level must be debug, info, warning or error")
        if self.max_temporary_tasks < 1 or self.max_sessions < 1:
            problems.append("max_temporary_tasks and max_sessions must be at least 1")
        if self.session_idle_seconds <= 0:
            problems.append("session_idle_seconds must be positive")
        if any(not k for k in self.api_keys):
            problems.append("api keys must not be empty")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("tls_client_ca needs tls_cert and tls_key")
        if self.max_request_bytes < 1024 or self.http_max_concurrency < 1 or self.grpc_max_concurrent_rpcs < 1:
            problems.append("max_request_bytes must be >= 1024, http_max_concurrency and grpc_max_concurrent_rpcs >= 1")
        if self.engine_process not in ("auto", "on", "off"):
            problems.append(f"engine_process must be auto, on or off, not {self.engine_process!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def engine_process_on(self, cuda_available: bool) -> bool:
        """Whether the engine runs in a process of its own (see `engine_process`)."""
        if self.engine_process != "auto":
            return self.engine_process == "on"
        device = self.engine.device
        return device.startswith("cuda") or (device == "auto" and cuda_available)


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("", "none") else int(text)


def _optional_str(text: str) -> str | None:
    return text or None


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    return value in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class _Option:
    flag: str
    target: str  # "field" of ServerConfig or "engine.field" of EngineConfig
    parse: Callable[[str], Any]
    help: str

    @property
    def env(self) -> str:
        return "RWKVD_" + self.flag.lstrip("-").replace("-", "_").upper()


OPTIONS: tuple[_Option, ...] = (
    _Option("--model", "engine.model_path", _optional_str, "checkpoint (.pth/.safetensors); default: built-in demo"),
    _Option("--model-id", "engine.model_id", _optional_str, 'model id "owner/name" (default local/<file stem>)'),
    _Option("--host", "host", str, "address to listen on"),
    _Option("--grpc-port", "grpc_port", int, "gRPC port (0 = any free port)"),
    _Option("--http-port", "http_port", int, "HTTP port (0 = any free port, -1 = none)"),
    _Option("--data-dir", "data_dir", str, "directory for the task/prediction store and saved states"),
    _Option("--backend", "engine.backend", str, "engine backend: auto, torch or triton"),
    _Option("--device", "engine.device", str, "auto, cpu, cuda or cuda:N"),
    _Option("--dtype", "engine.dtype", str, "weight dtype: auto, float32, float16, bfloat16"),
    _Option(
        "--state-dtype",
        "engine.state_dtype",
        str,
        "WKV state storage: float32 (default), float16 or bfloat16 (half the state memory, fp32 math)",
    ),
    _Option("--max-batch-size", "engine.max_batch_size", int, "sequences running at once (state slots)"),
    _Option("--max-batch-tokens", "engine.max_batch_tokens", int, "tokens read per engine step"),
    _Option("--prefill-chunk", "engine.prefill_chunk", int, "prompt tokens of one request read per step"),
    _Option("--max-queued", "engine.max_queued", int, "requests waiting for a slot before refusing more"),
    _Option("--max-prompt-tokens", "engine.max_prompt_tokens", int, "longest prompt accepted, in tokens"),
    _Option("--max-new-tokens", "engine.max_new_tokens", int, "largest max_tokens a request may ask for"),
    _Option("--prefix-cache-entries", "engine.prefix_cache_entries", int, "prefix-state cache entries (0 = off)"),
    _Option("--threads", "engine.threads", _optional_int, "torch CPU threads"),
    _Option("--cuda-graphs", "engine.cuda_graphs", str, "CUDA graphs for decode steps: auto (on with CUDA), on, off"),
    _Option(
        "--stream-interval",
        "engine.stream_interval",
        int,
        "hand a stream its tokens every N tokens (first token and end at once); 1 = every token",
    ),
    _Option(
        "--overlap",
        "engine.overlap",
        str,
        "decode text and deliver events while the device runs the next step: auto (on with CUDA), on, off",
    ),
    _Option(
        "--engine-process",
        "engine_process",
        str,
        "the engine in a process of its own beside the front ends (more streamed tokens/s under many streams):"
        " auto (on with CUDA), on, off",
    ),
    _Option("--max-temporary-tasks", "max_temporary_tasks", int, "temporary tasks kept in memory (LRU)"),
    _Option("--public-url", "public_url", _optional_str, "base URL clients reach this server at (prediction urls)"),
    _Option("--max-sessions", "max_sessions", int, "chat sessions kept in memory"),
    _Option("--session-idle-seconds", "session_idle_seconds", float, "an unused chat session is dropped after this"),
    _Option("--drain-seconds", "drain_seconds", float, "on SIGTERM: not-ready this long before stopping"),
    _Option("--grace-seconds", "grace_seconds", float, "on SIGTERM: time in-flight calls get to finish"),
    _Option("--log-level", "log_level", str, "debug, info, warning or error"),
    _Option("--log-format", "log_format", str, "text or json"),
    _Option("--otel", "otel", _bool, "OpenTelemetry tracing: true or false (exporter from OTEL_* variables)"),
    _Option("--tls-cert", "tls_cert", _optional_str, "PEM certificate (chain): TLS on both ports, with --tls-key"),
    _Option("--tls-key", "tls_key", _optional_str, "PEM private key of --tls-cert"),
    _Option("--tls-client-ca", "tls_client_ca", _optional_str, "PEM CA bundle: require client certificates (mTLS)"),
    _Option("--max-request-bytes", "max_request_bytes", int, "largest HTTP body / received gRPC message"),
    _Option("--http-max-concurrency", "http_max_concurrency", int, "HTTP requests at once; beyond: 429"),
    _Option(
        "--grpc-max-concurrent-rpcs", "grpc_max_concurrent_rpcs", int, "gRPC calls at once; beyond: RESOURCE_EXHAUSTED"
    ),
)


def parse_serve_args(argv: Sequence[str], environ: Mapping[str, str]) -> ServerConfig:
    """`rwkvd serve` flags over RWKVD_* variables over defaults."""
    parser = argparse.ArgumentParser(prog="rwkvd serve", description="Serve an RWKV-7 model over gRPC and HTTP.")
    for opt in OPTIONS:
        parser.add_argument(opt.flag, dest=opt.target, type=opt.parse, default=None, help=f"{opt.help} [{opt.env}]")
    parser.add_argument(
        "--api-key", dest="api_keys", action="append", default=None, help="bearer token; repeatable [RWKVD_API_KEYS]"
    )
    parser.add_argument(
        "--model-alias",
        dest="aliases",
        action="append",
        default=None,
        help="another name clients may use for the model, e.g. gpt-3.5-turbo; repeatable [RWKVD_MODEL_ALIASES]",
    )
    parser.add_argument("--api-key-file", default=None, help="file with one bearer token per line [RWKVD_API_KEY_FILE]")
    args = vars(parser.parse_args(list(argv)))

    values: dict[str, Any] = {}
    for opt in OPTIONS:
        value = args[opt.target]
        if value is None and opt.env in environ:
            try:
                value = opt.parse(environ[opt.env])
            except ValueError as exc:
                parser.error(f"{opt.env}={environ[opt.env]!r}: {exc}")
        if value is not None:
            values[opt.target] = value
    keys = list(args["api_keys"] or [k for k in environ.get("RWKVD_API_KEYS", "").split(",") if k.strip()])
    key_file = args["api_key_file"] or environ.get("RWKVD_API_KEY_FILE")
    if key_file:
        keys += [line.strip() for line in Path(key_file).read_text().splitlines() if line.strip()]
    if keys:
        values["api_keys"] = tuple(k.strip() for k in keys)
    aliases = args["aliases"] or [a for a in environ.get("RWKVD_MODEL_ALIASES", "").split(",") if a.strip()]
    if aliases:
        values["engine.model_aliases"] = tuple(a.strip() for a in aliases)
    return build_config(values)


def build_config(values: Mapping[str, Any]) -> ServerConfig:
    """A ServerConfig from {"field": v, "engine.field": v}; unknown keys are an error."""
    engine = {k.removeprefix("engine."): v for k, v in values.items() if k.startswith("engine.")}
    server = {k: v for k, v in values.items() if not k.startswith("engine.")}
    known = {f.name for f in dataclasses.fields(ServerConfig)}
    unknown = set(server) - known
    if unknown:
        raise ValueError(f"unknown settings: {sorted(unknown)}")
    return ServerConfig(**server, engine=EngineConfig(**engine))
