"""Stop strings over streamed text: emit what cannot be part of a stop string, hold back what might be.

A stop string is never emitted, even when it arrives split across many tokens: text that ends with a
prefix of some stop string is held until it either completes the stop (generation ends, the held text
is dropped) or diverges (the held text is released).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    @property
    def watching(self) -> bool:
        """Whether there are stop strings to look for (without any, push() returns its text unchanged)."""
        return bool(self._stops)

    def push(self, text: str) -> str:
        """Adds text; returns the part that is safe to emit. Sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = self._longest_partial(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The generation ended for another reason: release what was held."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
