"""Prefix-state cache: RNN states keyed by the exact token ids read into them from a zero state.

A new prompt that starts with a cached key starts from that state and reads only the rest. Keys are
always shorter than the prompt they serve, because the last prompt token must be read to get logits.
LRU with a bound on entries; hits and misses are counted for usage and metrics.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence

from .state_pool import RnnState


class PrefixCache:
    def __init__(self, max_entries: int, min_tokens: int) -> None:
        self.max_entries = max_entries
        self.min_tokens = max(1, min_tokens)
        self._entries: OrderedDict[tuple[int, ...], RnnState] = OrderedDict()
        self._lengths: Counter[int] = Counter()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def worth_caching(self, length: int) -> bool:
        return self.enabled and length >= self.min_tokens

    def lookup(self, prompt: Sequence[int]) -> tuple[int, RnnState] | None:
        """The longest cached key that is a proper prefix of `prompt`, as (length, state)."""
        if not self.enabled or len(prompt) <= self.min_tokens:
            return None
        for n in sorted(self._lengths, reverse=True):
            if n >= len(prompt):
                continue
            key = tuple(prompt[:n])
            state = self._entries.get(key)
            if state is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return n, state
        self.misses += 1
        return None

    def insert(self, tokens: Sequence[int], state: RnnState) -> None:
        if not self.worth_caching(len(tokens)):
            return
        key = tuple(tokens)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = state
        self._lengths[len(key)] += 1
        while len(self._entries) > self.max_entries:
            old, _ = self._entries.popitem(last=False)
            self._lengths[len(old)] -= 1
            if not self._lengths[len(old)]:
                del self._lengths[len(old)]

    def clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
