"""Load progress: silent for quick steps, log lines (not a bar) when stderr is not a terminal."""

from __future__ import annotations

import logging

import pytest

from service.engine.progress import Progress


def test_a_quick_step_shows_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rwkvd.engine")
    with Progress("loading weights", 10) as progress:
        for _ in range(10):
            progress.advance(1, 1_000)
    assert not caplog.records


def test_a_slow_step_logs_its_progress_and_the_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rwkvd.engine")
    with Progress("loading weights", 260, delay=0.0, interval=0.0) as progress:
        for _ in range(117):
            progress.advance(1, 27_350_427)
    lines = [r.getMessage() for r in caplog.records]
    assert "loading weights: 45% (117/260 tensors, 3.2 GB)" in lines
    assert lines[-1].startswith("loading weights: done (117/260 tensors, 3.2 GB) in ")


def test_bytes_are_shown_in_gigabytes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rwkvd.engine")
    with Progress("hashing checkpoint", 8_000_000_000, "B", delay=0.0, interval=60.0) as progress:
        progress.advance(2_000_000_000)
    assert caplog.records[0].getMessage() == "hashing checkpoint: 25% (2.0/8.0 GB)"
