"""The RWKV World tokenizer: encode with the Rust pyrwkv-tokenizer, decode from our own id -> bytes table.

Encoding is greedy longest match over UTF-8 bytes (ids identical to the reference TRIE_TOKENIZER; the
Rust package is ~15-25x faster). Decoding never goes through that package: it panics on token lists
that end inside a character. `IncrementalDecoder` turns a token stream into text deltas and holds back
an incomplete UTF-8 tail until the character is complete, so nothing is lost or mangled.
"""

from __future__ import annotations

import ast
import codecs
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

EOS_ID = 0  # end of text / document separator; never produced by the encoder
VOCAB_SIZE = 65536  # the model's vocabulary; the tokenizer uses ids 1..65529


@functools.lru_cache(maxsize=1)
def _load_table(path: str) -> tuple[bytes, ...]:
    """id -> bytes for the whole vocabulary (unused ids map to b"")."""
    table = [b""] * VOCAB_SIZE
    with open(path, encoding="utf-8") as f:
        for line in f:
            # "<id> <python literal> <byte length>"; the literal may contain spaces.
            first, rest = line.split(" ", 1)
            literal, length = rest.rstrip("\r\n").rsplit(" ", 1)
            value = ast.literal_eval(literal)
            raw = value.encode("utf-8") if isinstance(value, str) else value
            if len(raw) != int(length):
                raise ValueError(f"vocabulary line {first}: {len(raw)} bytes, expected {length}")
            table[int(first)] = raw
    return tuple(table)


class WorldTokenizer:
    def __init__(self) -> None:
        import pyrwkv_tokenizer  # Rust extension; loads its bundled copy of the vocabulary

        self._rust = pyrwkv_tokenizer.RWKVTokenizer()
        vocab_file = Path(pyrwkv_tokenizer.__file__).parent / "rwkv_vocab_v20230424.txt"
        self._bytes = _load_table(str(vocab_file))

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(self._rust.encode(text)) if text else []

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 < token_id < VOCAB_SIZE else b""

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._bytes
        return b"".join(table[i] if 0 < i < VOCAB_SIZE else b"" for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Whole-sequence decode; invalid UTF-8 (not a split character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class IncrementalDecoder:
    """Token ids in, text out, one chunk at a time, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: WorldTokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Iterable[int]) -> str:
        return self._utf8.decode(self._tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """At the end of a generation: an incomplete tail that can no longer complete becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
