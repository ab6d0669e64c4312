"""The installed distribution's version, read once from its metadata (pyproject.toml is the one source)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rwkvd")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
