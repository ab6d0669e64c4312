"""Serving benchmark: streams over gRPC (the typed client) or HTTP (OpenAI SSE), like vLLM's benchmark_serving.

Sends --num-prompts streamed completions of random token-id prompts (--input-tokens long, distinct, so the
prefix cache never helps) that generate exactly --output-tokens each (ignore_eos), at a fixed concurrency
or at a Poisson request rate, for each value of the sweep. Per point: TTFT, TPOT (excluding the first
token), ITL (gaps between streamed messages) and E2EL mean / median / p90 / p99 in ms, output tok/s and
request/s; and, when the server process is on this machine, its CPU seconds per streamed token split into
the front end (the event-loop thread, where gRPC, HTTP, SSE framing and the domain layer run, plus gRPC's
own threads) and the rest (the engine thread and torch's workers), read from /proc/<pid>/task/*/stat.

Target: a server it starts itself (`python -m service serve` on free loopback ports, the built-in demo
model unless --server-args names one), or a running one (--grpc-target / --http-url, with --server-pid
for its CPU). Writes bench/results/serve-<protocol>-<device>-<date>.json (device, commit, date, conditions).

    python bench/serve.py --protocol grpc --concurrency 1,8,32
    python bench/serve.py --protocol http --request-rate 4,16,inf --num-prompts 128
    python bench/serve.py --protocol http --server-args "--model /m/2.9b.pth --max-batch-size 256" \\
        --concurrency 256 --num-prompts 1024 --output-tokens 256 --engine-baseline bench/results/engine-2.9b-....json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import multiprocessing
import os
import random
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rwkvd

from bench.engine import git_commit

RESULTS = Path(__file__).resolve().parent / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FRONT_END_THREADS = ("grpc", "event_engine", "lifeguard")  # gRPC core's own threads, by their OS names
WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "an")


@dataclass
class Outcome:
    """One request as the client saw it (times in seconds from its send)."""

    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2el: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)  # gaps between token-bearing messages after the first


@dataclass(frozen=True)
class Target:
    protocol: str  # grpc | http
    endpoint: str  # completions | chat
    grpc_target: str
    http_url: str
    api_key: str | None
    model: str


# One request per protocol and endpoint: each yields (seconds since send, tokens in the message or -1 when
# unknown) per token-bearing message, and returns (prompt tokens, completion tokens) from the usage.


async def grpc_stream(
    client: rwkvd.AsyncClient, target: Target, prompt: list[int], text: str, args: argparse.Namespace, out: Outcome
) -> AsyncIterator[int]:
    sampling: dict[str, Any] = {"max_tokens": args.output_tokens, "ignore_eos": True, "temperature": args.temperature}
    if target.endpoint == "completions":
        async for event in client.complete_stream(prompt, **sampling):
            if event.HasField("delta") and event.delta.token_ids:
                yield len(event.delta.token_ids)
            elif event.HasField("finished"):
                out.prompt_tokens = event.finished.usage.prompt_tokens
                out.output_tokens = event.finished.usage.completion_tokens
    else:
        async for message in client.complete_chat_stream([("user", text)], **sampling):
            tokens = sum(len(c.delta.token_ids) for c in message.choices)
            if tokens:
                yield tokens
            if message.HasField("usage"):
                out.prompt_tokens = message.usage.prompt_tokens
                out.output_tokens = message.usage.completion_tokens


async def http_stream(
    http: httpx.AsyncClient, target: Target, prompt: list[int], text: str, args: argparse.Namespace, out: Outcome
) -> AsyncIterator[int]:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": args.output_tokens,
        "temperature": args.temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.endpoint == "completions":
        path, body["prompt"] = "/v1/completions", prompt
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("error"):
                raise RuntimeError(str(chunk["error"])[:200])
            for choice in chunk.get("choices", ()):
                content = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if content:
                    yield -1  # SSE chunks carry text, not token counts: the usage has the total
            if chunk.get("usage"):
                out.prompt_tokens = chunk["usage"]["prompt_tokens"]
                out.output_tokens = chunk["usage"]["completion_tokens"]


async def one_request(
    conn: rwkvd.AsyncClient | httpx.AsyncClient, target: Target, prompt: list[int], text: str, args: argparse.Namespace
) -> Outcome:
    out = Outcome()
    start = time.perf_counter()
    last = start
    try:
        if isinstance(conn, rwkvd.AsyncClient):
            messages = grpc_stream(conn, target, prompt, text, args, out)
        else:
            messages = http_stream(conn, target, prompt, text, args, out)
        async for _ in messages:
            now = time.perf_counter()
            if out.ttft == 0.0:
                out.ttft = now - start
            else:
                out.itl.append(now - last)
            last = now
        out.e2el = time.perf_counter() - start
        out.ok = out.ttft > 0 and out.output_tokens > 0
        if not out.ok:
            out.error = "no tokens streamed"
    except (rwkvd.RwkvdError, httpx.HTTPError, RuntimeError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    return out


# Load shapes


def prompts(n: int, length: int, seed: int) -> list[tuple[list[int], str]]:
    """n distinct random prompts: token ids (completions) and words (chat) of about `length` tokens."""
    rng = random.Random(seed)
    return [
        ([rng.randrange(1000, 60000) for _ in range(length)], " ".join(rng.choice(WORDS) for _ in range(length)))
        for _ in range(n)
    ]


async def run_point(
    conn: rwkvd.AsyncClient | httpx.AsyncClient,
    target: Target,
    work: list[tuple[list[int], str]],
    args: argparse.Namespace,
    concurrency: int | None,
    rate: float,
) -> tuple[list[Outcome], float]:
    """Runs every prompt: at most `concurrency` at once, arriving as a Poisson process of `rate` per second."""
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    rng = random.Random(args.seed + 1)

    async def guarded(prompt: list[int], text: str) -> Outcome:
        async with gate if gate is not None else contextlib.nullcontext():
            return await one_request(conn, target, prompt, text, args)

    start = time.perf_counter()
    tasks = []
    for prompt, text in work:
        tasks.append(asyncio.create_task(guarded(prompt, text)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    outcomes = await asyncio.gather(*tasks)
    return list(outcomes), time.perf_counter() - start


@contextlib.asynccontextmanager
async def connection(target: Target) -> AsyncIterator[rwkvd.AsyncClient | httpx.AsyncClient]:
    """One client connection (a gRPC channel, or an httpx pool without a connection limit)."""
    if target.protocol == "grpc":
        async with rwkvd.AsyncClient(target.grpc_target, api_key=target.api_key) as client:
            yield client
    else:
        headers = {"authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=target.http_url, headers=headers, timeout=None, limits=limits) as http:
            yield http


# Client processes: one asyncio client tops out near 10-20k streamed messages/s (its own CPU per message is
# of the server's order), so loads beyond that are spread over processes, each with its own connection.

_start_barrier: Any = None  # a multiprocessing barrier, set in each worker by its initializer


def _worker_init(barrier: Any) -> None:
    global _start_barrier
    _start_barrier = barrier


def _worker_point(
    target: Target,
    work: list[tuple[list[int], str]],
    warm: list[tuple[list[int], str]],
    args: argparse.Namespace,
    concurrency: int | None,
    rate: float,
) -> tuple[list[Outcome], float, float, float]:
    """One process's share of a point: warm up, wait for the others, run. (outcomes, start, end, CPU seconds)."""

    async def run() -> tuple[list[Outcome], float, float, float]:
        async with connection(target) as conn:
            if warm:
                await run_point(conn, target, warm, args, concurrency, math.inf)
            await asyncio.to_thread(_start_barrier.wait)
            cpu = client_cpu_seconds()
            start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the host
            outcomes, _ = await run_point(conn, target, work, args, concurrency, rate)
            return outcomes, start, time.monotonic(), client_cpu_seconds() - cpu

    return asyncio.run(run())


def split(total: int | None, parts: int) -> list[int | None]:
    """`total` requests in flight spread over `parts` processes (None: no limit anywhere)."""
    if total is None:
        return [None] * parts
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def run_point_in_processes(
    pool: ProcessPoolExecutor,
    barrier: Any,
    server_pid: int | None,
    target: Target,
    work: list[tuple[list[int], str]],
    warm: list[tuple[list[int], str]],
    args: argparse.Namespace,
    concurrency: int | None,
    rate: float,
) -> tuple[list[Outcome], float, float, dict[str, float] | None]:
    """The point over args.client_processes processes: prompts dealt round-robin, concurrency and rate split
    (a sum of Poisson processes is one). This process is the barrier's last party: the server's CPU is read
    as the workers, warmed up, start. Returns (outcomes, seconds from the common start, client CPU, server
    CPU at the start)."""
    n = args.client_processes
    loop = asyncio.get_running_loop()
    shares = split(concurrency, n)
    futures = [
        loop.run_in_executor(pool, _worker_point, target, work[i::n], warm[i::n], args, shares[i], rate / n)
        for i in range(n)
    ]
    await asyncio.to_thread(barrier.wait)
    server_cpu = thread_cpu(server_pid) if server_pid else None
    parts = await asyncio.gather(*futures)
    outcomes = [o for part in parts for o in part[0]]
    duration = max(p[2] for p in parts) - min(p[1] for p in parts)
    return outcomes, duration, sum(p[3] for p in parts), server_cpu


# Measurements


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a server by role: the main (event-loop) thread, gRPC core threads, the rest of the
    process, and its child processes (the engine process of --engine-process)."""
    split = {"loop": 0.0, "grpc_core": 0.0, "other": 0.0, "engine_process": 0.0}
    for tid, name, seconds in _threads(pid):
        role = "loop" if tid == pid else "grpc_core" if name.startswith(FRONT_END_THREADS) else "other"
        split[role] += seconds
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            split["engine_process"] += sum(seconds for _, _, seconds in _threads(int(child)))
    return split


def _threads(pid: int) -> list[tuple[int, str, float]]:
    """(thread id, name, CPU seconds) of each thread of a process."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        out.append((int(task.name), name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS))  # utime, stime
    return out


def summary(values: Sequence[float]) -> dict[str, float]:
    """mean / median / p90 / p99 in milliseconds (vLLM's percentile convention: linear interpolation)."""
    if not values:
        return {"mean": math.nan, "median": math.nan, "p90": math.nan, "p99": math.nan}
    ordered = sorted(values)

    def pct(q: float) -> float:
        k = (len(ordered) - 1) * q
        lo, hi = math.floor(k), math.ceil(k)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {
        k: round(v * 1000, 3)
        for k, v in {"mean": statistics.fmean(ordered), "median": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}.items()
    }


def point_result(
    outcomes: list[Outcome],
    duration: float,
    server_cpu: dict[str, float] | None,
    client_cpu: float,
    concurrency: int | None,
    rate: float,
) -> dict[str, Any]:
    done = [o for o in outcomes if o.ok]
    tokens = sum(o.output_tokens for o in done)
    result: dict[str, Any] = {
        "concurrency": concurrency,
        "request_rate": rate if math.isfinite(rate) else "inf",
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "errors": sorted({o.error for o in outcomes if not o.ok})[:5],
        "duration_s": round(duration, 3),
        "input_tokens": sum(o.prompt_tokens for o in done),
        "output_tokens": tokens,
        "request_throughput": round(len(done) / duration, 3),
        "output_throughput": round(tokens / duration, 2),
        "ttft_ms": summary([o.ttft for o in done]),
        "tpot_ms": summary([(o.e2el - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]),
        "itl_ms": summary([gap for o in done for gap in o.itl]),
        "e2el_ms": summary([o.e2el for o in done]),
        "client_cpu_us_per_token": round(client_cpu / max(tokens, 1) * 1e6, 2),
    }
    if server_cpu is not None:
        front_end = server_cpu["loop"] + server_cpu["grpc_core"]
        result["server_cpu_s"] = {k: round(v, 2) for k, v in server_cpu.items()}
        result["server_cpu_us_per_token"] = round(sum(server_cpu.values()) / max(tokens, 1) * 1e6, 2)
        result["front_end_cpu_us_per_token"] = round(front_end / max(tokens, 1) * 1e6, 2)
        engine = server_cpu["other"] + server_cpu["engine_process"]
        result["engine_cpu_us_per_token"] = round(engine / max(tokens, 1) * 1e6, 2)
    return result


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# The server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def started_server(
    server_args: list[str], log_path: Path, simulate_device_ms: float | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """`python -m service serve` on free loopback ports; (process, gRPC port, HTTP port) once ready. With
    `simulate_device_ms`, through bench/simulated_device.py: every engine step takes that long, no model runs."""
    grpc_port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="rwkvd-bench-") as data, log_path.open("wb") as log:
        launcher = ["-m", "service"]
        if simulate_device_ms is not None:
            launcher = ["-m", "bench.simulated_device", "--step-ms", str(simulate_device_ms), "--"]
        command = [sys.executable, *launcher, "serve", "--host", "127.0.0.1", "--grpc-port", str(grpc_port)]
        command += ["--http-port", str(http_port), "--data-dir", data, "--drain-seconds", "0", *server_args]
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 600
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited ({process.returncode}); see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{http_port}/health/ready", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server was not ready in 600 s; see {log_path}")
                time.sleep(0.2)
            yield process, grpc_port, http_port
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def engine_baseline(path: Path | None) -> dict[int, float]:
    """Decode tok/s per batch size from a bench/engine.py result, to compare serving throughput against."""
    if path is None:
        return {}
    return {int(d["batch"]): float(d["tokens_per_second"]) for d in json.loads(path.read_text())["decode"]}


def device_of(server_args: list[str], given: str | None) -> tuple[str, str]:
    """(short device for the file name, description) of the server the benchmark started."""
    if given:
        return given, given
    from bench.engine import device_name
    from service.engine.local import resolve_device

    flags = dict(zip(server_args[::2], server_args[1::2], strict=False))
    device = resolve_device(flags.get("--device", os.environ.get("RWKVD_DEVICE", "auto")))
    if device.type == "cuda":
        return device.type, device_name(device)
    # Not device_name(): it counts this process's torch threads; the server's are in its flags (--threads).
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return "cpu", f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return "cpu", f"cpu ({os.cpu_count()} cores)"


# Main


async def measure(args: argparse.Namespace, target: Target, server_pid: int | None) -> list[dict[str, Any]]:
    baseline = engine_baseline(args.engine_baseline)
    points: list[tuple[int | None, float]]
    if args.request_rate:
        points = [(args.max_concurrency, float(r)) for r in args.request_rate.split(",")]
    else:
        points = [(int(c), math.inf) for c in args.concurrency.split(",")]
    results = []
    async with contextlib.AsyncExitStack() as stack:
        conn: rwkvd.AsyncClient | httpx.AsyncClient | None = None
        pool: ProcessPoolExecutor | None = None
        barrier: Any = None
        if args.client_processes > 1:
            # spawn, not fork: the workers must not inherit this process's gRPC or asyncio state
            context = multiprocessing.get_context("spawn")
            barrier = context.Barrier(args.client_processes + 1)  # the workers and this process
            pool = stack.enter_context(
                ProcessPoolExecutor(args.client_processes, context, initializer=_worker_init, initargs=(barrier,))
            )
        else:
            conn = await stack.enter_async_context(connection(target))
        for concurrency, rate in points:
            work = prompts(args.num_prompts, args.input_tokens, args.seed)
            warm = prompts(args.warmup, args.input_tokens, args.seed + 7)
            if pool is not None:
                outcomes, duration, client_cpu, cpu_before = await run_point_in_processes(
                    pool, barrier, server_pid, target, work, warm, args, concurrency, rate
                )
            else:
                assert conn is not None
                await run_point(conn, target, warm, args, concurrency, math.inf)  # connections, kernels, caches
                cpu_before = thread_cpu(server_pid) if server_pid else None
                client_before = client_cpu_seconds()
                outcomes, duration = await run_point(conn, target, work, args, concurrency, rate)
                client_cpu = client_cpu_seconds() - client_before
            server_cpu = None
            if server_pid and cpu_before is not None:
                after = thread_cpu(server_pid)
                server_cpu = {k: after[k] - cpu_before[k] for k in after}
            result = point_result(outcomes, duration, server_cpu, client_cpu, concurrency, rate)
            result["client_processes"] = args.client_processes
            if concurrency in baseline:
                result["engine_only_tokens_per_second"] = round(baseline[concurrency], 2)
                result["fraction_of_engine_only"] = round(result["output_throughput"] / baseline[concurrency], 3)
            results.append(result)
            print(report_line(result), flush=True)
    return results


def report_line(r: dict[str, Any]) -> str:
    shape = f"c={r['concurrency']}" if r["request_rate"] == "inf" else f"rate={r['request_rate']}/s"
    text = (
        f"{shape:>10}  ok {r['completed']:>4} fail {r['failed']:>3}  {r['request_throughput']:7.2f} req/s"
        f"  {r['output_throughput']:8.1f} tok/s"
        f"  TTFT p50 {r['ttft_ms']['median']:8.1f} p99 {r['ttft_ms']['p99']:8.1f} ms"
        f"  ITL p50 {r['itl_ms']['median']:6.1f} p99 {r['itl_ms']['p99']:7.1f} ms"
        f"  E2EL p50 {r['e2el_ms']['median']:8.1f} ms"
    )
    if "front_end_cpu_us_per_token" in r:
        text += f"  front end {r['front_end_cpu_us_per_token']:.1f} µs/tok, server {r['server_cpu_us_per_token']:.1f}"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--concurrency", default="1,8,32", help="sweep of requests in flight (ignored with --request-rate)")
    ap.add_argument("--request-rate", default="", help="sweep of Poisson arrival rates per second, e.g. 2,8,inf")
    ap.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight with --request-rate")
    ap.add_argument("--num-prompts", type=int, default=64, help="requests per sweep point")
    ap.add_argument("--warmup", type=int, default=4, help="requests before each point, not measured")
    ap.add_argument("--input-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default: no sampling cost)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grpc-target", default="", help="a running server's gRPC host:port (else one is started)")
    ap.add_argument("--http-url", default="", help="a running server's HTTP base URL (else one is started)")
    ap.add_argument("--server-pid", type=int, default=None, help="the running server's pid on this host, for its CPU")
    ap.add_argument("--server-args", default="", help="extra `rwkvd serve` flags for a started server")
    ap.add_argument("--device", default=None, help="device label of a running server (a started one is detected)")
    ap.add_argument("--api-key", default=os.environ.get("RWKVD_API_KEY"))
    ap.add_argument("--model", default="", help="model id for HTTP requests (default: the served one)")
    ap.add_argument("--engine-baseline", type=Path, default=None, help="a bench/engine.py result to compare with")
    ap.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="client processes sharing the load (one asyncio client saturates near 10-20k messages/s)",
    )
    ap.add_argument(
        "--simulate-device-ms",
        type=float,
        default=None,
        help="start the server on a simulated device whose every step takes this long (bench/simulated_device.py): "
        "the host's own ceiling, engine and front end, without a model",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    external = args.grpc_target if args.protocol == "grpc" else args.http_url
    server_args = shlex.split(args.server_args)
    now = dt.datetime.now(dt.UTC)
    with contextlib.ExitStack() as stack:
        if external:
            target = Target(args.protocol, args.endpoint, args.grpc_target, args.http_url, args.api_key, args.model)
            pid = args.server_pid
            device, description = args.device or "unknown", args.device or "unknown"
        else:
            log_path = Path(tempfile.gettempdir()) / f"rwkvd-bench-serve-{os.getpid()}.log"
            process, grpc_port, http_port = stack.enter_context(
                started_server(server_args, log_path, args.simulate_device_ms)
            )
            target = Target(
                args.protocol,
                args.endpoint,
                f"127.0.0.1:{grpc_port}",
                f"http://127.0.0.1:{http_port}",
                args.api_key,
                args.model,
            )
            pid = process.pid
            device, description = device_of(server_args, args.device)
            if args.simulate_device_ms is not None:
                device = f"simulated{args.simulate_device_ms:g}ms-{device}"
                description = f"simulated device, {args.simulate_device_ms:g} ms per step (host: {description})"
        load_before = os.getloadavg()[0]
        results = asyncio.run(measure(args, target, pid))
        load_after = os.getloadavg()[0]

    record = {
        "benchmark": "serve",
        "protocol": args.protocol,
        "endpoint": args.endpoint,
        "device": description,
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "conditions": {
            "server": "external"
            if external
            else "started: python -m service serve "
            + " ".join(server_args)
            + (
                f" on a simulated device ({args.simulate_device_ms:g} ms per step, bench/simulated_device.py)"
                if args.simulate_device_ms is not None
                else ""
            ),
            "model": "built-in demo (random weights)" if not external and "--model" not in server_args else "as given",
            "num_prompts": args.num_prompts,
            "warmup": args.warmup,
            "input_tokens": args.input_tokens,
            "output_tokens": args.output_tokens,
            "temperature": args.temperature,
            "prompts": "random token ids (completions) / random words (chat), distinct: no prefix-cache hits",
            "client": (f"{args.client_processes} processes" if args.client_processes > 1 else "this process")
            + (" (asyncio); typed client rwkvd.AsyncClient" if args.protocol == "grpc" else " (asyncio); httpx, SSE"),
            "cpus": os.cpu_count(),
            # Wall-clock figures assume nothing else ran: a 1-minute load well above the benchmark's own
            # (server + client, about 2-3 busy threads) means other work shared the CPUs.
            "load_average_1m": {"before": round(load_before, 2), "after": round(load_after, 2)},
            "front_end_cpu": "event-loop thread + gRPC core threads of the server process (/proc/<pid>/task)",
            "engine_cpu": "the server process's other threads + its child processes (the engine process)",
        },
        "results": results,
    }
    out = args.out or RESULTS / f"serve-{args.protocol}-{device}-{now:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
