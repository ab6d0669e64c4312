"""Saved sequence states: what templates, forks, sessions and persisted tasks hold, and their byte format.

A snapshot is a value: the RNN state after reading `token_count` tokens, the token sampled (or given)
but not yet read, and the sampler's penalty state and random-stream position. It never changes after
it is made; resuming copies it into a slot. Bytes are safetensors with the model version in the
metadata, so a state is only ever imported into the model it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from service.errors import InvalidArgument

from .checkpoint import ModelShape
from .state_pool import RnnState

FORMAT = "rwkvd-state-v1"


@dataclass(frozen=True, eq=False)
class StateSnapshot:
    rnn: RnnState
    pending_token: int | None
    token_count: int
    penalties: torch.Tensor  # [V] fp32
    seen: torch.Tensor  # [V] bool
    seed: int
    position: int  # next index in the random stream
    model_version: str

    @property
    def nbytes(self) -> int:
        return self.rnn.nbytes + self.penalties.numel() * 4 + self.seen.numel()


def to_bytes(snapshot: StateSnapshot) -> bytes:
    from safetensors.torch import save

    meta = {
        "format": FORMAT,
        "model_version": snapshot.model_version,
        "pending_token": "" if snapshot.pending_token is None else str(snapshot.pending_token),
        "token_count": str(snapshot.token_count),
        "seed": str(snapshot.seed),
        "position": str(snapshot.position),
    }
    tensors = {
        "att_x": snapshot.rnn.att_x,
        "wkv": snapshot.rnn.wkv,
        "ffn_x": snapshot.rnn.ffn_x,
        "penalties": snapshot.penalties,
        "seen": snapshot.seen.to(torch.uint8),
    }
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=meta)


def from_bytes(
    data: bytes, *, model_version: str, shape: ModelShape, device: torch.device, dtype: torch.dtype
) -> StateSnapshot:
    """Parses and checks exported state bytes; InvalidArgument (field "state") when they do not fit."""
    from safetensors.torch import load

    def bad(why: str) -> InvalidArgument:
        return InvalidArgument.for_field("state", why, reason="INVALID_STATE")

    try:
        tensors = load(data)
        # safetensors: an 8-byte little-endian header length, then a JSON header holding the metadata.
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    except Exception as exc:  # any malformed payload is the client's error
        raise bad(f"not an exported rwkvd state ({type(exc).__name__})") from exc
    if meta.get("format") != FORMAT:
        raise bad(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("model_version") != model_version:
        raise bad(f"state of model version {meta.get('model_version')!r}, this server runs {model_version!r}")
    L, C, H, N, V = shape.n_layer, shape.n_embd, shape.n_head, shape.head_size, shape.vocab_size
    want = {"att_x": (L, C), "wkv": (L, H, N, N), "ffn_x": (L, C), "penalties": (V,), "seen": (V,)}
    for key, dims in want.items():
        if key not in tensors or tuple(tensors[key].shape) != dims:
            raise bad(f"tensor {key} missing or not of shape {list(dims)}")
    try:
        pending = int(meta["pending_token"]) if meta.get("pending_token") else None
        token_count, seed, position = int(meta["token_count"]), int(meta["seed"]), int(meta["position"])
    except (KeyError, ValueError) as exc:
        raise bad(f"metadata incomplete ({exc})") from exc
    # The pending token is read first on resume: out of range, it would fail the whole step it runs in.
    if pending is not None and not 0 <= pending < V:
        raise bad(f"pending token {pending} is not in [0, {V})")
    if token_count < 0 or position < 0:
        raise bad("token_count and position must not be negative")
    for key in ("att_x", "wkv", "ffn_x", "penalties"):
        if not bool(torch.isfinite(tensors[key].float()).all()):
            raise bad(f"tensor {key} has NaN or infinite values")
    rnn = RnnState(
        tensors["att_x"].to(device, dtype),
        tensors["wkv"].to(device, torch.float32),
        tensors["ffn_x"].to(device, dtype),
    )
    return StateSnapshot(
        rnn=rnn,
        pending_token=pending,
        token_count=token_count,
        penalties=tensors["penalties"].to(device, torch.float32),
        seen=tensors["seen"].to(device).bool(),
        seed=seed,
        position=position,
        model_version=model_version,
    )
