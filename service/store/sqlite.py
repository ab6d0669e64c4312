"""The embedded store: tasks and predictions in SQLite (WAL), RNN states as files beside it.

One connection on one dedicated thread, so the event loop never blocks on disk and SQLite never sees
two writers. A state file is written atomically (temporary file, fsync, rename) before the row that
refers to it, so a kill -9 at any moment leaves either the old row or the new row with its state.
Rows are plain records (store/records.py); the domain decides what they mean.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

from .records import PredictionRecord, TaskRecord

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_kind ON tasks (kind, created);
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_by_time ON predictions (created DESC, id DESC);
"""


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.states_dir = data_dir / "states"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rwkvd-store")
        self._db: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, data_dir: str | Path) -> Store:
        store = cls(Path(data_dir))
        await store._run(store._open)
        return store

    def _open(self) -> None:
        self.states_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.data_dir / "rwkvd.sqlite3", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a committed transaction survives a process crash (kill -9); only power loss can lose the last.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("store is closed")
        return self._db

    # Tasks

    async def save_task(self, record: TaskRecord, state: bytes | None = None) -> None:
        """Writes the task's state file (if given) and then its row."""

        def save() -> None:
            if state is not None:
                self._write_atomic(self._state_path(record.id), state)
            self.db.execute(
                "INSERT OR REPLACE INTO tasks (id, kind, created, record) VALUES (?, ?, ?, ?)",
                (record.id, record.kind, record.created, _dump(record)),
            )

        await self._run(save)

    async def load_task(self, task_id: str) -> TaskRecord | None:
        row = await self._run(lambda: self.db.execute("SELECT record FROM tasks WHERE id = ?", (task_id,)).fetchone())
        return None if row is None else _load(TaskRecord, row[0])

    async def load_state(self, task_id: str) -> bytes | None:
        path = self._state_path(task_id)
        return await self._run(lambda: path.read_bytes() if path.exists() else None)

    async def delete_task(self, task_id: str) -> None:
        def delete() -> None:
            self.db.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            self._state_path(task_id).unlink(missing_ok=True)

        await self._run(delete)

    async def tasks(self, kind: str | None = None) -> list[TaskRecord]:
        """Stored tasks (of one kind), oldest first."""

        def select() -> list[Any]:
            if kind is None:
                return self.db.execute("SELECT record FROM tasks ORDER BY created").fetchall()
            return self.db.execute("SELECT record FROM tasks WHERE kind = ? ORDER BY created", (kind,)).fetchall()

        return [_load(TaskRecord, r[0]) for r in await self._run(select)]

    async def task_ids(self, kind: str | None = None) -> list[str]:
        """Ids of stored tasks (of one kind), oldest first."""

        def select() -> list[Any]:
            if kind is None:
                return self.db.execute("SELECT id FROM tasks ORDER BY created").fetchall()
            return self.db.execute("SELECT id FROM tasks WHERE kind = ? ORDER BY created", (kind,)).fetchall()

        return [r[0] for r in await self._run(select)]

    def _state_path(self, task_id: str) -> Path:
        if not task_id.replace("_", "").isalnum():  # ids are server-made; refuse anything path-like
            raise ValueError(f"bad task id {task_id!r}")
        return self.states_dir / f"{task_id}.state"

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself is durable once the directory entry is
        finally:
            os.close(dir_fd)

    # Predictions

    async def save_prediction(self, record: PredictionRecord) -> None:
        await self._run(
            lambda: self.db.execute(
                "INSERT OR REPLACE INTO predictions (id, created, record) VALUES (?, ?, ?)",
                (record.id, record.created, _dump(record)),
            )
        )

    async def load_prediction(self, prediction_id: str) -> PredictionRecord | None:
        row = await self._run(
            lambda: self.db.execute("SELECT record FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
        )
        return None if row is None else _load(PredictionRecord, row[0])

    async def list_predictions(self, cursor: str | None, limit: int) -> tuple[list[PredictionRecord], str | None]:
        """Newest first; returns a page and the cursor of the next page (None on the last)."""
        after = _decode_cursor(cursor) if cursor else None

        def select() -> list[Any]:
            if after is None:
                sql = "SELECT record, created, id FROM predictions ORDER BY created DESC, id DESC LIMIT ?"
                return self.db.execute(sql, (limit + 1,)).fetchall()
            sql = (
                "SELECT record, created, id FROM predictions WHERE (created, id) < (?, ?) "
                "ORDER BY created DESC, id DESC LIMIT ?"
            )
            return self.db.execute(sql, (after[0], after[1], limit + 1)).fetchall()

        rows = await self._run(select)
        page = rows[:limit]
        next_cursor = _encode_cursor(page[-1][1], page[-1][2]) if len(rows) > limit else None
        return [_load(PredictionRecord, r[0]) for r in page], next_cursor


def _dump(record: TaskRecord | PredictionRecord) -> str:
    return json.dumps(asdict(record), ensure_ascii=False)


def _load(cls: type[T], text: str) -> T:
    data = json.loads(text)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in known})


def _encode_cursor(created: float, record_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created, record_id]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str] | None:
    try:
        created, record_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return float(created), str(record_id)
    except (ValueError, TypeError):
        raise ValueError(f"bad cursor {cursor!r}") from None
