"""Trace UI queries over a large SQLite store: pages, filters, full text, drop-down choices.

    python benchmarks/ui_pagination.py                        # 100,000 trajectories, temp dir
    python benchmarks/ui_pagination.py --trajectories 2000    # quicker
    python benchmarks/ui_pagination.py --db /tmp/ui.db        # build once, reuse afterwards

Builds a store of ``--trajectories`` trajectories spread over ``--runs`` runs, three steps each
(a plan and a reflection with text and a policy decision, a draw without), through
``storage.bulk.bulk_insert``, the recorder's executemany path (so the full-text triggers fire
for every row), with recorder-like JSON: an initial state, a final state, a state snapshot on
the first step and deltas after it. Step texts draw words from a synthetic vocabulary (Zipf-like:
a few words are in most texts, most words in few). With ``--db``, an existing store is reused.

Then times each query the trace UI makes (``storage.search``) with ``time.perf_counter``, the
first call and the median of ``--repeats``: the first, a middle and the last page of all
trajectories; the last page of one run; filtered pages (mode + correct); full-text pages for a
rare and a common word, and one combined with a run and a policy version; ``filter_choices``
for one run and for all. "matches" is the page's ``total`` (for the choices: how many values).

Then serves ``atelier ui``'s app (uvicorn on loopback, in this process) and times whole pages
over HTTP as a browser asks for them (``--http-pages`` evenly spaced pages of the largest run,
48 trajectories each, every one from a cold start of the request: summary, drop-down choices,
the page and its HTML), plus filtered and full-text pages, a trajectory, and the runs,
training and versions pages. ``--runs 1`` puts every trajectory in one run (the worst case
for a run's page).
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.bulk import bulk_insert  # noqa: E402
from storage.schema import StepRow, TrajectoryRow  # noqa: E402
from storage.search import (  # noqa: E402
    TrajectoryFilter,
    catch_up_search_index,
    filter_choices,
    search_trajectories,
)
from storage.store import TrajectoryStore  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
MODES = ("reflect", "decompose", "direct")
CATEGORIES = ("count", "color", "position", "size", "shape", "texture", "text", "scene")
PROMPT_WORDS = [
    "red",
    "blue",
    "green",
    "yellow",
    "circle",
    "square",
    "star",
    "triangle",
    "left",
    "right",
    "above",
    "below",
]
RARE = "okapi"
"""A word put in one step text in 2,000 (a search with few matches)."""
COMMON = "circle"
"""A word in most prompts and many step texts."""
BATCH = 5000


def vocabulary(size: int = 5000) -> list[str]:
    rng = random.Random(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = {"".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(size * 2)}
    return sorted(words)[:size]


def build(store: TrajectoryStore, total: int, runs: int) -> None:
    rng = random.Random(1)
    words = vocabulary()
    weights = [1 / (rank + 1) for rank in range(len(words))]  # Zipf: a few words dominate
    run_ids = [store.create_run(f"bench-{r}", run_id=f"bench-{r}").id for r in range(runs)]
    for start in range(0, total, BATCH):
        trajectories, steps = [], []
        for i in range(start, min(total, start + BATCH)):
            tid = f"t{i:08d}"
            prompt = " ".join(rng.choices(PROMPT_WORDS, k=6)) + f" {COMMON}"
            task = {"prompt": prompt, "group_id": f"g{i // 8}", "sample_index": i % 8, "seed": i}
            initial = {"trajectory_id": tid, "task": task, "mode": None, "step_count": 0}
            score = rng.random()
            started = T0 + timedelta(seconds=i)
            trajectories.append(
                {
                    "id": tid, "run_id": run_ids[i % runs], "prompt": prompt,
                    "category": CATEGORIES[i % len(CATEGORIES)], "group_id": task["group_id"],
                    "sample_index": i % 8, "seed": i, "mode": MODES[rng.randrange(3)],
                    "status": "failed" if i % 50 == 0 else "succeeded",
                    "final_image": f"{i:064x}", "image_count": 2, "score": score,
                    "correct": score > 0.5, "rewards": {"outcome": score},
                    "started_at": started, "finished_at": started + timedelta(seconds=20),
                    "duration_s": 20.0, "error": None, "initial_state": initial,
                    "final_state": {**initial, "blueprint": prompt * 4,
                                    "judgement": {"score": score, "correct": score > 0.5}},
                }
            )  # fmt: skip
            for seq, node in enumerate(("plan", "draw", "reflect")):
                text = None
                if node != "draw":
                    text = " ".join(rng.choices(words, weights, k=rng.randint(20, 60)))
                    text += f" <think>a {COMMON}?</think>" if rng.random() < 0.3 else ""
                    text += f" {RARE}" if rng.random() < 0.0005 else ""
                policy = None
                if node == "plan":
                    policy = ("uniform-mode", str(1 + i * runs // total))
                elif node == "reflect":
                    policy = ("follow-reflection", "1")
                steps.append(
                    {
                        "trajectory_id": tid, "seq": seq, "node": node, "stage": node,
                        "state_before": initial if seq == 0 else JSON.NULL,
                        "state_update": {"step_count": seq + 1}, "text": text,
                        "latency_s": 0.5, "started_at": started + timedelta(seconds=seq),
                        "error": None, "models": ["vlm"],
                        "policy": policy and policy[0], "policy_version": policy and policy[1],
                    }
                )  # fmt: skip

        def write(conn: Any, trajectories: list = trajectories, steps: list = steps) -> None:
            bulk_insert(conn, TrajectoryRow.__table__, trajectories)
            bulk_insert(conn, StepRow.__table__, steps)

        store.db.write(write)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(first call's seconds, median seconds, result)."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return times[0], statistics.median(times), result


def http_pages(store: TrajectoryStore, walked: int, repeats: int) -> None:
    """Whole pages of the UI over HTTP: a walk across the largest run, then other views."""
    import httpx

    from atelier.ui.app import create_app
    from tests.ui_server import serving

    run = max(store.runs(), key=lambda r: r.trajectory_count)
    per = 48
    pages = max(1, -(-run.trajectory_count // per))
    numbers = sorted(
        {1, pages, *(1 + i * (pages - 1) // max(1, walked - 1) for i in range(walked))}
    )
    one = store.trajectories(run=run.id, limit=1)[0].id
    with serving(create_app(store)) as base, httpx.Client(base_url=base, timeout=60) as client:

        def get(url: str) -> float:
            started = time.perf_counter()
            reply = client.get(url)
            elapsed = time.perf_counter() - started
            if reply.status_code != 200:
                raise SystemExit(f"{url}: HTTP {reply.status_code}")
            return elapsed

        walk = [get(f"/runs/{run.id}?per={per}&page={n}") for n in numbers]
        print(
            f"\nover HTTP: run {run.name} ({run.trajectory_count:,} trajectories, {pages:,} pages "
            f"of {per}): walked {len(walk)} pages from 1 to {pages:,}: median "
            f"{statistics.median(walk) * 1000:.0f} ms, slowest {max(walk) * 1000:.0f} ms"
        )
        views = [
            ("run page, filtered (mode + correct)", f"/runs/{run.id}?mode=reflect&correct=yes"),
            (f"run page, full text ({RARE!r})", f"/runs/{run.id}?q={RARE}"),
            (f"run page, full text ({COMMON!r} + think)", f"/runs/{run.id}?q=think+{COMMON}"),
            ("run page, last page, filtered", f"/runs/{run.id}?mode=reflect&page=1000000"),
            ("trajectory page", f"/trajectories/{one}"),
            ("runs page", "/"),
            ("groups page", f"/runs/{run.id}/groups"),
            ("training page", "/training"),
            ("versions page", "/versions"),
        ]
        print(f"{'page':<44} {'first ms':>9} {'median ms':>10}")
        for name, url in views:
            if "page=1000000" in url:  # the last page of the filtered list
                total = search_trajectories(
                    store, TrajectoryFilter(run=run.id, mode="reflect"), limit=1
                ).total
                url = url.replace("1000000", str(max(1, -(-total // per))))
            times = [get(url) for _ in range(repeats)]
            print(f"{name:<44} {times[0] * 1000:>9.1f} {statistics.median(times) * 1000:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trajectories", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--db", type=Path, help="SQLite file to build, or to reuse if it exists")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--http-pages", type=int, default=40, help="pages walked over HTTP")
    args = parser.parse_args()

    tmp = None
    if args.db is None:
        tmp = Path(tempfile.mkdtemp(prefix="atelier-ui-"))
        path = tmp / "ui.db"
    else:
        path = args.db
    try:
        reuse = path.exists()
        store = TrajectoryStore(f"sqlite:///{path}")
        if not reuse:
            started = time.perf_counter()
            build(store, args.trajectories, args.runs)
            print(
                f"built {args.trajectories:,} trajectories ({args.runs} runs, 3 steps each) in "
                f"{time.perf_counter() - started:.1f} s: {path}"
            )
        started = time.perf_counter()
        indexed = catch_up_search_index(store)
        if indexed:
            print(
                f"search index caught up: {indexed:,} texts in "
                f"{time.perf_counter() - started:.1f} s (once, after recording)"
            )
        with store.db.read() as conn:
            total = int(conn.scalar(select(func.count()).select_from(TrajectoryRow)) or 0)
        run = store.runs()[0]
        print(f"store: {total:,} trajectories, {path.stat().st_size / 2**20:,.0f} MiB\n")
        everything = TrajectoryFilter()
        last = max(0, total - 50)
        queries: list[tuple[str, Callable[[], Any]]] = [
            ("first page", lambda: search_trajectories(store, everything)),
            (
                f"middle page (offset {total // 2:,})",
                lambda: search_trajectories(store, everything, offset=total // 2),
            ),
            (
                f"last page (offset {last:,})",
                lambda: search_trajectories(store, everything, offset=last),
            ),
            (
                f"last page of one run ({run.trajectory_count:,})",
                lambda: search_trajectories(
                    store,
                    TrajectoryFilter(run=run.id),
                    offset=max(0, run.trajectory_count - 50),
                ),
            ),
            (
                "filtered page (mode + correct)",
                lambda: search_trajectories(store, TrajectoryFilter(mode="reflect", correct=True)),
            ),
            (
                "filtered page (run + mode + correct)",
                lambda: search_trajectories(
                    store, TrajectoryFilter(run=run.id, mode="reflect", correct=True)
                ),
            ),
            (
                f"full-text page (rare word {RARE!r})",
                lambda: search_trajectories(store, TrajectoryFilter(text=RARE)),
            ),
            (
                f"full-text page (common word {COMMON!r} + think)",
                lambda: search_trajectories(store, TrajectoryFilter(text=f"think {COMMON}")),
            ),
            (
                "full-text + run + policy version",
                lambda: search_trajectories(
                    store,
                    TrajectoryFilter(run=run.id, text="think", policy_version="uniform-mode@1"),
                ),
            ),
            ("filter_choices(run)", lambda: filter_choices(store, run.id)),
            ("filter_choices(None)", lambda: filter_choices(store, None)),
        ]
        print(
            f"{'query':<44} {'first ms':>9} {'median ms':>10} {'matches':>9}   "
            f"(median of {args.repeats})"
        )
        for name, fn in queries:
            first, median, result = timed(fn, args.repeats)
            matches = result.total if hasattr(result, "total") else sum(map(len, result.values()))
            print(f"{name:<44} {first * 1000:>9.1f} {median * 1000:>10.1f} {matches:>9,}")
        http_pages(store, args.http_pages, args.repeats)
        store.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
