"""Training curves in the terminal: ``sparkline``, ``curve_lines``, and the curves ``atelier
train`` and ``atelier runs --curves`` print."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from atelier.cli import main
from atelier.cli.curves import BARS, FLAT, curve_lines, sparkline
from storage.analysis import TrainingPoint, run_summary, training_series
from storage.store import TrajectoryStore

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)


def test_sparkline_edge_cases():
    assert sparkline([]) == ""
    assert sparkline([0.7]) == FLAT
    assert sparkline([2.0, 2.0, 2.0]) == FLAT * 3  # constant: a flat middle line
    assert sparkline([0.0, 1.0]) == BARS[0] + BARS[-1]
    assert sparkline([-1.0, -0.5, 0.0]) == BARS[0] + BARS[4] + BARS[-1]  # negatives scale too
    assert sparkline([-3.0, -3.0]) == FLAT * 2
    assert sparkline([math.nan, 1.0, math.inf, 3.0, None]) == f" {BARS[0]} {BARS[-1]} "
    assert sparkline([math.nan, math.nan]) == "  "
    assert sparkline([1.0, math.nan, 1.0]) == f"{FLAT} {FLAT}"
    line = sparkline([float(i) for i in range(8)])
    assert line == BARS and len(sparkline(range(100))) == 100  # type: ignore[arg-type]


def _point(index: int, **metrics: float) -> TrainingPoint:
    return TrainingPoint(index, str(index + 1), NOW, None, metrics, None)


def test_curve_lines_show_each_metric_that_has_a_value():
    points = [
        _point(0, loss=0.5, kl=0.0, clip_low=0.1, clip_high=0.2),
        _point(1, loss=math.nan, kl=0.0, clip_low=0.0, clip_high=0.1),
        _point(2, loss=0.125, kl=0.0, clip_low=0.0, clip_high=0.0),
    ]
    lines = curve_lines(points)
    assert [line.split("  ")[0].strip() for line in lines] == ["loss", "kl", "clip fraction"]
    loss, kl, clip = lines
    assert f"{BARS[-1]} {BARS[0]}" in loss and "0.500 → 0.125 (3 iterations)" in loss
    assert FLAT * 3 in kl and "0.000 → 0.000" in kl
    assert f"{BARS[-1]}" in clip and "0.300 → 0.000" in clip
    assert curve_lines([_point(0)]) == []
    assert curve_lines([_point(0, loss=1e-5)]) == [
        f"{'loss':<13}  {FLAT}  1.00e-05 → 1.00e-05 (1 iteration)"
    ]


def _curve(out: str, name: str) -> str:
    (line,) = [line for line in out.splitlines() if line.strip().startswith(f"{name} ")]
    return line


def test_train_prints_curves_and_runs_lists_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    db = f"sqlite:///{tmp_path / 'train.db'}"
    out_dir = str(tmp_path / "versions")
    common = ["--per-category", "1", "-G", "4", "--out", out_dir, "--db", db]
    TrajectoryStore(db).close()  # an empty store
    assert main(["runs", "--curves", "--db", db]) == 0
    assert "no training series in this store" in capsys.readouterr().out

    assert main(["train", "--world", "shapeworld", "--iterations", "2", *common]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[0].startswith("| iteration | behaviour | mean V |")
    assert out.index("|---") < out.index("reward ")  # the curves come after the table
    store = TrajectoryStore(db)
    runs = {run.name: run.id for run in store.runs()}
    first, second = (run_summary(store, runs[f"grpo-{i}"]) for i in range(2))
    reward = _curve(out, "reward")
    assert f"{first.mean_score:.3f} → {second.mean_score:.3f} (2 iterations)" in reward
    printed = [float(row.split("|")[3]) for row in table[1:]]  # the table's mean V column
    assert printed == pytest.approx([first.mean_score, second.mean_score], abs=5e-4)
    for name in ("accuracy", "images", "loss", "kl", "clip fraction"):
        assert "(2 iterations)" in _curve(out, name)

    assert main(["runs", "--curves", "--db", db]) == 0
    listed = capsys.readouterr().out
    (series,) = training_series(store)
    assert f"{series.label}  [{series.key}]" in listed
    assert "grpo-0" in series.label and "router@1…2" in series.label
    assert _curve(listed, "reward") == f"  {reward}"

    # Tree-RL from the stored run: its iterations' curves (the forked runs' rollouts)
    tree = ["--run", "grpo-0", "--tree-stage", "reflect_refine", "--starts", "4"]
    assert main(["train", *tree, "--iterations", "2", *common]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("| ")]) == 3
    assert "(2 iterations)" in _curve(out, "reward")
    stop = store.policy_versions(name="stop")
    assert stop and all(v.metadata["run"] == v.metadata["fork_run"] for v in stop)
    assert len({v.metadata["series"] for v in stop}) == 1
    (tree_series,) = [s for s in training_series(store) if s.policy == "stop"]
    assert [p.run_id for p in tree_series.points] == [v.metadata["run"] for v in stop]
    assert all(p.rollout is not None for p in tree_series.points)
    store.close()
