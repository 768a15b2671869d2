"""The SQL of a recorder batch: everything it writes, in foreign-key order, in one transaction.

Order inside the transaction: run, images, new trajectories, steps, generations, step images,
mode updates, finishes. Images therefore become durable in the same commit as (or before) the
first step that references them, and a step can never reference an image that is not stored
(``step_images.ref`` is a foreign key to ``images``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from storage.bulk import bulk_insert, bulk_update, select_text_column
from storage.claims import release
from storage.rows import StepRows, as_utc
from storage.schema import (
    BlobRow,
    DiffusionTransitionRow,
    GenerationRow,
    ImageRow,
    RunRow,
    StepImageRow,
    StepRow,
    TrajectoryRow,
)

RESUMABLE = ("incomplete",)
"""Statuses from which ``start_trajectory`` may restart an existing trajectory."""


class TrajectoryExists(ValueError):
    """``start_trajectory`` for an id that is already running or finished."""


def insert_ignore(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str]
) -> None:
    """INSERT rows, skipping those whose key already exists (a no-op on duplicates)."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        conn.execute(sqlite_insert(table).on_conflict_do_nothing(index_elements=keys), rows)
    elif conn.dialect.name == "postgresql":
        conn.execute(pg_insert(table).on_conflict_do_nothing(index_elements=keys), rows)
    else:  # pragma: no cover - other dialects: check first (not race-free)
        columns = [table.c[key] for key in keys]
        for row in rows:
            found = conn.execute(
                select(*columns).where(*(c == row[c.name] for c in columns))
            ).first()
            if found is None:
                conn.execute(insert(table), [row])


def insert_images(conn: Connection, rows: Iterable[dict[str, Any]]) -> None:
    # Sorted by key: concurrent writers then lock rows in one order (no deadlocks on PostgreSQL).
    rows = sorted(rows, key=lambda r: r["sha256"])
    bulk_insert(conn, ImageRow.__table__, rows, ignore_conflicts_on=["sha256"])


def existing_images(conn: Connection, refs: Iterable[str]) -> set[str]:
    wanted = sorted(set(refs))
    found: set[str] = set()
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        found.update(conn.scalars(select(ImageRow.sha256).where(ImageRow.sha256.in_(chunk))))
    return found


@dataclass
class BatchRows:
    run: dict[str, Any] | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    starts: list[dict[str, Any]] = field(default_factory=list)
    implicit: list[dict[str, Any]] = field(default_factory=list)
    """Trajectories first seen through a step (never started): created if absent."""
    steps: list[StepRows] = field(default_factory=list)
    finishes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    close: tuple[str, list[str]] | None = None
    """(run id, trajectory ids left unfinished): mark them incomplete and end the run."""
    claimant: str | None = None
    """A rollout worker's recorder (``storage.claims``): finishes end the lease, and a close
    releases only this worker's claims and leaves the run's status to the worker."""


def write_batch(conn: Connection, rows: BatchRows) -> None:
    trajectories = TrajectoryRow.__table__
    if rows.run is not None:
        insert_ignore(conn, RunRow.__table__, [rows.run], ["id"])
        conn.execute(update(RunRow).where(RunRow.id == rows.run["id"]).values(status="running"))
    insert_images(conn, rows.images)
    if rows.starts:
        _start(conn, rows.starts)
    bulk_insert(conn, trajectories, rows.implicit, ignore_conflicts_on=["id"])
    if rows.steps:
        bulk_insert(conn, StepRow.__table__, [s.step for s in rows.steps])
        bulk_insert(conn, GenerationRow.__table__, [g for s in rows.steps for g in s.generations])
        bulk_insert(conn, StepImageRow.__table__, [i for s in rows.steps for i in s.images])
        blobs = sorted((b for s in rows.steps for b in s.blobs), key=lambda b: b["sha256"])
        if blobs:  # diffusion transitions (Flow-GRPO) and their latents blobs
            insert_ignore(conn, BlobRow.__table__, blobs, ["sha256"])
            transitions = [t for s in rows.steps for t in s.transitions]
            conn.execute(insert(DiffusionTransitionRow.__table__), transitions)
        modes = [{"tid": s.trajectory_id, "new_mode": s.mode} for s in rows.steps if s.mode]
        if modes:
            conn.execute(
                update(trajectories)
                .where(trajectories.c.id == bindparam("tid"))
                .values(mode=bindparam("new_mode")),
                modes,
            )
    if rows.finishes:
        finishes = rows.finishes
        if rows.claimant is not None:
            finishes = [(tid, {**values, "lease_until": None}) for tid, values in finishes]
        _finish(conn, finishes)
    if rows.close is not None and rows.claimant is not None:
        release(conn, rows.claimant, ids=rows.close[1])
    elif rows.close is not None:
        run_id, unfinished = rows.close
        for start in range(0, len(unfinished), 500):
            conn.execute(
                update(TrajectoryRow)
                .where(
                    TrajectoryRow.id.in_(unfinished[start : start + 500]),
                    TrajectoryRow.status == "running",
                )
                .values(status="incomplete")
            )
        conn.execute(
            update(RunRow)
            .where(RunRow.id == run_id)
            .values(status="incomplete" if unfinished else "finished")
        )


def _start(conn: Connection, starts: list[dict[str, Any]]) -> None:
    table = TrajectoryRow.__table__
    existing = select_text_column(conn, table, "id", "status", [row["id"] for row in starts])
    fresh = [row for row in starts if row["id"] not in existing]
    for row in starts:
        status = existing.get(row["id"])
        if status is None:
            continue
        if status not in RESUMABLE:
            raise TrajectoryExists(
                f"trajectory {row['id']!r} already exists with status {status!r}; only "
                f"{', '.join(RESUMABLE)} trajectories can be started again (resumed)"
            )
        conn.execute(
            update(TrajectoryRow)
            .where(TrajectoryRow.id == row["id"])
            .values(status="running", finished_at=None, error=None, run_id=row["run_id"])
        )
    bulk_insert(conn, table, fresh)


def _finish(conn: Connection, finishes: list[tuple[str, dict[str, Any]]]) -> None:
    """One executemany per shape of finish (with or without a final state). The recorder
    knows each duration; only a finish without one reads ``started_at`` back."""
    rows = [{**values, "id": trajectory_id} for trajectory_id, values in finishes]
    unknown = [row for row in rows if row.get("duration_s") is None]
    if unknown:
        ids = [row["id"] for row in unknown]
        started = dict(
            conn.execute(
                select(TrajectoryRow.id, TrajectoryRow.started_at).where(TrajectoryRow.id.in_(ids))
            ).all()
        )
        _refuse_unstarted(ids, started)
        for row in unknown:
            row["duration_s"] = (row["finished_at"] - as_utc(started[row["id"]])).total_seconds()
    if bulk_update(conn, TrajectoryRow.__table__, "id", rows) < len(rows):
        ids = [row["id"] for row in rows]
        _refuse_unstarted(
            ids, set(conn.scalars(select(TrajectoryRow.id).where(TrajectoryRow.id.in_(ids))))
        )


def _refuse_unstarted(ids: Iterable[str], found: Iterable[str]) -> None:
    missing = sorted(set(ids) - set(found))
    if missing:
        raise KeyError(f"finish_trajectory: no trajectory {missing[0]!r} was started")
