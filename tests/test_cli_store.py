"""The recorded CLI flows: demo → runs/ls/show, and SIGKILL mid-run → resume."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_graph.ids import short_id
from storage.store import TrajectoryStore

ATELIER = [sys.executable, "-m", "agent_graph.cli"]


def atelier(*args: str, db: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "ATELIER_DB": str(db)}
    return subprocess.run(
        [*ATELIER, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("demo") / "atelier.db"
    result = atelier("demo", "--per-category", "2", db=db)
    assert result.returncode == 0, result.stderr
    assert "recorded every trajectory" in result.stdout
    return db


def test_demo_records_every_trajectory_with_all_steps_and_images(demo_db):
    store = TrajectoryStore(f"sqlite:///{demo_db}")
    runs = {run.name: run for run in store.runs()}
    assert set(runs) == {"demo-direct", "demo-reflect", "demo-decompose", "demo-auto"}
    for run in runs.values():
        trajectories = store.trajectories(run=run.id)
        assert len(trajectories) == run.trajectory_count == 18  # 9 categories × 2
        for summary in trajectories:
            assert summary.status == "succeeded"
            detail = store.trajectory(summary.id)
            assert [s.seq for s in detail.steps] == list(range(len(detail.steps)))
            assert detail.steps[0].node == "plan" and detail.steps[-1].node == "stop"
            made = [img.ref for step in detail.steps for img in step.images_out]
            assert len(made) == summary.image_count
            assert made[-1] == summary.final_image
            for ref in made:
                assert store.image(ref).size == (256, 256)
    store.close()


def test_runs_ls_show_read_the_store(demo_db):
    runs = atelier("runs", db=demo_db)
    assert runs.returncode == 0 and runs.stdout.count("demo-") == 4
    listed = atelier("ls", "--run", "demo-reflect", "--limit", "50", db=demo_db)
    assert listed.returncode == 0 and "18 trajectories" in listed.stdout
    store = TrajectoryStore(f"sqlite:///{demo_db}")
    run = store.resolve_run("demo-reflect")
    edited = next(t for t in store.trajectories(run=run.id) if t.image_count > 1)
    store.close()
    assert short_id(edited.id) in listed.stdout  # the id `ls` shows, as users copy it
    shown = atelier("show", short_id(edited.id), db=demo_db)
    assert shown.returncode == 0, shown.stderr
    assert edited.prompt in shown.stdout and "reflection" in shown.stdout
    assert shown.stdout.count(" refine ") == edited.image_count - 1
    missing = atelier("show", "ffffffffffff", db=demo_db)
    assert missing.returncode == 2 and "no trajectory" in missing.stderr
    no_run = atelier("ls", "--run", "nope", db=demo_db)
    assert no_run.returncode == 2 and "no run" in no_run.stderr


def test_commands_on_a_missing_store_fail_clearly(tmp_path):
    result = atelier("ls", db=tmp_path / "absent.db")
    assert result.returncode == 2 and "no store at" in result.stderr
    assert not (tmp_path / "absent.db").exists()


def _steps_in(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("select count(*) from steps").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _outcomes(db: Path, name: str) -> dict[tuple[str, int], tuple]:
    store = TrajectoryStore(f"sqlite:///{db}")
    run = store.resolve_run(name)
    outcomes = {}
    for summary in store.trajectories(run=run.id):
        steps = store.steps(summary.id)
        assert [s.seq for s in steps] == list(range(len(steps)))
        outcomes[(summary.group_id, summary.sample_index)] = (
            summary.status,
            summary.final_image,
            summary.score,
            tuple(s.node for s in steps),
        )
    store.close()
    return outcomes


def test_sigkill_mid_run_then_resume_finishes_exactly_what_an_uninterrupted_run_does(tmp_path):
    args = ["rollout", "--per-category", "30", "-G", "4", "--mode", "random", "--name", "big"]
    killed_db, reference_db = tmp_path / "killed.db", tmp_path / "reference.db"
    env = {**os.environ, "ATELIER_DB": str(killed_db)}
    process = subprocess.Popen(
        [*ATELIER, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while _steps_in(killed_db) < 800 and time.monotonic() < deadline:
        assert process.poll() is None, "the run finished before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    with sqlite3.connect(killed_db) as conn:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
        recorded = conn.execute("select count(*) from steps").fetchone()[0]
        unfinished = conn.execute(
            "select count(*) from trajectories where status in ('running', 'incomplete')"
        ).fetchone()[0]
    assert recorded >= 800 and unfinished > 0

    resumed = atelier("resume", "big", db=killed_db)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {unfinished} trajectories" in resumed.stdout
    reference = atelier(*args, db=reference_db)
    assert reference.returncode == 0, reference.stderr

    after, expected = _outcomes(killed_db, "big"), _outcomes(reference_db, "big")
    assert len(expected) == 9 * 30 * 4
    # Every trajectory completed once, with the same steps and final image as if never killed.
    assert after == expected
    assert all(status == "succeeded" for status, *_ in after.values())


def test_view_writes_a_page_of_the_run_and_export_writes_jsonl(demo_db, tmp_path):
    page = tmp_path / "reflect.html"
    result = atelier("view", "demo-reflect", "--out", str(page), db=demo_db)
    assert result.returncode == 0, result.stderr
    html = page.read_text()
    assert html.count('class="trajectory') >= 18 and "<script" in html
    bad = atelier("view", "demo-reflect", "--out", str(tmp_path / "x.txt"), db=demo_db)
    assert bad.returncode == 2 and ".html" in bad.stderr
    out = tmp_path / "auto.jsonl"
    exported = atelier("export", "--run", "demo-auto", "--out", str(out), db=demo_db)
    assert exported.returncode == 0, exported.stderr
    assert len(out.read_text().splitlines()) == 18
