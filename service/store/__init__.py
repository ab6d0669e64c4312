"""Persistence: the embedded SQLite store and its records. Knows nothing of the engine or the wire."""
