"""The embedded store: rows and state files round-trip, survive reopening, page newest first."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from service.store.records import PredictionRecord, TaskRecord
from service.store.sqlite import Store


def task(task_id: str, created: float = 1.0, kind: str = "persistent") -> TaskRecord:
    return TaskRecord(
        id=task_id, kind=kind, created=created, updated=created, status=3, chunks=[[2, "你好"]], tokens=[5, 6]
    )


async def test_tasks_and_states_round_trip_and_survive_reopening(tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    await store.save_task(task("TASK_a"), state=b"state-bytes")
    await store.save_task(task("_TMPL_b", 2.0, "template"))
    assert await store.load_task("TASK_a") == task("TASK_a")
    assert await store.load_state("TASK_a") == b"state-bytes"
    assert await store.load_state("_TMPL_b") is None
    assert not list((tmp_path / "states").glob("*.tmp"))  # the atomic write left nothing behind
    await store.close()

    store = await Store.open(tmp_path)
    assert [t.id for t in await store.tasks()] == ["TASK_a", "_TMPL_b"]
    assert [t.id for t in await store.tasks("template")] == ["_TMPL_b"]
    assert await store.task_ids("persistent") == ["TASK_a"]
    await store.save_task(task("TASK_a"), state=b"newer")  # replaces row and file
    assert await store.load_state("TASK_a") == b"newer"
    await store.delete_task("TASK_a")
    assert await store.load_task("TASK_a") is None
    assert not (tmp_path / "states" / "TASK_a.state").exists()
    await store.close()
    mode = sqlite3.connect(tmp_path / "rwkvd.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


async def test_path_like_ids_are_refused(tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    with pytest.raises(ValueError, match="bad task id"):
        await store.save_task(task("../escape"), state=b"x")
    await store.close()


async def test_predictions_page_newest_first(tmp_path: Path) -> None:
    store = await Store.open(tmp_path)
    for i in range(5):
        await store.save_prediction(
            PredictionRecord(id=f"p{i}", model="m", version="v", created=float(i), status="succeeded")
        )
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.list_predictions(cursor, 2)
        seen += [p.id for p in page]
        if cursor is None:
            break
    assert seen == ["p4", "p3", "p2", "p1", "p0"]
    with pytest.raises(ValueError, match="bad cursor"):
        await store.list_predictions("%%%", 2)
    await store.close()
