"""``storage.pg_copy.copy_insert`` stores exactly what a Core ``insert`` stores (PostgreSQL)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import JSON, Column, Table, Text, cast, create_engine, insert, select
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from storage.codec import pack_ids, pack_logprobs
from storage.pg_copy import copy_insert
from storage.schema import GenerationRow, ImageRow, RunRow, StepImageRow, StepRow, TrajectoryRow
from storage.store import TrajectoryStore
from tests.pg import PostgresServer

UTC = timezone.utc
T0 = datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30)))
TEXTS = [
    "",
    "plain",
    "ünïcödé — 日本語 🎨 e\u0301 \u2028 \ufeff",
    "tab\there\tand\vthere",
    "new\nline\r\nand\rcarriage",
    "quote \" and ' and `",
    "back\\slash \\N \\x00 \\\\ \\t",
    "\\N",
    "NULL",
    "\\.",
]
FLOATS = [1e-300, -0.0, 5e-324, 1.7976931348623157e308, 0.1, -1.5e-10, 3, 0.0]
LARGE = {"items": [{"i": i, "text": TEXTS[i % len(TEXTS)], "x": i / 7} for i in range(20_000)]}
JSON_VALUES: list[Any] = [
    {"strings": TEXTS, "floats": FLOATS, "nested": {"a": [1, [2, [3, {}]]], "b": None}},
    JSON.NULL,
    "a JSON string with \\ and \t and \n and \" and ' quotes",
    42,
    1e-300,
    -0.0,
    [],
    {},
    [None, True, False, "ü"],
    # orjson (the engine's serializer) handles these; json.dumps would fail or write NaN.
    {"when": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), 1: "int key", "nan": math.nan},
    LARGE,
]


@pytest.fixture
def pg_store(pg_server: PostgresServer) -> Iterator[TrajectoryStore]:
    store = TrajectoryStore(pg_server.create_database())
    with store.db.writer.begin() as conn:
        conn.execute(
            insert(RunRow.__table__),
            [{"id": "run", "name": "run", "created_at": T0, "config": {}, "status": "running"}],
        )
        conn.execute(insert(ImageRow.__table__), [image_row(i) for i in range(3)])
    yield store
    store.close()


def image_row(i: int) -> dict[str, Any]:
    return {
        "sha256": f"{i:064x}",
        "data": b"png",
        "width": 8,
        "height": 8,
        "size": 3,
        "created_at": T0,
    }


def trajectory_row(tid: str, i: int = 0) -> dict[str, Any]:
    return {
        "id": tid,
        "run_id": "run",
        "prompt": TEXTS[i % len(TEXTS)] + " a red circle",
        "category": None if i % 2 else TEXTS[i % len(TEXTS)],
        "group_id": "g",
        "sample_index": i,
        "seed": (2**63 - 1) if i % 2 else -(2**63),
        "mode": None,
        "status": "running",
        "final_image": None,
        "image_count": i,
        "score": FLOATS[i % len(FLOATS)] if i % 3 else None,
        "correct": (True, False, None)[i % 3],
        "rewards": JSON_VALUES[i % len(JSON_VALUES)] if i % 5 != 1 else {},
        "started_at": T0 + timedelta(days=i * 400, microseconds=i),
        "finished_at": None if i % 2 else datetime(1970, 1, 1, tzinfo=UTC),
        "duration_s": FLOATS[(i + 1) % len(FLOATS)],
        "error": None,
        # None: SQL NULL (none_as_null); JSON.NULL: the JSON value null.
        "initial_state": (None, JSON.NULL, {"s": TEXTS})[i % 3],
        "final_state": JSON_VALUES[i % len(JSON_VALUES)],
    }


def step_row(tid: str, seq: int) -> dict[str, Any]:
    return {
        "trajectory_id": tid,
        "seq": seq,
        "node": TEXTS[seq % len(TEXTS)],
        "stage": "reflect_refine",
        "state_before": JSON_VALUES[seq % len(JSON_VALUES)],
        "state_update": JSON_VALUES[(seq + 1) % len(JSON_VALUES)],
        "text": None if seq % 4 == 3 else TEXTS[seq % len(TEXTS)] * (1 + seq),
        "latency_s": FLOATS[seq % len(FLOATS)],
        "started_at": T0.astimezone(UTC) + timedelta(seconds=seq),
        "error": "Traceback:\n\tline 1\\n" if seq % 3 == 0 else None,
        "models": ["m1", "ü\tm2"] if seq % 2 else [],
        "policy": None if seq % 2 else "π-policy",
        "policy_version": "",
    }


def generation_row(tid: str, seq: int, position: int) -> dict[str, Any]:
    ids = [0, 2**31 - 1, -(2**31), position]
    return {
        "trajectory_id": tid,
        "step_seq": seq,
        "position": position,
        "role": "reflector",
        "text": TEXTS[(seq + position) % len(TEXTS)],
        "model": "model/ü",
        "latency_s": FLOATS[position % len(FLOATS)],
        "n_tokens": len(ids),
        "token_ids": pack_ids(ids) if position else b"",
        "logprobs": pack_logprobs([-1e-300, -0.0, -5e-324]) + b"\x00" * position,
        # The request as sent: a message with an image-ref part, and one without (SQL NULL).
        "messages": [
            {"role": "system", "content": TEXTS[seq % len(TEXTS)]},
            {"role": "user", "content": [{"type": "image_ref", "ref": f"{seq:064x}"}]},
        ]
        if position
        else None,
        "sampling": {"temperature": FLOATS[seq % len(FLOATS)], "seed": 2**63 - 1, "top_k": None},
        "prompt_token_ids": pack_ids(ids[::-1]) if seq % 2 else None,
    }


def step_image_row(tid: str, seq: int, position: int) -> dict[str, Any]:
    return {
        "trajectory_id": tid,
        "step_seq": seq,
        "direction": ("in", "out")[position % 2],
        "position": position,
        "ref": f"{position:064x}",
    }


def rows_for(tid: str) -> dict[Table, list[dict[str, Any]]]:
    seqs = range(len(JSON_VALUES) + len(TEXTS))
    return {
        StepRow.__table__: [step_row(tid, seq) for seq in seqs],
        GenerationRow.__table__: [generation_row(tid, seq, p) for seq in seqs for p in range(2)],
        StepImageRow.__table__: [step_image_row(tid, seq, p) for seq in seqs for p in range(3)],
    }


def copy_rows(conn: Any, table: Table, rows: list[dict[str, Any]]) -> None:
    columns = tuple(rows[0])
    copy_insert(conn, table, columns, [tuple(row[c] for c in columns) for row in rows])


def read_back(conn: Any, table: Table, key: Column[Any], value: str) -> list[tuple[Any, ...]]:
    """Rows of one trajectory without its id, JSON columns also as their stored text (which
    tells SQL NULL from JSON null), ordered by primary key."""
    columns = [c for c in table.columns if c is not key]
    texts = [cast(c, Text).label(f"{c.name}_text") for c in columns if isinstance(c.type, JSON)]
    query = select(*columns, *texts).where(key == value).order_by(*table.primary_key.columns)
    return [tuple(row) for row in conn.execute(query)]


def exact(value: Any) -> Any:
    """Floats compared bit for bit (-0.0 is not 0.0; NaN equals NaN)."""
    if isinstance(value, float):
        return ("float", math.copysign(1.0, value), repr(value))
    if isinstance(value, (list, tuple)):
        return [exact(v) for v in value]
    if isinstance(value, dict):
        return {k: exact(v) for k, v in value.items()}
    return value


def assert_same(core: list[tuple[Any, ...]], copied: list[tuple[Any, ...]], names: list[str]):
    assert len(core) == len(copied) > 0
    for core_row, copied_row in zip(core, copied, strict=True):
        for name, a, b in zip(names, core_row, copied_row, strict=True):
            assert exact(a) == exact(b), f"column {name}: {a!r:.200} != {b!r:.200}"


def column_names(table: Table, key: Column[Any]) -> list[str]:
    columns = [c for c in table.columns if c is not key]
    return [c.name for c in columns] + [
        f"{c.name}_text" for c in columns if isinstance(c.type, JSON)
    ]


def test_copy_stores_what_core_insert_stores(pg_store: TrajectoryStore) -> None:
    engine = pg_store.db.writer
    with engine.begin() as conn:
        conn.execute(insert(TrajectoryRow.__table__), [trajectory_row("core", 0)])
        copy_rows(conn, TrajectoryRow.__table__, [trajectory_row("copy", 0)])
    with engine.begin() as conn:
        for table, rows in rows_for("core").items():
            conn.execute(insert(table), rows)
    with engine.begin() as conn:
        for table, rows in rows_for("copy").items():
            copy_rows(conn, table, rows)
    with pg_store.db.read() as conn:
        for table, key in (
            (StepRow.__table__, StepRow.__table__.c.trajectory_id),
            (GenerationRow.__table__, GenerationRow.__table__.c.trajectory_id),
            (StepImageRow.__table__, StepImageRow.__table__.c.trajectory_id),
        ):
            core = read_back(conn, table, key, "core")
            copied = read_back(conn, table, key, "copy")
            assert_same(core, copied, column_names(table, key))
        step = conn.execute(select(StepRow.state_before, StepRow.state_update).limit(1)).one()
        assert step.state_before["strings"] == TEXTS
    # The edge cases really are there (not both sides read back as the same wrong thing).
    with pg_store.db.read() as conn:
        rows = read_back(conn, StepRow.__table__, StepRow.__table__.c.trajectory_id, "copy")
        names = column_names(StepRow.__table__, StepRow.__table__.c.trajectory_id)
        by_seq = {row[0]: dict(zip(names, row, strict=True)) for row in rows}
        assert by_seq[1]["state_before_text"] == "null"  # JSON.NULL -> JSON null
        assert by_seq[1]["latency_s"] == 0.0 and math.copysign(1, by_seq[1]["latency_s"]) < 0
        assert by_seq[0]["latency_s"] == 1e-300
        assert by_seq[9]["state_before"]["when"] == "2024-01-02T03:04:05+00:00"
        assert by_seq[9]["state_before"]["nan"] is None
        assert by_seq[2]["state_before"] == JSON_VALUES[2]
        table = GenerationRow.__table__
        names = column_names(table, table.c.trajectory_id)
        gens = [
            dict(zip(names, row, strict=True))
            for row in read_back(conn, table, table.c.trajectory_id, "copy")
        ]
        assert gens[0]["token_ids"] == b"" and gens[1]["logprobs"].endswith(b"\x00")
        assert gens[0]["messages"] is None and gens[0]["messages_text"] is None  # SQL NULL
        assert gens[1]["messages"][1]["content"][0]["type"] == "image_ref"
        assert gens[0]["prompt_token_ids"] is None and gens[2]["prompt_token_ids"] is not None


def test_trajectories_nulls_booleans_bigints(pg_store: TrajectoryStore) -> None:
    n = 2 * len(JSON_VALUES)
    table = TrajectoryRow.__table__
    with pg_store.db.writer.begin() as conn:
        conn.execute(insert(table), [trajectory_row(f"core-{i:03}", i) for i in range(n)])
        copy_rows(conn, table, [trajectory_row(f"copy-{i:03}", i) for i in range(n)])
    with pg_store.db.read() as conn:
        names = column_names(table, table.c.id)
        core = [read_back(conn, table, table.c.id, f"core-{i:03}")[0] for i in range(n)]
        copied = [read_back(conn, table, table.c.id, f"copy-{i:03}")[0] for i in range(n)]
        assert_same(core, copied, names)
        initial = [dict(zip(names, row, strict=True))["initial_state_text"] for row in copied]
    assert initial[:3] == [None, "null", initial[2]]  # None -> SQL NULL, JSON.NULL -> null
    assert initial[2] is not None


def test_foreign_key_violation_is_dbapi_error_and_store_stays_usable(
    pg_store: TrajectoryStore,
) -> None:
    table = StepRow.__table__
    columns = tuple(step_row("x", 0))
    orphan = [tuple(step_row("no-such-trajectory", 0).values())]
    with pytest.raises(IntegrityError) as raised:
        pg_store.db.write(lambda conn: copy_insert(conn, table, columns, orphan))
    assert isinstance(raised.value, DBAPIError)
    assert getattr(raised.value.orig, "sqlstate", None) == "23503"
    assert "COPY" in str(raised.value)

    good = [tuple(step_row("t", seq).values()) for seq in range(3)]

    def write(conn: Any) -> None:
        conn.execute(insert(TrajectoryRow.__table__), [trajectory_row("t")])
        copy_insert(conn, table, columns, good)

    pg_store.db.write(write)
    with pg_store.db.read() as conn:
        assert conn.execute(select(StepRow.seq).order_by(StepRow.seq)).scalars().all() == [0, 1, 2]


def test_not_null_violation_rolls_back_the_transaction(pg_store: TrajectoryStore) -> None:
    table = StepRow.__table__
    columns = tuple(step_row("x", 0))
    with pg_store.db.writer.connect() as conn:
        transaction = conn.begin()
        conn.execute(insert(TrajectoryRow.__table__), [trajectory_row("t")])
        bad = step_row("t", 0) | {"state_before": None}  # none_as_null: SQL NULL
        with pytest.raises(IntegrityError) as raised:
            copy_insert(conn, table, columns, [tuple(bad.values())])
        assert raised.value.orig.sqlstate == "23502"
        transaction.rollback()
        with conn.begin():
            conn.execute(insert(TrajectoryRow.__table__), [trajectory_row("t")])
            copy_insert(conn, table, columns, [tuple(step_row("t", 0).values())])
    with pg_store.db.read() as conn:
        assert conn.execute(select(StepRow.trajectory_id, StepRow.seq)).all() == [("t", 0)]


@pytest.mark.parametrize(
    ("column", "value"), [("sample_index", 2**31), ("sample_index", -(2**31) - 1), ("seed", 2**63)]
)
def test_integers_out_of_range_fail_as_with_core(
    pg_store: TrajectoryStore, column: str, value: int
) -> None:
    """Binary COPY would wrap an int4 around (2**31 -> -2**31): refused, as Core's INSERT is."""
    table = TrajectoryRow.__table__
    row = trajectory_row("t") | {column: value}
    for insert_rows in (
        lambda conn: conn.execute(insert(table), [row]),
        lambda conn: copy_insert(conn, table, tuple(row), [tuple(row.values())]),
    ):
        with pytest.raises(DataError) as raised:
            pg_store.db.write(insert_rows)
        assert raised.value.orig.sqlstate == "22003"  # numeric_value_out_of_range
    edge = trajectory_row("edge") | {"sample_index": 2**31 - 1, "seed": 2**63 - 1}
    pg_store.db.write(lambda conn: copy_insert(conn, table, tuple(edge), [tuple(edge.values())]))
    with pg_store.db.read() as conn:
        assert conn.execute(select(TrajectoryRow.sample_index, TrajectoryRow.seed)).all() == [
            (2**31 - 1, 2**63 - 1)
        ]


def test_error_in_python_aborts_the_copy(pg_store: TrajectoryStore) -> None:
    """A value psycopg cannot encode (a naive datetime) fails before anything is stored."""
    table = StepRow.__table__
    columns = tuple(step_row("x", 0))
    naive = step_row("t", 1) | {"started_at": datetime(2024, 1, 1)}
    rows = [tuple(step_row("t", 0).values()), tuple(naive.values())]

    def write(conn: Any) -> None:
        conn.execute(insert(TrajectoryRow.__table__), [trajectory_row("t")])
        copy_insert(conn, table, columns, rows)

    with pytest.raises(TypeError):
        pg_store.db.write(write)
    pg_store.db.write(
        lambda conn: conn.execute(insert(TrajectoryRow.__table__), [trajectory_row("t")])
    )
    with pg_store.db.read() as conn:
        assert conn.execute(select(StepRow.seq)).all() == []
        assert conn.execute(select(TrajectoryRow.id)).scalars().all() == ["t"]


def test_empty_rows_do_nothing(pg_store: TrajectoryStore) -> None:
    with pg_store.db.writer.begin() as conn:
        copy_insert(conn, StepRow.__table__, ("no_such_column",), [])


def test_other_dialects_are_refused(tmp_path: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.begin() as conn, pytest.raises(NotImplementedError):
        copy_insert(conn, StepRow.__table__, ("seq",), [(1,)])
    engine.dispose()


async def test_the_recorder_copies_large_batches_and_reads_back_every_step(
    pg_store: TrajectoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import storage.pg_copy as pg_copy
    from agent_graph.runner import Runner, make_group_tasks
    from storage.recorder import SQLRecorder
    from tests.pg import graph_context

    copied: list[tuple[str, int]] = []
    real = pg_copy.copy_insert

    def spy(conn: Any, table: Table, columns: tuple[str, ...], rows: Any) -> None:
        copied.append((table.name, len(rows)))
        real(conn, table, columns, rows)

    monkeypatch.setattr(pg_copy, "copy_insert", spy)
    tasks = make_group_tasks(["two red circles", "a star above a green triangle"] * 16, 2, 5)
    async with SQLRecorder(pg_store, "copied") as recorder:
        results = await Runner(graph_context(pg_store, recorder), concurrency=64).run(tasks)
    assert {name for name, _ in copied} >= {"steps", "step_images"}
    assert all(count >= 16 for _, count in copied)
    for result in results:
        stored = pg_store.steps(result.trajectory_id)
        assert [(s.seq, s.node, s.text) for s in stored] == [
            (s.seq, s.node, "\n\n".join(g.text for g in s.trace.generations) or None)
            for s in result.steps
        ]
        assert [[i.ref for i in s.images_out] for s in stored] == [
            s.trace.images_out for s in result.steps
        ]
