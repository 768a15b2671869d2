"""Schema and connection behaviour: migrations equal the ORM, SQLite settings, lock retries."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import insert, select, text

from storage.engine import DatabaseLocked, normalise_url
from storage.migrate import MIGRATIONS_DIR, SchemaError
from storage.schema import (
    HEAD_REVISION,
    SCHEMA_VERSION,
    SQLITE_SEARCH_TABLES,
    Base,
    SchemaVersionRow,
)
from storage.store import TrajectoryStore


# The full-text GIN indexes exist on PostgreSQL only (compared there); SQLite cannot compare them.
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based")
def test_upgrading_an_empty_database_yields_exactly_the_orm_schema(store):
    with store.db.writer.connect() as conn:
        # SQLite's full-text index (FTS5 and shadow tables, trigger-kept) has no ORM form.
        opts = {
            "compare_type": True,
            "include_name": lambda name, kind, _: (
                kind != "table" or name not in SQLITE_SEARCH_TABLES
            ),
        }
        diff = compare_metadata(MigrationContext.configure(conn, opts=opts), Base.metadata)
    assert diff == []
    with store.db.read() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == HEAD_REVISION
        assert conn.execute(select(SchemaVersionRow.version, SchemaVersionRow.revision)).all() == [
            (SCHEMA_VERSION, HEAD_REVISION)
        ]


def test_head_revision_constant_is_the_migrations_head():
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    assert ScriptDirectory.from_config(config).get_heads() == [HEAD_REVISION]


def test_reopening_is_a_no_op_and_an_unknown_revision_is_refused(db_url):
    TrajectoryStore(db_url).close()
    TrajectoryStore(db_url).close()  # already at head: nothing to do
    store = TrajectoryStore(db_url)
    store.db.write(lambda c: c.execute(text("UPDATE alembic_version SET version_num='9999_x'")))
    store.close()
    with pytest.raises(SchemaError, match="9999_x"):
        TrajectoryStore(db_url)


@pytest.mark.parametrize("synchronous,level", [("NORMAL", 1), ("FULL", 2)])
def test_sqlite_runs_in_wal_with_foreign_keys_and_the_chosen_durability(
    tmp_path, synchronous, level
):
    with TrajectoryStore(
        f"sqlite:///{tmp_path / 'a.db'}", synchronous=synchronous, busy_timeout_s=7
    ) as store:
        for engine in (store.db.writer, store.db.reader):
            with engine.connect() as conn:
                pragma = lambda name, c=conn: c.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
                assert pragma("journal_mode") == "wal"
                assert pragma("synchronous") == level
                assert pragma("foreign_keys") == 1
                assert pragma("busy_timeout") == 7000


def test_in_memory_sqlite_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="file"):
        TrajectoryStore("sqlite://")
    with pytest.raises(ValueError, match="synchronous"):
        TrajectoryStore("sqlite:///x.db", synchronous="SOMETIMES")
    assert normalise_url("postgresql://u@h/db").drivername == "postgresql+psycopg"


def hold_write_lock(path, seconds: float, locked: threading.Event) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    locked.set()
    time.sleep(seconds)
    conn.execute("COMMIT")
    conn.close()


def test_a_write_outlasting_the_busy_timeout_is_retried_until_the_lock_is_free(tmp_path):
    path = tmp_path / "a.db"
    store = TrajectoryStore(f"sqlite:///{path}", busy_timeout_s=0.02)
    locked = threading.Event()
    holder = threading.Thread(target=hold_write_lock, args=(path, 0.4, locked))
    holder.start()
    locked.wait()
    started = time.monotonic()
    run = store.create_run("after the lock")  # waits out the other writer, then commits
    holder.join()
    assert time.monotonic() - started >= 0.3
    assert store.db.retries > 0
    assert store.run(run.id).name == "after the lock"
    store.close()


def test_a_lock_held_past_the_retry_budget_raises(tmp_path):
    path = tmp_path / "a.db"
    store = TrajectoryStore(f"sqlite:///{path}", busy_timeout_s=0.01, lock_retry_s=0.1)
    locked = threading.Event()
    holder = threading.Thread(target=hold_write_lock, args=(path, 0.6, locked))
    holder.start()
    locked.wait()
    with pytest.raises(DatabaseLocked):
        store.create_run()
    holder.join()
    store.close()


def test_readers_are_not_blocked_by_a_writer(tmp_path):
    path = tmp_path / "a.db"
    store = TrajectoryStore(f"sqlite:///{path}", busy_timeout_s=0.01, lock_retry_s=0.0)
    run = store.create_run("visible")
    locked = threading.Event()
    holder = threading.Thread(target=hold_write_lock, args=(path, 0.3, locked))
    holder.start()
    locked.wait()
    assert [r.id for r in store.runs()] == [run.id]  # WAL: the read needs no lock
    holder.join()
    store.close()


def _migrate(db, revision: str, downgrade: bool = False) -> None:
    from alembic import command

    def run(conn) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = conn
        (command.downgrade if downgrade else command.upgrade)(config, revision)

    db.write(run)


def _has_ref_index(db) -> bool:
    from sqlalchemy import inspect

    with db.read() as conn:
        return "ix_step_images_ref" in {i["name"] for i in inspect(conn).get_indexes("step_images")}


def test_a_version_2_database_with_data_upgrades_in_place_and_downgrades(db_url):
    from storage.engine import Database
    from storage.schema import ImageRow, RunRow, StepImageRow, StepRow, TrajectoryRow

    ref = "ab" * 32
    db = Database(db_url)
    _migrate(db, "0002_diffusion_transitions")
    assert _has_ref_index(db)
    now = datetime.now(timezone.utc)

    def old_rows(conn) -> None:
        conn.execute(
            insert(RunRow),
            [{"id": "r", "name": "r", "created_at": now, "status": "finished", "config": {}}],
        )
        conn.execute(
            insert(TrajectoryRow),
            [{"id": "t", "run_id": "r", "prompt": "p", "group_id": "g", "sample_index": 0,
              "seed": 1, "status": "succeeded", "image_count": 1, "rewards": {},
              "started_at": now, "initial_state": {"trajectory_id": "t"}}],
        )  # fmt: skip
        conn.execute(
            insert(ImageRow),
            [{"sha256": ref, "data": b"png", "width": 2, "height": 3, "size": 3,
              "created_at": now}],
        )  # fmt: skip
        conn.execute(
            insert(StepRow),
            [{"trajectory_id": "t", "seq": 0, "node": "draw", "stage": "reason",
              "state_before": {"trajectory_id": "t", "step_count": 0},
              "state_update": {"step_count": 1}, "latency_s": 0.5, "started_at": now,
              "models": []}],
        )  # fmt: skip
        conn.execute(
            insert(StepImageRow),
            [{"trajectory_id": "t", "step_seq": 0, "direction": "out", "position": 0,
              "ref": ref}],
        )  # fmt: skip

    db.write(old_rows)
    db.dispose()

    with TrajectoryStore(db_url) as store:  # opening it upgrades it to head
        [step] = store.steps("t")
        assert (step.node, step.update, [i.ref for i in step.images_out]) == (
            "draw",
            {"step_count": 1},
            [ref],
        )
        assert not _has_ref_index(store.db)
        with store.db.read() as conn:
            assert conn.execute(select(SchemaVersionRow.version)).scalar() == SCHEMA_VERSION == 6
        _migrate(store.db, "0002_diffusion_transitions", downgrade=True)
        assert _has_ref_index(store.db)
        with store.db.read() as conn:
            assert conn.execute(select(SchemaVersionRow.version)).scalar() == 2
            # (This code's store reads version-4 generations: read version 2's rows directly.)
            refs = conn.execute(text("SELECT ref FROM step_images WHERE trajectory_id = 't'"))
            assert refs.scalars().all() == [ref]


def _generation_columns(db) -> set[str]:
    from sqlalchemy import inspect

    with db.read() as conn:
        return {c["name"] for c in inspect(conn).get_columns("generations")}


def test_a_version_3_database_keeps_its_generations_and_reads_them_with_no_request(db_url):
    """Generations recorded before version 4 have no stored request: they upgrade in place
    and read back with None for messages, sampling and prompt_token_ids; new ones keep them."""
    from storage.codec import pack_ids, pack_logprobs
    from storage.engine import Database

    db = Database(db_url)
    _migrate(db, "0003_drop_step_images_ref_index")
    assert "messages" not in _generation_columns(db)
    now = datetime.now(timezone.utc)

    def old_rows(conn) -> None:
        # Plain SQL: the ORM tables are this code's (version 4) and name the new columns.
        conn.execute(
            text(
                "INSERT INTO runs (id, name, created_at, status, config) "
                "VALUES ('r', 'r', :now, 'finished', '{}')"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO trajectories (id, run_id, prompt, group_id, sample_index, seed, "
                "status, image_count, rewards, started_at, initial_state) VALUES ('t', 'r', "
                "'p', 'g', 0, 1, 'succeeded', 0, '{}', :now, '{\"trajectory_id\": \"t\"}')"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO steps (trajectory_id, seq, node, stage, state_before, "
                "state_update, latency_s, started_at, models) VALUES ('t', 0, 'plan', "
                "'reason', '{\"trajectory_id\": \"t\"}', '{}', 0.5, :now, '[]')"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO generations (trajectory_id, step_seq, position, role, text, model, "
                "latency_s, n_tokens, token_ids, logprobs) VALUES ('t', 0, 0, 'plan', "
                "'a blueprint', 'lm', 0.25, 2, :ids, :lps)"
            ),
            {"ids": pack_ids([5, 7]), "lps": pack_logprobs([-0.5, -1.5])},
        )

    db.write(old_rows)
    db.dispose()

    with TrajectoryStore(db_url) as store:  # opening it upgrades it to head
        [generation] = store.steps("t")[0].generations
        assert (generation.text, generation.token_ids, generation.logprobs) == (
            "a blueprint",
            (5, 7),
            (-0.5, -1.5),
        )
        assert generation.messages is None and generation.sampling is None
        assert generation.prompt_token_ids is None
        assert {"messages", "sampling", "prompt_token_ids"} <= _generation_columns(store.db)
        _migrate(store.db, "0003_drop_step_images_ref_index", downgrade=True)
        assert "messages" not in _generation_columns(store.db)
        with store.db.read() as conn:
            assert conn.execute(select(SchemaVersionRow.version)).scalar() == 3
            assert conn.execute(text("SELECT text FROM generations")).scalar() == "a blueprint"


def test_an_escalated_decompose_draw_is_a_decompose_stage_step():
    from storage.schema import derive_stage

    subtasks = [{"instruction": "Draw a red circle.", "expect": "a red circle"}]
    escalated = {"mode": "escalate", "stage": "decompose", "subtasks": subtasks}
    assert derive_stage("draw", escalated, {}) == "decompose"
    direct = {"mode": "escalate", "stage": "direct", "subtasks": []}
    assert derive_stage("draw", direct, {}) == "reason"
    assert derive_stage("draw", {"mode": "decompose", "subtasks": subtasks}, {}) == "decompose"
    assert derive_stage("draw", {"mode": "reflect"}, {}) == "reason"
