"""The recorded CLI flows: demo → runs/ls/show, and SIGKILL mid-run → resume."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from agent_graph.ids import short_id
from storage.store import TrajectoryStore
from tests.cli_helpers import ATELIER, run_atelier

pytestmark = pytest.mark.slow  # see pyproject's markers: make test-fast skips it

atelier = run_atelier


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


# --- issue 12: what `ls`, `runs`, `show` and `view` tell a new user -----------------------------


def test_ls_says_how_many_match_when_its_limit_cuts_the_list(demo_db):
    store = TrajectoryStore(f"sqlite:///{demo_db}")
    reflect = store.resolve_run("demo-reflect").id
    perfect = len(store.trajectories(run=reflect, min_reward=1.0))
    store.close()
    cut = atelier("ls", "--limit", "5", db=demo_db)
    assert cut.returncode == 0, cut.stderr
    assert "5 of 72 trajectories (--limit 5)" in cut.stdout  # 4 runs × 18
    assert 2 < perfect < 18
    filtered = atelier(
        "ls", "--run", "demo-reflect", "--min-reward", "1", "--limit", "2", db=demo_db
    )
    assert f"2 of {perfect} trajectories of run {reflect[:12]} (--limit 2)" in filtered.stdout
    everything = atelier("ls", "--run", "demo-reflect", "--limit", "18", db=demo_db)
    # All of them shown: no "of", no limit named.
    assert re.search(rf"^ *18 trajectories of run {reflect[:12]} *$", everything.stdout, re.M)
    bad = atelier("ls", "--limit", "0", db=demo_db)
    assert bad.returncode == 2 and bad.stderr == "atelier: error: --limit must be at least 1\n"


def test_ls_ids_prints_full_ids_that_show_takes(demo_db):
    listed = atelier("ls", "--run", "demo-reflect", "--limit", "3", "--ids", db=demo_db)
    ids = listed.stdout.split()
    assert listed.returncode == 0 and len(ids) == 3 and all(len(i) == 32 for i in ids)
    store = TrajectoryStore(f"sqlite:///{demo_db}")
    expected = [t.id for t in store.trajectories(run=store.resolve_run("demo-reflect").id)][:3]
    store.close()
    assert ids == expected
    shown = atelier("show", ids[0], db=demo_db)  # as README does: show "$(ls --limit 1 --ids)"
    assert shown.returncode == 0 and f"trajectory {ids[0][:12]}" in shown.stdout


def test_count_trajectories_counts_what_trajectories_lists(store):
    from agent_graph.rollout import rollout
    from agent_graph.runner import make_group_tasks

    prompts = ["three red circles", "a photograph of a cat", "four blue squares", "a red star"]
    tasks = make_group_tasks(prompts, 3, seed=5)
    run = asyncio.run(rollout(store, tasks, mode="random", name="mixed")).run_id
    other = asyncio.run(rollout(store, tasks[:2], mode="direct", name="other")).run_id
    store.add_reward(store.trajectories(run=run)[0].id, "C", 0.75)
    filters = [
        {},
        {"run": run},
        {"run": other, "status": "failed"},
        {"status": "succeeded", "mode": "reflect"},
        {"run": run, "min_reward": 1.0},
        {"min_reward": 0.5, "reward": "C"},
        {"group": tasks[0].group_id},
        {"run": "no-such-run"},
    ]
    counts = [store.count_trajectories(**f) for f in filters]
    assert counts == [len(store.trajectories(**f)) for f in filters]
    assert counts[0] == 14 and counts[1] == 12 and counts[5] == 1 and counts[7] == 0
    assert 0 < counts[3] < counts[0]  # the filters select something, and not everything


def test_match_run_says_when_a_name_is_shared(store):
    first = store.create_run("demo-auto")
    second = store.create_run("demo-auto")
    lone = store.create_run("explore")
    match = store.match_run("demo-auto")
    assert (match.run.id, match.by, match.same_name) == (second.id, "name", 2)
    assert store.resolve_run("demo-auto").id == second.id
    assert store.match_run("explore").same_name == 1
    assert (store.match_run(first.id[:10]).run.id, store.match_run(first.id[:10]).by) == (
        first.id,
        "id",
    )
    assert lone.name == "explore"
    with pytest.raises(KeyError, match="no run"):
        store.match_run("nothing")


def _tree_rl_config(forks: int) -> dict:
    """A Tree-RL run's config as training/tree.py records it: hundreds of fork points."""
    from agent_graph.rollout import run_config
    from nodes.state import Budget

    config = run_config("auto", Budget())
    config["stop_policy"] = "stop@3"
    config["tree"] = {
        "stage": "reflect_refine",
        "parent_runs": ["8bda67d17dd4a9c1"],
        "group_size": 8,
        "seed": 0,
        "forks": {
            f"0190f1e2d3c4b5a6{i:016x}@3": {"trajectory": "x" * 32, "step": 3, "score": 0.5}
            for i in range(forks)
        },
    }
    return config


def test_runs_prints_one_line_per_run_whatever_its_config_holds(tmp_path):
    db = tmp_path / "atelier.db"
    with TrajectoryStore(f"sqlite:///{db}") as store:
        tree = store.create_run("tree-reflect_refine-0", _tree_rl_config(212))
        long_path = "/home/someone/" + "deep/" * 30 + "qwen-vl-vllm-omni.toml"
        served = store.create_run(
            "served", {"mode": "auto", "world": "config", "backends_config": long_path}
        )
        odd = store.create_run("[bold]odd[/bold]", {"note": "[red]x" * 40})
    for columns in ("200", "100", "80"):
        result = atelier("runs", db=db, COLUMNS=columns)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert sum(line.startswith("│") for line in lines) == 3  # one row line per run
        for run in (tree, served, odd):
            assert sum(run.id[:12] in line for line in lines) == 1  # whole, on one line
        assert all(len(line) <= int(columns) for line in lines)
    wide = atelier("runs", db=db, COLUMNS="250").stdout
    row = next(line for line in wide.splitlines() if tree.id[:12] in line)
    assert "mode=auto" in row and "stop_policy=stop@3" in row
    assert "tree(stage=reflect_refine, parent_runs: 1, G=8, seed=0, forks: 212)" in row
    assert "backends_config=qwen-vl-vllm-omni.toml" in wide  # a path by its file name
    assert "[bold]odd[/bold]" in wide  # names are shown as given, never as markup


def test_show_full_prints_every_text_whole(demo_db):
    store = TrajectoryStore(f"sqlite:///{demo_db}")
    run = store.resolve_run("demo-reflect")
    long_texts = {}
    for summary in store.trajectories(run=run.id):
        detail = store.trajectory(summary.id)
        texts = [r["text"] for s in detail.steps for r in s.update.get("reflections", [])]
        texts += [s.update["blueprint"] for s in detail.steps if "blueprint" in s.update]
        if any(len(t) > 200 for t in texts):
            long_texts = {"id": summary.id, "texts": texts}
            break
    store.close()
    assert long_texts, "no trajectory with a long reflection in the demo"
    clipped = atelier("show", short_id(long_texts["id"]), db=demo_db)
    full = atelier("show", short_id(long_texts["id"]), "--full", db=demo_db)
    assert clipped.returncode == full.returncode == 0, full.stderr
    long_one = max(long_texts["texts"], key=len)
    assert long_one not in clipped.stdout and "…" in clipped.stdout
    for text in long_texts["texts"]:  # each whole, on its line, however wide the terminal
        assert text in full.stdout
    assert len(full.stdout) > len(clipped.stdout)


def test_view_of_one_trajectory_opens_it_expanded(demo_db, tmp_path):
    store = TrajectoryStore(f"sqlite:///{demo_db}")
    run = store.resolve_run("demo-decompose")
    wanted = store.trajectories(run=run.id)[3]
    store.close()
    page = tmp_path / "one.html"
    result = atelier("view", short_id(wanted.id), "--out", str(page), db=demo_db)
    assert result.returncode == 0, result.stderr
    cards = re.findall(r'<details class="trajectory"[^>]*>', page.read_text())
    assert len(cards) == 1 and f'data-id="{wanted.id}"' in cards[0]
    assert cards[0].endswith(" open>")
    whole = tmp_path / "run.html"
    assert atelier("view", run.id[:12], "--out", str(whole), db=demo_db).returncode == 0
    cards = re.findall(r'<details class="trajectory"[^>]*>', whole.read_text())
    assert len(cards) == 18 and not any(c.endswith(" open>") for c in cards)  # a grid of cards
