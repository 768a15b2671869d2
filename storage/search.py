"""Trajectories page by page, filtered and searched by the database, for a trace UI.

::

    where = TrajectoryFilter(run=run.id, mode="reflect", correct=False, text="red circle")
    page = search_trajectories(store, where, offset=50, limit=50)
    page.items, page.total                  # TrajectorySummary list; how many match in all
    filter_choices(store, run.id)["policy_version"]   # ["uniform@1", ...]: a drop-down's values

Filters combine with AND; a field left None does not filter. ``run``, ``mode``, ``status``,
``category`` and ``group`` compare exactly; ``min_score`` and ``max_score`` bound the final judge
score inclusively (a trajectory without a score matches neither); ``policy_version``
(``"name@version"``, as :func:`filter_choices` lists them) keeps the trajectories with at least
one step recorded with that policy name and version. A page is in the order of
``store.trajectories()``: ``(started_at, id)``; ``total`` and the page are read in one
transaction, so they agree.

Full text (``text``), with the same results on SQLite and PostgreSQL:

* The query is split into words: maximal runs of Unicode letters and digits, lowercased (any
  other character, ``_`` included, separates words). Their order and repetitions do not matter.
* A trajectory matches when its prompt, or the text of one of its steps (the step's generations
  joined: plans, reflections, decompositions), contains every word as a whole word, ignoring
  case: ``circle`` finds "Circle." and "<think>a circle</think>" but not "circles"; ``red
  circle`` needs both words in the prompt or both in one step's text.
* There are no operators, prefixes, phrases or stemming: quotes, ``*``, ``OR``, ``NEAR(``,
  ``-``, ``:`` or ``'; drop table`` are searched as the plain words they contain.
* A query without any word (``""``, ``"?!"``) matches nothing; the UI passes None for an empty
  search box (no text filter).

How: on SQLite, an FTS5 index (tokenizer ``unicode61 remove_diacritics 0``) over the prompts and
step texts (migration 0005), queried with each word as a quoted FTS5 string. Triggers number each
new text as a pending document and a text search first indexes the pending ones
(:func:`catch_up_search_index`, a short write transaction): the recorder's path stays free of
tokenising, and a search always sees every committed text;
on PostgreSQL, GIN indexes on ``to_tsvector('simple', ...)`` of the same texts with punctuation
replaced by spaces (``storage.schema.words_vector``), queried with ``plainto_tsquery('simple',
words)``. The words always travel as a bound parameter, never inside the SQL text.

Where the two tokenizers still differ (rare text): characters of Unicode category No (``²``,
``½``) are word characters for SQLite and separators for PostgreSQL; PostgreSQL leaves out words
longer than 2,047 characters; on a PostgreSQL database whose ``LC_CTYPE`` is C or POSIX,
PostgreSQL tells letters from punctuation and folds case only among ASCII characters (a UTF-8
locale such as ``C.UTF-8`` or ``en_US.UTF-8`` behaves like SQLite).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    column,
    false,
    func,
    literal_column,
    or_,
    select,
    table,
    text,
    union,
)
from sqlalchemy.exc import OperationalError

from storage.records import TrajectorySummary
from storage.schema import (
    TRAJECTORY_STATUSES,
    StepRow,
    TrajectoryRow,
    step_words_vector,
    words_vector,
)
from storage.store import (
    SUMMARY_COLUMNS,
    TrajectoryStore,
    summary_from_row,
    trajectory_filters,
)

log = logging.getLogger(__name__)

MAX_LIMIT = 500
"""The most trajectories one page may hold."""

_WORD = re.compile(r"[^\W_]+")  # letters and digits: \w without the underscore

# SQLite's full-text index (migration 0005): the FTS5 table and the texts it numbers.
_FTS = table("search_text", column("rowid"), column("search_text"))
_DOCUMENTS = table("search_documents", column("id"), column("trajectory_id"))


@dataclass(frozen=True)
class TrajectoryFilter:
    """What the trajectories of a page must be (every field given, all together)."""

    run: str | None = None
    """Run id (exact)."""
    mode: str | None = None
    status: str | None = None
    """One of ``TRAJECTORY_STATUSES``."""
    category: str | None = None
    correct: bool | None = None
    min_score: float | None = None
    max_score: float | None = None
    group: str | None = None
    """GRPO group id (exact)."""
    policy_version: str | None = None
    """``"name@version"``: a trajectory with a step recorded with that policy version."""
    text: str | None = None
    """Words, all in the prompt or all in one step's text (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in TRAJECTORY_STATUSES:
            raise ValueError(f"status must be one of {TRAJECTORY_STATUSES}, not {self.status!r}")
        if self.policy_version is not None and "@" not in self.policy_version:
            raise ValueError(f"policy_version must be 'name@version', not {self.policy_version!r}")


@dataclass
class TrajectoryPage:
    items: list[TrajectorySummary]
    """The page's trajectories, by ``(started_at, id)``."""
    total: int
    """How many trajectories match the filter, in all pages."""
    offset: int
    limit: int


def search_trajectories(
    store: TrajectoryStore, where: TrajectoryFilter, *, offset: int = 0, limit: int = 50
) -> TrajectoryPage:
    """The ``limit`` trajectories matching ``where`` after the first ``offset`` of them, in
    ``store.trajectories()`` order, with how many match in all."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be from 1 to {MAX_LIMIT}, not {limit}")
    if offset < 0:
        raise ValueError(f"offset must be 0 or more, not {offset}")
    if where.text is not None and store.db.dialect == "sqlite":
        catch_up_search_index(store)
    filters = _filters(where, store.db.dialect)
    order = (TrajectoryRow.started_at, TrajectoryRow.id)
    page = select(*SUMMARY_COLUMNS).where(*filters).order_by(*order).offset(offset).limit(limit)
    with store.db.read() as conn:
        items = [summary_from_row(row) for row in conn.execute(page)]
        if len(items) < limit and (items or offset == 0):
            total = offset + len(items)  # the last page: no count needed
        else:
            count = select(func.count()).select_from(TrajectoryRow).where(*filters)
            total = int(conn.scalar(count) or 0)
    return TrajectoryPage(items, total, offset, limit)


def catch_up_search_index(store: TrajectoryStore) -> int:
    """SQLite: index the texts recorded since the last call (numbered by the triggers as pending
    documents); returns how many. A no-op read when none is pending, and on PostgreSQL (its GIN
    indexes are kept by the database). A store that cannot be written (a read-only file) is
    searched as far as it is indexed."""
    if store.db.dialect != "sqlite":
        return 0
    pending = text(
        "SELECT (SELECT max(id) FROM search_documents), (SELECT indexed_through FROM search_state)"
    )
    with store.db.read() as conn:
        top, mark = conn.execute(pending).one()
    if top is None or top <= mark:
        return 0

    def work(conn: Connection) -> int:
        top, mark = conn.execute(pending).one()  # again: another process may have done it
        if top is None or top <= mark:
            return 0
        bounds = {"mark": mark, "top": top}
        conn.execute(_INDEX_PROMPTS, bounds)
        conn.execute(_INDEX_STEPS, bounds)
        conn.execute(text("UPDATE search_state SET indexed_through = :top"), bounds)
        return int(top - mark)

    try:
        return store.db.write(work)
    except OperationalError as exc:  # read-only: search what is indexed
        log.warning("the search index cannot catch up (%s): recent texts are not searched", exc)
        return 0


_INDEX_PROMPTS = text(
    "INSERT INTO search_text (rowid, body) SELECT d.id, t.prompt FROM search_documents d "
    "JOIN trajectories t ON t.id = d.trajectory_id "
    "WHERE d.seq = -1 AND d.id > :mark AND d.id <= :top"
)
_INDEX_STEPS = text(
    "INSERT INTO search_text (rowid, body) SELECT d.id, s.text FROM search_documents d "
    "JOIN steps s ON s.trajectory_id = d.trajectory_id AND s.seq = d.seq "
    "WHERE d.seq >= 0 AND d.id > :mark AND d.id <= :top"
)


def filter_choices(store: TrajectoryStore, run: str | None) -> dict[str, list[str]]:
    """The values present among the trajectories of ``run`` (of every run for None), sorted,
    for the UI's drop-downs: ``mode``, ``status``, ``category`` and ``policy_version``
    (``"name@version"`` of the policies their steps were recorded with). NULLs are left out."""
    in_run = [] if run is None else [TrajectoryRow.run_id == run]
    values = select(TrajectoryRow.mode, TrajectoryRow.status, TrajectoryRow.category)
    policies = select(StepRow.policy, StepRow.policy_version).where(
        StepRow.policy.is_not(None), StepRow.policy_version.is_not(None)
    )
    if run is not None:
        policies = policies.where(
            StepRow.trajectory_id.in_(select(TrajectoryRow.id).where(*in_run))
        )
    with store.db.read() as conn:
        rows = conn.execute(values.where(*in_run).distinct()).all()
        pairs = conn.execute(policies.distinct()).all()
    return {
        "mode": sorted({r.mode for r in rows if r.mode is not None}),
        "status": sorted({r.status for r in rows}),
        "category": sorted({r.category for r in rows if r.category is not None}),
        "policy_version": sorted({f"{p.policy}@{p.policy_version}" for p in pairs}),
    }


def query_words(text: str) -> list[str]:
    """The words of a search text: runs of Unicode letters and digits, lowercased, each once."""
    return list(dict.fromkeys(_WORD.findall(text.lower())))


def _filters(where: TrajectoryFilter, dialect: str) -> list[Any]:
    filters = trajectory_filters(
        where.run, where.status, where.mode, where.min_score, None, where.group
    )
    if where.category is not None:
        filters.append(TrajectoryRow.category == where.category)
    if where.correct is not None:
        filters.append(TrajectoryRow.correct == where.correct)
    if where.max_score is not None:
        filters.append(TrajectoryRow.score <= where.max_score)
    if where.policy_version is not None:
        steps = select(StepRow.trajectory_id).where(_policy_version(where.policy_version))
        filters.append(TrajectoryRow.id.in_(steps))
    if where.text is not None:
        filters.append(_text_matches(where.text, dialect))
    return filters


def _policy_version(value: str) -> Any:
    """Steps recorded with ``name@version``; a name or version holding ``@`` itself is read
    every way it splits (as :func:`filter_choices` joins them, the pair is among them)."""
    splits = [(value[:at], value[at + 1 :]) for at, char in enumerate(value) if char == "@"]
    return or_(
        *(
            and_(StepRow.policy == name, StepRow.policy_version == version)
            for name, version in splits
        )
    )


def _text_matches(text: str, dialect: str) -> Any:
    """Trajectories whose prompt, or one of whose step texts, holds every word of ``text``."""
    words = query_words(text)
    if not words:
        return false()
    if dialect == "sqlite":
        # Each word a quoted FTS5 string (words hold no quote), implicitly ANDed.
        query = " ".join(f'"{word}"' for word in words)
        documents = select(_FTS.c.rowid).where(_FTS.c.search_text.bool_op("MATCH")(query))
        matched = select(_DOCUMENTS.c.trajectory_id).where(_DOCUMENTS.c.id.in_(documents))
        return TrajectoryRow.id.in_(matched)
    if dialect == "postgresql":
        query = func.plainto_tsquery(literal_column("'simple'"), " ".join(words))
        prompts = TrajectoryRow.__table__.alias("prompt_match")
        # A UNION of two index scans: with OR, the prompt test would run on every row.
        matched = union(
            select(prompts.c.id).where(words_vector(prompts.c.prompt).bool_op("@@")(query)),
            select(StepRow.trajectory_id).where(
                step_words_vector(StepRow.text).bool_op("@@")(query)
            ),
        )
        return TrajectoryRow.id.in_(matched)
    raise NotImplementedError(f"full-text search on {dialect}")
