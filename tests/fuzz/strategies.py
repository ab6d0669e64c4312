"""Hypothesis strategies for rwkvd's protobuf requests, built from the message descriptors.

Every field of a request may be absent or set: scalars from the edges of their type (huge integers, NaN and
infinities, empty and huge strings, unknown enum numbers), repeated fields as short lists, oneofs with at
most one member, google.protobuf.Struct as random JSON. Fields whose meaning makes random values useless
(ids, model names, prediction inputs, exported states) also draw from values that exist on the server
(`Pool`), so that the requests get past "not found" often enough to reach the code behind it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message as pb_message
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, OneofDescriptor
from hypothesis import strategies as st

MODEL = "local/rwkv7-demo"
TEXT_CHARS = st.characters(exclude_categories=("Cs",))  # protobuf strings are UTF-8: no lone surrogates
HUGE_TEXT = "huge " * 20_000  # 100 kB: far beyond the fuzz server's max_prompt_tokens
PREDICTION_INPUTS = (
    "prompt",
    "system_prompt",
    "prompt_template",
    "max_tokens",
    "max_new_tokens",
    "min_tokens",
    "min_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "penalty_decay",
    "seed",
    "stop_sequences",
)


@dataclass
class Pool:
    """Values that exist on the server under test, filled in once it runs (strategies read it when drawing)."""

    values: dict[str, list[Any]] = field(default_factory=dict)

    def pick(self, kind: str, default: Any = "") -> st.SearchStrategy[Any]:
        def choose(i: int) -> Any:
            known = self.values.get(kind) or [default]
            return known[i % len(known)]

        return st.integers(0, 15).map(choose)


POOL = Pool()


def mostly(usual: st.SearchStrategy[Any], edge: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` four times in five, else `edge`: requests whose every field is at an edge are refused at the first
    one, so most fields take ordinary values and the checks behind the first ones get reached too."""
    return st.integers(0, 4).flatmap(lambda i: edge if i == 0 else usual)


texts: st.SearchStrategy[str] = mostly(
    st.text(TEXT_CHARS, max_size=12),
    st.one_of(
        st.just(HUGE_TEXT),
        st.sampled_from(["", " ", "\x00", "🙂", "\n\nUser:", "{prompt}", "TMP_", "_TMPL_x", "../../etc/passwd"]),
    ),
)
uint32s = mostly(st.integers(0, 6), st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([2**31, 2**32 - 1])))
int32s = mostly(st.integers(-1, 6), st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-(2**31), -2])))
uint64s = mostly(st.integers(0, 2**32), st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**63, 2**64 - 1])))
doubles = mostly(
    st.floats(0, 1),
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([-0.0, 2.0, 5.0, 10.0, -2.0, 1e308, -1e308, math.inf, -math.inf, math.nan, 5e-324]),
    ),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 8),
    st.integers(-(2**63), 2**64),
    doubles,
    texts,
)
KEYS = st.text(TEXT_CHARS, max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=6,
)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


prediction_inputs: st.SearchStrategy[struct_pb2.Struct] = st.one_of(
    # Mostly a prompt and some of the known inputs, each of any JSON type.
    st.fixed_dictionaries(
        {"prompt": texts}, optional={name: json_values for name in PREDICTION_INPUTS if name != "prompt"}
    ),
    st.dictionaries(st.sampled_from(PREDICTION_INPUTS) | st.text(TEXT_CHARS, max_size=8), json_values, max_size=4),
).map(_struct)

# Field name -> values, for fields whose meaning random values would rarely reach.
OVERRIDES: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
    "task_id": lambda: mostly(POOL.pick("task_id"), texts),
    "template_id": lambda: mostly(POOL.pick("template_id"), texts),
    "session_id": lambda: mostly(POOL.pick("session_id"), texts),
    "id": lambda: mostly(POOL.pick("id"), texts),  # GetModel (model ids, versions) and the prediction RPCs
    "model": lambda: mostly(POOL.pick("model"), texts),
    "version": lambda: mostly(POOL.pick("model"), texts),
    "state": lambda: st.one_of(
        POOL.pick("state", b""), st.binary(max_size=64), POOL.pick("state", b"").map(lambda b: b[: len(b) // 2])
    ),
    "input": lambda: prediction_inputs,
    "webhook": lambda: st.sampled_from(["", "ftp://example.com/x", "http://", "https://127.0.0.1:9/hook"]) | texts,
    "page_token": lambda: POOL.pick("page_token") | texts,
    "cursor": lambda: POOL.pick("cursor") | texts,
    "last_event_id": lambda: st.sampled_from(["", "0", "1", "3", "-1", "99999999999999999999"]) | texts,
    "ids": lambda: mostly(st.integers(0, 65535), uint32s),  # token ids: mostly in the vocabulary
}


def _is_synthetic(oneof: OneofDescriptor) -> bool:
    """A proto3 `optional` field's one-member oneof."""
    return bool(getattr(oneof, "is_synthetic", False)) or (
        len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name
    )


def _scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = f.type
    if t == FieldDescriptor.TYPE_STRING:
        return texts
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return doubles
    if t == FieldDescriptor.TYPE_UINT32:
        return uint32s
    if t == FieldDescriptor.TYPE_INT32:
        return int32s
    if t == FieldDescriptor.TYPE_UINT64:
        return uint64s
    if t == FieldDescriptor.TYPE_INT64:
        return st.integers(-(2**63), 2**63 - 1)
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in f.enum_type.values]
        return mostly(st.sampled_from([n for n in known if n] or known), st.sampled_from([0, -1, 2**31 - 1, 99]))
    raise NotImplementedError(f"no strategy for {f.full_name} (type {t})")


def _value(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    override = OVERRIDES.get(f.name)
    if override is not None:
        return override()
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(f.message_type)
    return _scalar(f)


def messages(descriptor: Descriptor) -> st.SearchStrategy[pb_message.Message]:
    """Instances of the message type: each field absent or set, each oneof with at most one member."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)
    if descriptor.full_name == "google.protobuf.Struct":
        return prediction_inputs

    # Messages with many fields (SamplingParams) set each one less often, so that some have none out of range.
    present = st.booleans() if len(descriptor.fields) < 6 else st.integers(0, 3).map(lambda i: i == 0)

    @st.composite
    def build(draw: st.DrawFn) -> pb_message.Message:
        msg = cls()
        chosen: dict[str, FieldDescriptor | None] = {}
        for oneof in descriptor.oneofs:
            if not _is_synthetic(oneof):
                chosen[oneof.name] = draw(st.sampled_from([None, *oneof.fields]))
        for f in descriptor.fields:
            oneof = f.containing_oneof
            if oneof is not None and not _is_synthetic(oneof):
                if chosen[oneof.name] is not f:
                    continue
            elif not draw(present):
                continue
            target = getattr(msg, f.name) if f.type == FieldDescriptor.TYPE_MESSAGE or _repeated(f) else None
            if _repeated(f):
                assert target is not None
                target.extend(draw(st.lists(_value(f), max_size=4)))
            elif target is not None:
                target.SetInParent()
                target.MergeFrom(draw(_value(f)))
            else:
                setattr(msg, f.name, draw(_value(f)))
        return msg

    return build()


def _repeated(f: FieldDescriptor) -> bool:
    return bool(f.is_repeated)
