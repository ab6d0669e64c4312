"""Progress of a slow loading step: hashing a checkpoint, casting weights onto the device, generating weights.

On a terminal it is a tqdm bar on stderr; otherwise (containers, log pipelines) an info line every few
seconds, e.g. "loading weights: 45% (120/260 tensors, 3.2 GB)". A step that ends within `delay` seconds
shows nothing, so small models and tests load silently. advance() is a counter bump and a clock read
until a report is due.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from types import TracebackType
from typing import Any

log = logging.getLogger("rwkvd.engine")


class Progress:
    def __init__(self, what: str, total: int, unit: str = "tensors", *, delay: float = 1.0, interval: float = 5.0):
        """`unit` "B" counts bytes (shown in GB); any other unit counts items, with their bytes alongside."""
        self.what = what
        self.total = max(total, 1)
        self.unit = unit
        self.done = 0
        self.nbytes = 0
        self._interval = interval
        self._started = time.monotonic()
        self._next = self._started + delay  # nothing before this
        self._bar: Any = None  # tqdm, once shown on a terminal
        self._shown = False

    def advance(self, n: int = 1, nbytes: int = 0) -> None:
        self.done += n
        self.nbytes += nbytes
        now = time.monotonic()
        if now >= self._next:
            self._report(now)

    def close(self) -> None:
        """Completes the bar, or logs the total time if progress was shown at all."""
        if self._bar is not None:
            self._bar.update(self.total - self._bar.n)
            self._bar.close()
            self._bar = None
        elif self._shown:
            log.info("%s: done (%s) in %.1fs", self.what, self._amount(), time.monotonic() - self._started)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _report(self, now: float) -> None:
        if not self._shown:
            self._shown = True
            self._bar = _terminal_bar(self.what, self.total, self.unit)
        if self._bar is not None:
            self._bar.update(min(self.done, self.total) - self._bar.n)
            if self.unit != "B":
                self._bar.set_postfix_str(f"{self.nbytes / 1e9:.1f} GB", refresh=False)
            self._next = now + 0.1  # tqdm redraws at most this often anyway
            return
        log.info("%s: %d%% (%s)", self.what, 100 * self.done // self.total, self._amount())
        self._next = now + self._interval

    def _amount(self) -> str:
        if self.unit == "B":
            return f"{self.done / 1e9:.1f}/{self.total / 1e9:.1f} GB"
        return f"{self.done}/{self.total} {self.unit}, {self.nbytes / 1e9:.1f} GB"


def _terminal_bar(what: str, total: int, unit: str) -> Any:
    """A tqdm bar when stderr is a terminal and tqdm is installed (an optional nicety), else None."""
    if not sys.stderr.isatty():
        return None
    try:
        tqdm = importlib.import_module("tqdm").tqdm  # by name: it has no type stubs
    except ImportError:
        return None
    return tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B")
