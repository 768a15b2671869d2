"""``steps`` rows into PostgreSQL: psycopg ``executemany`` against ``COPY`` (``copy_insert``).

    PYTHONPATH=. python benchmarks/pg_copy.py [--rows 20000] [--batch 64] [--repeats 3]

Starts a private PostgreSQL server (``tests.pg.PostgresServer``: fsync off, so this measures
the client and the protocol, not the disk), creates the schema, and inserts ``--rows``
recorder-like ``steps`` rows (a state snapshot every 4th step, JSON null otherwise) in batches
of ``--batch``, one transaction per batch, with

- executemany: the INSERT that ``storage.bulk`` sends, values through SQLAlchemy's bind
  processors, one raw psycopg ``cursor.executemany`` per batch (pipelined by psycopg);
- copy: ``storage.pg_copy.copy_insert``.

Prints, interleaved over ``--repeats`` runs, the median wall time and this process's CPU time
per row (the server runs on the same machine, so wall time includes its share of the CPUs).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from functools import cache
from typing import Any

from sqlalchemy import JSON, Connection, Engine, insert
from sqlalchemy.engine import Dialect

from storage.pg_copy import copy_insert
from storage.schema import RunRow, StepRow, TrajectoryRow
from storage.store import TrajectoryStore

STEPS = StepRow.__table__
COLUMNS = tuple(c.name for c in STEPS.columns)
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
STATE = {
    "prompt": "two red circles left of a blue square, on a white background",
    "mode": "reflect",
    "images": [{"ref": "ab" * 32, "width": 512, "height": 512}] * 3,
    "reflections": ["<think>The image lacks a circle.</think>Add one red circle."] * 2,
    "budget": {"steps": 12, "edits": 3, "seconds": 120.0},
    "score": 0.75,
}

Insert = Callable[[Connection, list[tuple[Any, ...]]], None]


def step_rows(tid: str, n: int) -> list[tuple[Any, ...]]:
    return [
        (
            tid,
            seq,
            "reflect",
            "reflect_refine",
            STATE if seq % 4 == 0 else JSON.NULL,
            {"reflections": ["Add one red circle."], "steps": seq},
            "<think>The image lacks a circle.</think>Add one red circle.",
            0.001 * seq,
            T0 + timedelta(milliseconds=seq),
            None,
            ["reflector-model"],
            None,
            None,
        )
        for seq in range(n)
    ]


@cache
def insert_plan(dialect: Dialect) -> tuple[str, list[Callable[[Any], Any] | None]]:
    processors = [c.type.dialect_impl(dialect).bind_processor(dialect) for c in STEPS.columns]
    sql = f"INSERT INTO steps ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
    return sql, processors


def executemany(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """What ``storage.bulk`` does on PostgreSQL, written out: bind processors + executemany."""
    sql, processors = insert_plan(conn.dialect)
    params = [
        [p(v) if p is not None else v for p, v in zip(processors, row, strict=True)] for row in rows
    ]
    cursor = conn.connection.cursor()
    try:
        cursor.executemany(sql, params)
    finally:
        cursor.close()


def copy(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    copy_insert(conn, STEPS, COLUMNS, rows)


def new_trajectory(engine: Engine) -> str:
    tid = uuid.uuid4().hex
    row = {
        "id": tid,
        "run_id": "bench",
        "prompt": "p",
        "group_id": "g",
        "sample_index": 0,
        "seed": 0,
        "status": "running",
        "rewards": {},
        "started_at": T0,
    }
    with engine.begin() as conn:
        conn.execute(insert(TrajectoryRow.__table__), [row])
    return tid


def measure(engine: Engine, method: Insert, n: int, batch: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per row for ``n`` rows in transactions of ``batch`` rows."""
    rows = step_rows(new_trajectory(engine), n)
    with engine.connect() as conn:
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, n, batch):
            with conn.begin():
                method(conn, rows[start : start + batch])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall / n * 1e6, cpu / n * 1e6


def report(results: dict[str, list[tuple[float, float]]]) -> None:
    repeats = len(next(iter(results.values())))
    print(f"{'method':<12} {'wall µs/row':>12} {'CPU µs/row':>11}   (median of {repeats})")
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"{name:<12} {wall:12.1f} {cpu:11.1f}")


def run(url: str, n: int, batch: int, repeats: int, methods: Sequence[tuple[str, Insert]]) -> None:
    store = TrajectoryStore(url)
    engine = store.db.writer
    with engine.begin() as conn:
        run_row = {"id": "bench", "name": "bench", "created_at": T0, "config": {}}
        conn.execute(insert(RunRow.__table__), [{**run_row, "status": "running"}])
    for _, method in methods:  # warm up: connections, caches, the type look-up
        measure(engine, method, batch, batch)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in methods}
    for _ in range(repeats):
        for name, method in methods:
            results[name].append(measure(engine, method, n, batch))
    store.close()
    report(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from tests.pg import PostgresServer  # the test suite's private-cluster helper

    server = PostgresServer()
    server.start()
    try:
        methods = [("executemany", executemany), ("copy", copy)]
        run(server.create_database(), args.rows, args.batch, args.repeats, methods)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
