"""Full-text search over prompts and step texts, and the indexes a paginated trace UI needs.

Revision ID: 0005_full_text_search
Revises: 0004_generation_requests
Create Date: 2026-11-23

Read by ``storage.search``. A trajectory's prompt and each step's text (its generations joined)
are indexed word by word:

* SQLite: a contentless FTS5 table ``search_text`` (tokenizer ``unicode61 remove_diacritics 0``,
  like PostgreSQL's ``simple`` configuration) over the texts numbered in ``search_documents``
  (``trajectory_id``, ``seq``: -1 for the prompt, else the step's). Indexing is deferred: the
  triggers on INSERT of ``trajectories`` and ``steps`` only number the new text (one small row),
  and ``storage.search.catch_up_search_index`` tokenises the texts numbered after
  ``search_state.indexed_through`` when a search needs them. Indexing in the triggers cost the
  recorder 39% of its steps/s (BENCHMARKS.md, issue 17) — the writer's path is the hot one.
  Triggers on DELETE and UPDATE unindex an indexed text at once (they fire for cascaded
  deletes too). Why not an FTS5 table with the texts' rowids as external content:
  ``trajectories`` and ``steps`` have no INTEGER PRIMARY KEY, and VACUUM or a table rebuild may
  renumber their rowids. Why not a trajectory id column in the FTS table: it cannot be indexed
  there, so deleting a run would scan the whole index once per deleted row. Each delete finds
  its document through the unique ``(trajectory_id, seq)`` index instead, and hands FTS5 the
  deleted text to unindex.
* PostgreSQL: GIN expression indexes on the ``tsvector`` of the prompt and of the step text,
  after replacing each run of punctuation, spaces and control characters by a space (see
  ``storage.schema.WORD_SEPARATORS``). They need nothing from the writers (COPY included).

Existing rows are indexed on upgrade on PostgreSQL (CREATE INDEX reads every step once: minutes
for a database of millions of steps); on SQLite they are numbered as pending documents, and the
first search indexes them.

For pages in start order, ``trajectories`` gets ``(run_id, started_at, id)`` and its
``(started_at)`` index becomes ``(started_at, id)`` (the order ``store.trajectories()``
returns); ``steps`` gets ``(trajectory_id, policy, policy_version)``, so that the policy
versions of a run's trajectories, or the trajectories of a policy version, are found without
reading the steps' wide rows; and ``trajectories`` gets a covering index of the columns a
run's summary and its filter choices aggregate (``storage.analysis.run_summary``,
``storage.search.filter_choices``), so that they read the index, not the wide rows (at 100,000
trajectories in one run: 290 → 120 ms and 130 → 70 ms).

A later migration that rebuilds ``trajectories`` or ``steps`` on SQLite (``batch_alter_table``
copies the table and drops the old one) drops their triggers: it must create them again.
Frozen copy of the schema at version 5 (this file never imports the live schema).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0005_full_text_search"
down_revision: str | None = "0004_generation_requests"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_WORDS = "to_tsvector('simple', regexp_replace({text}, '[[:punct:][:space:][:cntrl:]]+', ' ', 'g'))"

_SUMMARY_COLUMNS = (
    "run_id",
    "mode",
    "category",
    "status",
    "correct",
    "score",
    "image_count",
    "duration_s",
)
_STEP_TEXT = "coalesce(text, '')"
_PG_CREATE = (
    "CREATE INDEX ix_trajectories_prompt_words ON trajectories USING gin "
    f"({_WORDS.format(text='prompt')})",
    f"CREATE INDEX ix_steps_text_words ON steps USING gin ({_WORDS.format(text=_STEP_TEXT)})",
)
_PG_DROP = ("DROP INDEX ix_steps_text_words", "DROP INDEX ix_trajectories_prompt_words")

# The trajectory's prompt is indexed as seq -1; empty texts (and steps without text) are not.
# Ids never go back (AUTOINCREMENT): a document is indexed exactly when its id is at most
# search_state.indexed_through, the mark storage.search.catch_up_search_index moves.
_SQLITE_CREATE_TABLES = (
    "CREATE TABLE search_documents ("
    " id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,"
    " trajectory_id VARCHAR(64) NOT NULL,"
    " seq INTEGER NOT NULL)",
    "CREATE UNIQUE INDEX ix_search_documents_key ON search_documents (trajectory_id, seq)",
    "CREATE VIRTUAL TABLE search_text USING fts5("
    "body, content='', tokenize='unicode61 remove_diacritics 0')",
    "CREATE TABLE search_state (indexed_through INTEGER NOT NULL)",
    "INSERT INTO search_state (indexed_through) VALUES (0)",
)
# Existing texts become pending documents: the first search indexes them (not this migration).
_SQLITE_BACKFILL = (
    "INSERT INTO search_documents (trajectory_id, seq) "
    "SELECT id, -1 FROM trajectories WHERE prompt <> '' ORDER BY started_at, id",
    "INSERT INTO search_documents (trajectory_id, seq) "
    "SELECT trajectory_id, seq FROM steps WHERE text <> '' ORDER BY trajectory_id, seq",
)
_INDEXED = "id <= (SELECT indexed_through FROM search_state)"


def _pending(key: str, seq: str, body: str | None = None) -> str:
    """Trigger statement recording the document (``key``, ``seq``) as pending (if ``body``, only
    when it is not empty): one row, no tokenising on the writer's path."""
    where = f" WHERE {body} <> ''" if body else ""
    return f"INSERT INTO search_documents (trajectory_id, seq) SELECT {key}, {seq}{where};"


def _unindex(key: str, seq: str, body: str) -> str:
    """Trigger statements removing the document (``key``, ``seq``) whose text was ``body``:
    unindexed from FTS5 if it was indexed (a contentless table unindexes the words it is
    given), then forgotten."""
    return (
        "INSERT INTO search_text (search_text, rowid, body) SELECT 'delete', id, "
        f"{body} FROM search_documents WHERE trajectory_id = {key} AND seq = {seq} "
        f"AND {_INDEXED};\n"
        f"  DELETE FROM search_documents WHERE trajectory_id = {key} AND seq = {seq};"
    )


_SQLITE_TRIGGERS = {
    "search_trajectories_insert": "AFTER INSERT ON trajectories WHEN new.prompt <> '' BEGIN\n  "
    + _pending("new.id", "-1")
    + "\nEND",
    "search_trajectories_delete": "AFTER DELETE ON trajectories BEGIN\n  "
    + _unindex("old.id", "-1", "old.prompt")
    + "\nEND",
    "search_trajectories_update": "AFTER UPDATE OF id, prompt ON trajectories BEGIN\n  "
    + _unindex("old.id", "-1", "old.prompt")
    + "\n  "
    + _pending("new.id", "-1", "new.prompt")
    + "\nEND",
    "search_steps_insert": "AFTER INSERT ON steps WHEN new.text <> '' BEGIN\n  "
    + _pending("new.trajectory_id", "new.seq")
    + "\nEND",
    "search_steps_delete": "AFTER DELETE ON steps BEGIN\n  "
    + _unindex("old.trajectory_id", "old.seq", "old.text")
    + "\nEND",
    "search_steps_update": "AFTER UPDATE OF trajectory_id, seq, text ON steps BEGIN\n  "
    + _unindex("old.trajectory_id", "old.seq", "old.text")
    + "\n  "
    + _pending("new.trajectory_id", "new.seq", "new.text")
    + "\nEND",
}


def _set_schema_version(version: int, revision_id: str) -> None:
    op.execute(sa.text("DELETE FROM schema_version"))
    op.execute(
        sa.text(
            "INSERT INTO schema_version (version, revision, applied_at) VALUES (:v, :r, :t)"
        ).bindparams(v=version, r=revision_id, t=datetime.now(timezone.utc))
    )


def _execute(statements: Sequence[str]) -> None:
    for statement in statements:
        op.execute(sa.text(statement))


def upgrade() -> None:
    op.create_index("ix_trajectories_run_started", "trajectories", ["run_id", "started_at", "id"])
    op.drop_index("ix_trajectories_started", table_name="trajectories")
    op.create_index("ix_trajectories_started", "trajectories", ["started_at", "id"])
    op.create_index(
        "ix_steps_trajectory_policy", "steps", ["trajectory_id", "policy", "policy_version"]
    )
    op.create_index("ix_trajectories_run_summary", "trajectories", list(_SUMMARY_COLUMNS))
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        _execute(_PG_CREATE)
    elif dialect == "sqlite":
        _execute(_SQLITE_CREATE_TABLES)
        _execute(_SQLITE_BACKFILL)
        _execute([f"CREATE TRIGGER {name} {body}" for name, body in _SQLITE_TRIGGERS.items()])
    _set_schema_version(5, revision)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        _execute(_PG_DROP)
    elif dialect == "sqlite":
        _execute([f"DROP TRIGGER {name}" for name in _SQLITE_TRIGGERS])
        _execute(["DROP TABLE search_text", "DROP TABLE search_documents"])
        _execute(["DROP TABLE search_state"])
    op.drop_index("ix_trajectories_run_summary", table_name="trajectories")
    op.drop_index("ix_steps_trajectory_policy", table_name="steps")
    op.drop_index("ix_trajectories_started", table_name="trajectories")
    op.create_index("ix_trajectories_started", "trajectories", ["started_at"])
    op.drop_index("ix_trajectories_run_started", table_name="trajectories")
    _set_schema_version(4, "0004_generation_requests")
