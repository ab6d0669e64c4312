"""Engine configuration: one frozen dataclass, validated on construction, passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    # Checkpoint file (.pth / .safetensors); None = the built-in demo model (random weights).
    model_path: str | None = None
    # "owner/name" the APIs use; None = "local/<file stem>" or "local/rwkv7-demo".
    model_id: str | None = None
    # Other names the APIs accept for the model (e.g. "gpt-3.5-turbo" for clients that hard-code one).
    model_aliases: tuple[str, ...] = ()
    backend: str = "auto"  # auto | torch | triton
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, fp16 on GPU) | float32 | float16 | bfloat16
    # Storage dtype of the WKV state in the slot pool, snapshots and exported states: float32 | float16 |
    # bfloat16. Math is fp32 whatever this says (loaded, computed, rounded once per step when stored); fp16
    # halves the state's memory and per-step traffic at slightly different numerics. Never the default.
    state_dtype: str = "float32"
    # Sequences holding a state slot at once = rows of a step.
    max_batch_size: int = 64
    # Tokens read per step, decode rows plus prefill chunks.
    max_batch_tokens: int = 2048
    # Tokens of one sequence's prompt read per step.
    prefill_chunk: int = 512
    # Sequences waiting for a slot before new ones are refused (RESOURCE_EXHAUSTED, retryable).
    max_queued: int = 1024
    max_prompt_tokens: int = 1_000_000
    max_new_tokens: int = 1_000_000
    # Prefix-state cache: entries kept (0 = off) and the shortest prefix worth an entry.
    prefix_cache_entries: int = 32
    prefix_cache_min_tokens: int = 32
    # torch intra-op threads on CPU; None = torch's default.
    threads: int | None = None
    # Decode steps replayed from CUDA graphs (one per batch-size bucket): auto = on with a CUDA device.
    cuda_graphs: str = "auto"  # auto | on | off
    # Launch each step before the previous step's text is decoded and its events delivered, so that host
    # work overlaps the device's: auto = on with a CUDA device (on a CPU a launch is the whole step, and
    # overlapping would only hold every step's events back by one step).
    overlap: str = "auto"  # auto | on | off
    # A generating request's tokens are handed to its stream every this many tokens (its first token, its
    # end and every other event at once). 1 = every token. Larger values cut the front end's work per token
    # (one message carries several) when many streams share the event loop, at the price of burstier
    # streams: inter-token latency becomes a multiple of the step time (SGLang's --stream-interval).
    stream_interval: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.backend not in ("auto", "torch", "triton"):
            problems.append(f"backend must be auto, torch or triton, not {self.backend!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            problems.append(f"dtype must be auto, float32, float16 or bfloat16, not {self.dtype!r}")
        if self.state_dtype not in ("float32", "float16", "bfloat16"):
            problems.append(f"state_dtype must be float32, float16 or bfloat16, not {self.state_dtype!r}")
        for name in ("max_batch_size", "max_batch_tokens", "prefill_chunk", "max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.max_batch_tokens < self.max_batch_size:
            problems.append("max_batch_tokens must be at least max_batch_size (every running row reads a token)")
        if self.max_queued < 0 or self.prefix_cache_entries < 0 or self.prefix_cache_min_tokens < 1:
            problems.append("max_queued and prefix_cache_entries must be >= 0, prefix_cache_min_tokens >= 1")
        if self.threads is not None and self.threads < 1:
            problems.append("threads must be at least 1")
        if self.cuda_graphs not in ("auto", "on", "off"):
            problems.append(f"cuda_graphs must be auto, on or off, not {self.cuda_graphs!r}")
        if self.stream_interval < 1:
            problems.append("stream_interval must be at least 1")
        if self.overlap not in ("auto", "on", "off"):
            problems.append(f"overlap must be auto, on or off, not {self.overlap!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def overlap_on(self, device_type: str) -> bool:
        """Whether the engine overlaps host work with the device's (see `overlap`), on this device type."""
        return self.overlap == "on" or (self.overlap == "auto" and device_type == "cuda")
