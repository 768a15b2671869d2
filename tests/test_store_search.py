"""Server-side search for the trace UI: filters, pages, full text, drop-down choices, on SQLite
and PostgreSQL, checked against the same questions answered in Python from ``store.trajectory``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, text

from agent_graph.recording import StepRecord
from agent_graph.runner import Runner, make_group_tasks
from nodes.common import Generation, NodeTrace
from nodes.state import Decision, FinalJudgement, Mode, ReasonerState, Task
from storage.bulk import COPY_MIN_ROWS, bulk_insert
from storage.recorder import SQLRecorder
from storage.schema import StepRow, TrajectoryRow
from storage.search import (
    MAX_LIMIT,
    TrajectoryFilter,
    catch_up_search_index,
    filter_choices,
    search_trajectories,
)
from storage.store import TrajectoryStore
from tests.pg import BACKENDS, graph_context

PROMPTS = [
    "two red circles left of a blue square",
    "A yellow star above three green triangles",
    "one purple hexagon, centred",
    "Café au lait: a brown circle – naïve style",
    "score 0.75 at example.com/path_name",
    "a square (rotated 45°), small_text",
]
STEP_TEXTS = [
    "<think>The image lacks a circle.</think>Add one red circle.",
    "<think>It matches.</think>No further edit needed.",
    '{"steps": [{"instruction": "Draw two red circles.", "expect": "two red circles"}]}',
    None,  # a step without generations (a draw)
    "BLUEPRINT: a clean white background; a square, don’t tilt it",
    "Plan: draw stripes 3.14 wide\n\nthen a NEAR(circle) -x OR y",
]
POLICIES = [("uniform-mode", "1"), ("learned", "v2@beta"), ("learned@lab", "7")]
CATEGORIES = ["count", "color", "position", None]
MODES = [Mode.REFLECT, Mode.DECOMPOSE, Mode.DIRECT]
N = 48

# Trajectories written for the full-text assertions (a word no other text holds).
OKAPI = {
    "t-okapi-step": ("a red square", ["<think>An OKAPI hides.</think>Draw it.", "green grass"]),
    "t-okapis": ("two okapis grazing", []),
    "t-okapi-prompt": ("Okapi, green and tall", []),
}

HOSTILE = [
    '"',
    '"okapi',
    "okapi*",
    "okap*",
    "red OR okapi",
    "NEAR(okapi green)",
    "'; drop table trajectories; --",
    "-x",
    "okapi -green",
    ":",
    "prompt:okapi",
    "body : okapi",
    "^okapi",
    "okapi + hides",
    "(",
    "AND",
    "%_",
    "\\",
    "\x00okapi",
    "' OR 1=1 --",
    "$$; select 1; $$",
    "{okapi}",
]


def _state(tid: str, index: int, prompt: str, mode: Mode) -> ReasonerState:
    task = Task(
        prompt=prompt,
        group_id=f"g{index // 4}",
        sample_index=index % 4,
        seed=index,
        category=CATEGORIES[index % 4],
    )
    return ReasonerState(trajectory_id=tid, task=task, mode=mode)


def _step(tid: str, seq: int, text_: str | None, policy: tuple[str, str] | None) -> StepRecord:
    update: dict = {"step_count": seq + 1}
    if policy is not None:
        decision = Decision(
            kind="stop", action="go", log_prob=-0.5, policy=policy[0], version=policy[1], step=seq
        )
        update["decisions"] = [decision.model_dump(mode="json")]
    generations = (
        [] if text_ is None else [Generation("reflect", text_, (1, 2), (-0.5, -1.0), "m", 0.1)]
    )
    return StepRecord(
        trajectory_id=tid,
        seq=seq,
        node="reflect" if text_ else "draw",
        started_at=1_700_000_000.0 + seq,
        latency_s=0.01,
        state_before=None,
        update=update,
        trace=NodeTrace(generations=generations, models=["m"]),
    )


async def populate(store: TrajectoryStore, *, graph: bool = True) -> None:
    """Deterministic trajectories over two runs (every filter has something to tell apart),
    the okapi ones, and, with ``graph``, a small real graph run (scripted models)."""
    plans: list[tuple[str, str, ReasonerState, list[StepRecord], int]] = []
    for i in range(N):
        tid = f"t{i:03d}"
        state = _state(tid, i, PROMPTS[i % len(PROMPTS)], MODES[i % 3])
        steps = [
            _step(
                tid,
                k,
                STEP_TEXTS[(i + k) % len(STEP_TEXTS)],
                POLICIES[(i + k) // 3 % len(POLICIES)] if (i + k) % 3 == 0 else None,
            )
            for k in range(i % 4)
        ]
        plans.append(("run-b" if i % 4 == 3 else "run-a", tid, state, steps, i))
    for j, (tid, (prompt, texts)) in enumerate(OKAPI.items()):
        state = _state(tid, j, prompt, Mode.REFLECT)
        plans.append(
            ("run-b", tid, state, [_step(tid, k, t, None) for k, t in enumerate(texts)], j)
        )
    for run in ("run-a", "run-b"):
        store.create_run(run, run_id=run)
        async with SQLRecorder(store, run) as recorder:
            for run_id, tid, state, steps, i in plans:
                if run_id != run:
                    continue
                await recorder.start_trajectory(state)
                for record in steps:
                    await recorder.record_step(record)
                if i % 5 == 4:
                    continue  # left unfinished: incomplete when the recorder closes
                if i % 5 == 3:
                    await recorder.finish_trajectory(tid, "failed", None, "boom")
                    continue
                judged = state.model_copy(
                    update={"judgement": FinalJudgement(score=(i % 7) / 6, correct=i % 2 == 0)}
                )
                await recorder.finish_trajectory(tid, "succeeded", judged, None)
    if graph:
        async with SQLRecorder(store, "run-graph") as recorder:
            context = graph_context(store, recorder, mode="reflect")
            tasks = make_group_tasks(["one red circle", "a blue okapi"], group_size=2, seed=1)
            await Runner(context, concurrency=4).run(tasks)


@pytest.fixture(scope="module", params=BACKENDS)
def populated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrajectoryStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('search') / 'atelier.db'}"
    else:
        url = request.getfixturevalue("pg_server").create_database()
    store = TrajectoryStore(url)
    asyncio.run(populate(store))
    yield store
    store.close()


# --- the same questions, answered in Python ------------------------------------------------------


def words(value: str | None) -> set[str]:
    return set(re.findall(r"[^\W_]+", (value or "").lower()))


def expected_ids(store: TrajectoryStore, where: TrajectoryFilter) -> list[str]:
    """Ids matching ``where``, in ``store.trajectories()`` order, decided in Python."""
    everything = store.trajectories()
    details = store.trajectory_details([t.id for t in everything])
    matched = []
    for t in everything:
        detail = details[t.id]
        checks = [
            where.run is None or t.run_id == where.run,
            where.mode is None or t.mode == where.mode,
            where.status is None or t.status == where.status,
            where.category is None or t.category == where.category,
            where.correct is None or t.correct is where.correct,
            where.min_score is None or (t.score is not None and t.score >= where.min_score),
            where.max_score is None or (t.score is not None and t.score <= where.max_score),
            where.group is None or t.group_id == where.group,
            where.policy_version is None
            or any(
                f"{s.policy}@{s.policy_version}" == where.policy_version
                for s in detail.steps
                if s.policy is not None
            ),
            where.text is None or text_matches(detail, where.text),
        ]
        if all(checks):
            matched.append(t.id)
    return matched


def text_matches(detail, query: str) -> bool:
    wanted = words(query)
    texts = [detail.prompt, *(s.text for s in detail.steps)]
    return bool(wanted) and any(wanted <= words(t) for t in texts)


def searched_ids(store: TrajectoryStore, where: TrajectoryFilter) -> list[str]:
    page = search_trajectories(store, where, limit=MAX_LIMIT)
    assert page.total == len(page.items) < MAX_LIMIT
    return [t.id for t in page.items]


FILTERS = [
    TrajectoryFilter(),
    TrajectoryFilter(run="run-a"),
    TrajectoryFilter(run="run-b"),
    TrajectoryFilter(run="run-"),  # exact, not a prefix
    TrajectoryFilter(mode="reflect"),
    TrajectoryFilter(mode="decompose"),
    TrajectoryFilter(status="succeeded"),
    TrajectoryFilter(status="failed"),
    TrajectoryFilter(status="incomplete"),
    TrajectoryFilter(status="running"),
    TrajectoryFilter(category="count"),
    TrajectoryFilter(category="position"),
    TrajectoryFilter(correct=True),
    TrajectoryFilter(correct=False),
    TrajectoryFilter(min_score=0.5),
    TrajectoryFilter(max_score=0.5),
    TrajectoryFilter(min_score=0.2, max_score=0.7),
    TrajectoryFilter(min_score=0.0),
    TrajectoryFilter(group="g3"),
    TrajectoryFilter(policy_version="uniform-mode@1"),
    TrajectoryFilter(policy_version="learned@v2@beta"),
    TrajectoryFilter(policy_version="learned@lab@7"),
    TrajectoryFilter(policy_version="learned@7"),
    TrajectoryFilter(policy_version="nobody@0"),
    TrajectoryFilter(text="circle"),
    TrajectoryFilter(text="Red CIRCLES"),
    TrajectoryFilter(text="think"),
    TrajectoryFilter(text="okapi"),
    TrajectoryFilter(text="0.75"),
    TrajectoryFilter(text="example"),
    TrajectoryFilter(text="path name"),
    TrajectoryFilter(text="café NAÏVE"),
    TrajectoryFilter(text="don t"),
    TrajectoryFilter(text="lacks"),
    TrajectoryFilter(run="run-a", mode="reflect", correct=True),
    TrajectoryFilter(run="run-a", status="succeeded", min_score=0.3, category="color"),
    TrajectoryFilter(run="run-b", text="circle", status="failed"),
    TrajectoryFilter(mode="direct", policy_version="uniform-mode@1", max_score=0.9),
    TrajectoryFilter(group="g2", correct=False, text="small"),
    TrajectoryFilter(
        run="run-a",
        mode="reflect",
        status="succeeded",
        category="position",
        correct=True,
        min_score=0.3,
        max_score=0.4,
        group="g7",
        policy_version="learned@v2@beta",
        text="lacks circle",
    ),
]


def label(where: TrajectoryFilter) -> str:
    given = {k: v for k, v in vars(where).items() if v is not None}
    return ",".join(f"{k}={v!r}" for k, v in given.items()) or "everything"


@pytest.mark.parametrize("where", FILTERS, ids=label)
def test_each_filter_alone_and_combined_matches_python(populated, where):
    assert searched_ids(populated, where) == expected_ids(populated, where)


def test_the_filters_tell_trajectories_apart(populated):
    """The data makes the filter test meaningful: most filters keep some, not all."""
    everything = len(populated.trajectories())
    sizes = [len(expected_ids(populated, where)) for where in FILTERS[1:]]
    assert sum(0 < size < everything for size in sizes) >= len(sizes) - 4


@pytest.mark.parametrize(
    "where",
    [TrajectoryFilter(), TrajectoryFilter(run="run-a"), TrajectoryFilter(text="circle")],
    ids=label,
)
@pytest.mark.parametrize("limit", [1, 7, 50])
def test_pages_walk_every_trajectory_once_in_order(populated, where, limit):
    expected = expected_ids(populated, where)
    walked, offset = [], 0
    while True:
        page = search_trajectories(populated, where, offset=offset, limit=limit)
        assert (page.total, page.offset, page.limit) == (len(expected), offset, limit)
        assert len(page.items) <= limit
        if not page.items:
            break
        walked += [t.id for t in page.items]
        offset += limit
    assert walked == expected
    beyond = search_trajectories(populated, where, offset=len(expected) + 5, limit=limit)
    assert beyond.items == [] and beyond.total == len(expected)
    if where == TrajectoryFilter():
        assert [t.id for t in populated.trajectories()] == expected
        first = search_trajectories(populated, where, limit=limit).items
        assert first == populated.trajectories(limit=limit)  # the same summaries, field by field


def test_full_text_finds_whole_words_of_any_case_all_in_one_text(populated):
    def found(query: str) -> set[str]:
        return {t for t in searched_ids(populated, TrajectoryFilter(text=query)) if "okapi" in t}

    assert found("okapi") == {"t-okapi-step", "t-okapi-prompt"}  # a reflection, a prompt
    assert found("OKAPI") == found("Okapi") == found("okapi")
    assert found("okap") == set()  # whole words only
    assert found("okapis") == {"t-okapis"}
    assert found("okapi hides") == {"t-okapi-step"}  # both in one step's text
    assert found("hides okapi okapi") == {"t-okapi-step"}
    assert found("okapi green") == {"t-okapi-prompt"}  # t-okapi-step: in two different steps
    assert found("red okapi") == set()  # t-okapi-step: red in its prompt, okapi in a step
    assert found("think okapi") == {"t-okapi-step"}  # the <think> tag is a word too
    graph = TrajectoryFilter(run="run-graph", text="lacks circle")  # the graph's reflections
    assert searched_ids(populated, graph) == expected_ids(populated, graph) != []
    graph = TrajectoryFilter(run="run-graph", text="okapi")  # a prompt the graph ran
    assert len(searched_ids(populated, graph)) == 2


@pytest.mark.parametrize("query", HOSTILE, ids=ascii)
def test_syntax_and_injection_looking_text_is_searched_as_plain_words(populated, query):
    where = TrajectoryFilter(text=query)
    assert searched_ids(populated, where) == expected_ids(populated, where)
    assert len(populated.trajectories()) > 50  # and nothing was dropped


def test_a_query_without_words_matches_nothing(populated):
    for query in ("", "   ", "?!", "'\"", "--", "_"):
        page = search_trajectories(populated, TrajectoryFilter(text=query))
        assert (page.items, page.total) == ([], 0)
    assert search_trajectories(populated, TrajectoryFilter(text=None)).total > 50


def test_bad_pages_and_filters_are_refused(populated):
    for limit in (0, -1, MAX_LIMIT + 1):
        with pytest.raises(ValueError, match="limit"):
            search_trajectories(populated, TrajectoryFilter(), limit=limit)
    with pytest.raises(ValueError, match="offset"):
        search_trajectories(populated, TrajectoryFilter(), offset=-1)
    with pytest.raises(ValueError, match="status"):
        TrajectoryFilter(status="bogus")
    with pytest.raises(ValueError, match="name@version"):
        TrajectoryFilter(policy_version="uniform-mode")
    assert len(search_trajectories(populated, TrajectoryFilter(), limit=MAX_LIMIT).items) > 50


@pytest.mark.parametrize("run", [None, "run-a", "run-b", "run-graph", "no-such-run"])
def test_filter_choices_are_the_values_present(populated, run):
    trajectories = populated.trajectories(run=run)
    steps = populated.steps_many([t.id for t in trajectories])
    assert filter_choices(populated, run) == {
        "mode": sorted({t.mode for t in trajectories if t.mode is not None}),
        "status": sorted({t.status for t in trajectories}),
        "category": sorted({t.category for t in trajectories if t.category is not None}),
        "policy_version": sorted(
            {
                f"{s.policy}@{s.policy_version}"
                for found in steps.values()
                for s in found
                if s.policy is not None
            }
        ),
    }
    if run == "run-a":
        choices = filter_choices(populated, run)
        assert choices["policy_version"] == ["learned@lab@7", "learned@v2@beta", "uniform-mode@1"]
        for value in choices["policy_version"]:  # each choice filters to some trajectories
            assert searched_ids(populated, TrajectoryFilter(run=run, policy_version=value))


@pytest.mark.postgres
def test_sqlite_and_postgresql_return_the_same_ids(tmp_path, pg_server):
    stores = [
        TrajectoryStore(f"sqlite:///{tmp_path / 'a.db'}"),
        TrajectoryStore(pg_server.create_database()),
    ]
    try:
        for store in stores:
            asyncio.run(populate(store, graph=False))
        queries = [*FILTERS, *(TrajectoryFilter(text=q) for q in HOSTILE)]
        queries += [
            TrajectoryFilter(text=t)
            for t in ("CAFÉ", "naïve", "lait brown", "tilt don", "14 3", "x y", "near", "or")
        ]
        for where in queries:
            sqlite_ids, pg_ids = (sorted(searched_ids(s, where)) for s in stores)
            assert sqlite_ids == pg_ids, where
            assert sqlite_ids == sorted(expected_ids(stores[0], where)), where
        for run in (None, "run-a", "run-b"):
            assert filter_choices(stores[0], run) == filter_choices(stores[1], run)
    finally:
        for store in stores:
            store.close()


# --- the index through every write path --------------------------------------------------------


def _rows(prefix: str, count: int, word: str) -> tuple[list[dict], list[dict]]:
    started = datetime(2026, 1, 1, tzinfo=timezone.utc)
    trajectories = [
        {
            "id": f"{prefix}{i:03d}", "run_id": "bulk", "prompt": f"bulk prompt {i}",
            "category": None, "group_id": "", "sample_index": 0, "seed": i, "mode": "direct",
            "status": "succeeded", "final_image": None, "image_count": 0, "score": None,
            "correct": None, "rewards": {}, "started_at": started + timedelta(seconds=i),
            "finished_at": None, "duration_s": None, "error": None, "initial_state": None,
            "final_state": None,
        }
        for i in range(count)
    ]  # fmt: skip
    steps = [
        {
            "trajectory_id": f"{prefix}{i:03d}", "seq": 0, "node": "plan", "stage": "reason",
            "state_before": {}, "state_update": {}, "text": f"a {word} number {i}",
            "latency_s": 0.1, "started_at": started, "error": None, "models": [],
            "policy": None, "policy_version": None,
        }
        for i in range(count)
    ]  # fmt: skip
    return trajectories, steps


def test_bulk_inserts_are_indexed(store):
    """The recorder's bulk paths: executemany on SQLite (the triggers fire per row), COPY on
    PostgreSQL for batches of COPY_MIN_ROWS rows or more (the expression indexes need nothing)."""
    store.create_run("bulk", run_id="bulk")
    trajectories, steps = _rows("b", COPY_MIN_ROWS + 4, "walrus")

    def write(conn) -> None:
        bulk_insert(conn, TrajectoryRow.__table__, trajectories)
        bulk_insert(conn, StepRow.__table__, steps)

    store.db.write(write)
    found = searched_ids(store, TrajectoryFilter(text="walrus"))
    assert found == [t["id"] for t in trajectories]
    assert searched_ids(store, TrajectoryFilter(text="walrus 7")) == ["b007"]
    assert searched_ids(store, TrajectoryFilter(text="prompt 12")) == ["b012"]


def _search_rows(store: TrajectoryStore) -> tuple[int, int]:
    """SQLite: (numbered texts, documents in the FTS index)."""
    with store.db.read() as conn:
        return (
            conn.scalar(text("SELECT count(*) FROM search_documents")),
            conn.scalar(text("SELECT count(*) FROM search_text_docsize")),
        )


def _indexed_texts(store: TrajectoryStore) -> int:
    """How many texts the index should hold: non-empty prompts and step texts."""
    with store.db.read() as conn:
        prompts = conn.scalar(text("SELECT count(*) FROM trajectories WHERE prompt <> ''"))
        steps = conn.scalar(text("SELECT count(*) FROM steps WHERE text <> ''"))
    return prompts + steps


def test_deleted_and_updated_texts_leave_no_index_rows_behind(store):
    """The store has no delete API; a user's DELETE of a run (cascading to its trajectories
    and steps) or an UPDATE of a text must still leave the index exact. On SQLite the writers
    only number new texts; the first search indexes them (catch_up_search_index)."""
    asyncio.run(populate(store, graph=False))
    sqlite = store.db.dialect == "sqlite"
    if sqlite:
        assert _search_rows(store) == (_indexed_texts(store), 0)  # numbered, not tokenised
    assert searched_ids(store, TrajectoryFilter(text="okapi"))
    if sqlite:
        assert _search_rows(store) == (_indexed_texts(store),) * 2
        assert catch_up_search_index(store) == 0  # nothing left to index
    store.db.write(lambda conn: conn.execute(text("DELETE FROM runs WHERE id = 'run-b'")))
    assert searched_ids(store, TrajectoryFilter(text="okapi")) == []
    assert searched_ids(store, TrajectoryFilter()) == expected_ids(store, TrajectoryFilter())
    assert {t.run_id for t in store.trajectories()} == {"run-a"}

    def rewrite(conn) -> None:
        conn.execute(text("UPDATE trajectories SET prompt = 'a lone gnu' WHERE id = 't000'"))
        conn.execute(
            text("UPDATE steps SET text = 'the gnu again' WHERE trajectory_id = 't001' AND seq = 0")
        )
        conn.execute(text("UPDATE steps SET text = NULL WHERE trajectory_id = 't002'"))

    store.db.write(rewrite)
    assert searched_ids(store, TrajectoryFilter(text="gnu")) == ["t000", "t001"]
    for where in (TrajectoryFilter(text="two red circles"), TrajectoryFilter(text="think")):
        assert searched_ids(store, where) == expected_ids(store, where)
    if sqlite:
        assert _search_rows(store) == (_indexed_texts(store),) * 2
        store.db.write(lambda conn: conn.execute(text("DELETE FROM runs")))
        assert _search_rows(store) == (0, 0)
        # texts deleted while still pending (never tokenised) leave nothing either
        asyncio.run(populate(store, graph=False))
        assert _search_rows(store) == (_indexed_texts(store), 0)
        store.db.write(lambda conn: conn.execute(text("DELETE FROM runs WHERE id = 'run-b'")))
        assert _search_rows(store) == (_indexed_texts(store), 0)
        assert searched_ids(store, TrajectoryFilter(text="okapi")) == []
        assert _search_rows(store) == (_indexed_texts(store),) * 2
        with store.db.read() as conn:  # FTS5's own consistency check of its index
            conn.execute(text("INSERT INTO search_text (search_text) VALUES ('integrity-check')"))


def _migrate(db, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    from storage.migrate import MIGRATIONS_DIR

    def run(conn) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = conn
        command.upgrade(config, revision)

    db.write(run)


def test_a_version_4_database_is_indexed_on_upgrade(db_url):
    """Rows written before migration 0005 are found after it (the backfill), and rows written
    after it too; the store is then at this code's schema version (6: 0006 added claims)."""
    from storage.engine import Database
    from storage.schema import SCHEMA_VERSION, SchemaVersionRow

    db = Database(db_url)
    _migrate(db, "0004_generation_requests")
    now = datetime.now(timezone.utc)

    def old_rows(conn) -> None:
        # Plain SQL: the ORM is this code's schema.
        conn.execute(
            text(
                "INSERT INTO runs (id, name, created_at, status, config) "
                "VALUES ('r', 'r', :now, 'finished', '{}')"
            ),
            {"now": now},
        )
        for tid, prompt in (("old-1", "An ancient Mammoth"), ("old-2", ""), ("old-3", "x")):
            conn.execute(
                text(
                    "INSERT INTO trajectories (id, run_id, prompt, group_id, sample_index, seed, "
                    "status, image_count, rewards, started_at) VALUES (:id, 'r', :prompt, 'g', 0, "
                    "1, 'succeeded', 0, '{}', :now)"
                ),
                {"id": tid, "prompt": prompt, "now": now},
            )
        for tid, seq, body in (("old-2", 0, "<think>a mammoth?</think>"), ("old-3", 0, None)):
            conn.execute(
                text(
                    "INSERT INTO steps (trajectory_id, seq, node, stage, state_before, "
                    "state_update, text, latency_s, started_at, models) VALUES (:tid, :seq, "
                    "'reflect', 'reflect_refine', '{}', '{}', :body, 0.5, :now, '[]')"
                ),
                {"tid": tid, "seq": seq, "body": body, "now": now},
            )

    db.write(old_rows)
    db.dispose()
    with TrajectoryStore(db_url) as store:  # opening it upgrades it to head
        with store.db.read() as conn:
            assert conn.execute(select(SchemaVersionRow.version)).scalar() == SCHEMA_VERSION == 6
        assert sorted(searched_ids(store, TrajectoryFilter(text="MAMMOTH"))) == ["old-1", "old-2"]
        assert searched_ids(store, TrajectoryFilter(text="ancient mammoth")) == ["old-1"]
        assert searched_ids(store, TrajectoryFilter(text="think")) == ["old-2"]
        store.db.write(
            lambda conn: conn.execute(
                text("UPDATE steps SET text = 'no longer' WHERE trajectory_id = 'old-2'")
            )
        )
        assert searched_ids(store, TrajectoryFilter(text="mammoth")) == ["old-1"]
        if store.db.dialect == "sqlite":
            assert _search_rows(store) == (_indexed_texts(store),) * 2 == (3, 3)


# --- the queries use the indexes ---------------------------------------------------------------


def _plan(store: TrajectoryStore, where: TrajectoryFilter, *, in_order: bool = False) -> str:
    """The query plan of a page; on PostgreSQL with sequential scans off (a tiny table: force
    the choice) and, with ``in_order``, sorts off too: among indexes on a tiny table the planner
    may well prefer a bitmap scan of another one and a sort, which says nothing about 100k."""
    from storage.search import _filters
    from storage.store import SUMMARY_COLUMNS

    query = (
        select(*SUMMARY_COLUMNS)
        .where(*_filters(where, store.db.dialect))
        .order_by(TrajectoryRow.started_at, TrajectoryRow.id)
        .limit(50)
    )
    with store.db.read() as conn:
        compiled = query.compile(conn)
        if store.db.dialect == "sqlite":
            params = tuple(compiled.params[name] for name in compiled.positiontup or ())
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)
            return "\n".join(row.detail for row in rows)
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        if in_order:
            conn.exec_driver_sql("SET LOCAL enable_sort = off")
        rows = conn.exec_driver_sql(f"EXPLAIN {compiled}", compiled.params)
        return "\n".join(r[0] for r in rows)


def test_pages_and_text_searches_use_the_indexes(populated):
    plan = _plan(populated, TrajectoryFilter(run="run-a"), in_order=True)
    assert "ix_trajectories_run_started" in plan
    if populated.db.dialect == "sqlite":
        assert "TEMP B-TREE" not in plan  # read in order from the index, never sorted
        assert "search_text VIRTUAL TABLE" in _plan(populated, TrajectoryFilter(text="okapi"))
        assert "COVERING INDEX ix_steps_trajectory_policy" in _plan(
            populated, TrajectoryFilter(policy_version="learned@7")
        )
    else:
        plan = _plan(populated, TrajectoryFilter(text="okapi"))
        assert "ix_trajectories_prompt_words" in plan and "ix_steps_text_words" in plan, plan
