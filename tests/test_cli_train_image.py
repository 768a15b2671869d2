"""``atelier train --policy draw|refine``: Flow-GRPO on a diffusion LoRA, from runs the CLI
recorded with a traced image backend.

Real parts end to end: ``atelier rollout --config`` records ShapeWorld-chat runs whose generator
and editor are a tiny random-weight SD3 sampled with the Flow-GRPO SDE (``inprocess-image``,
``traced = true``, 32×32, 4 steps), storing every draw's and refine's denoising transitions;
``atelier train --policy draw`` (then ``refine``) stores R3's stage rewards, trains the LoRA
(ratio 1 before the first update), saves and registers a new version, and stores what each
member was trained with. The rewards are checked against a recomputation by hand from the judge
scores the graph stored; training again from the saved version adds no reward row twice; bad
input is one ``atelier: error:`` line."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from atelier.cli import main
from storage.store import TrajectoryStore

pytest_plugins = ("tests.tiny_models",)
pytestmark = pytest.mark.models

SMALL = ("--flow-r", "4", "--flow-alpha", "8", "--flow-lr", "0.01")
"""A small LoRA and a learning rate that moves it in two steps."""
EPS, ADV_CLIP = 1e-4, 5.0
"""``flow_advantages``' eps and ``FlowGRPOConfig.adv_clip``."""


def _backends(tmp: Path, sd3: Path) -> Path:
    """ShapeWorld plans, reflects and judges; the tiny SD3 draws and edits, traced."""
    path = tmp / "flow.toml"
    path.write_text(
        '[backends.world]\nkind = "shapeworld"\n\n'
        f'[backends.sd3]\nkind = "inprocess-image"\nmodel = "{sd3}"\ntraced = true\n'
        'steps = 4\nsize = "32x32"\ndevice = "cpu"\ntorch_threads = 1\n\n'
        '[roles]\nplanner = "world"\nreflector = "world"\ndecomposer = "world"\n'
        'generator = "sd3"\neditor = "sd3"\njudge = "world"\n'
    )
    return path


@pytest.fixture(scope="module")
def recorded(tiny_sd3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with three runs: ``draws`` (direct mode, traced), ``refl`` (reflect mode, one
    round: draw then refine, traced) and ``plain`` (ShapeWorld only: no transitions)."""
    tmp = tmp_path_factory.mktemp("train-image")
    db = tmp / "runs.db"
    config = str(_backends(tmp, tiny_sd3))
    common = ("--per-category", "1", "-G", "3", "--db", str(db))
    assert (
        main(["rollout", "--config", config, "--mode", "direct", "--name", "draws", *common]) == 0
    )
    refl = ("--mode", "reflect", "--max-rounds", "1", "--name", "refl")
    assert main(["rollout", "--config", config, *refl, *common]) == 0
    assert main(["rollout", "--mode", "direct", "--name", "plain", *common]) == 0
    return db


def _copy(db: Path, tmp: Path) -> str:
    """The recorded store, copied: each test starts from the same rows."""
    for file in db.parent.glob(db.name + "*"):  # the database and any journal beside it
        shutil.copy(file, tmp / file.name)
    return str(tmp / db.name)


def _train(db: str, out: Path, *args: str) -> int:
    return main(["train", "--db", db, "--out", str(out), *SMALL, *args])


def _table(stdout: str) -> dict[str, str]:
    rows = [line for line in stdout.splitlines() if line.count("|") == 3 and "---" not in line]
    return dict(line.strip("| ").split(" | ") for line in rows)


def _steps_of(store: TrajectoryStore, run: str) -> dict[str, list[Any]]:
    run_id = store.match_run(run).run.id
    ids = [t.id for t in store.trajectories(run=run_id, limit=None) if t.status == "succeeded"]
    return store.steps_many(ids)


def _rows(store: TrajectoryStore, name: str) -> dict[tuple[str, int | None], Any]:
    return {(r.trajectory_id, r.step_seq): r for r in store.rewards(name=name)}


def _advantages(rewards: list[float]) -> list[float]:
    """Flow-GRPO's advantage, by hand: clip((r − mean) / (std + eps), ±5); 0 if all equal."""
    if len(set(rewards)) == 1:
        return [0.0] * len(rewards)
    mean, std = statistics.fmean(rewards), statistics.stdev(rewards)
    return [max(-ADV_CLIP, min(ADV_CLIP, (r - mean) / (std + EPS))) for r in rewards]


def _check_trained_rows(
    store: TrajectoryStore, stage: str, trained: str
) -> dict[str, list[tuple[float, float]]]:
    """Every member's ``flow_reward`` is its stored stage reward, and its ``flow_advantage``
    the group-relative advantage of those rewards; returns group id -> (reward, advantage)."""
    stage_rows = _rows(store, stage)
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in store.rewards(name="flow_reward"):
        if row.details["trained"] != trained:
            continue
        assert row.value == stage_rows[(row.trajectory_id, row.step_seq)].value
        (advantage,) = [
            a
            for a in store.rewards(row.trajectory_id, "flow_advantage")
            if a.step_seq == row.step_seq and a.details["trained"] == trained
        ]
        groups.setdefault(row.details["group"], []).append((row.value, advantage.value))
    assert groups
    for members in groups.values():
        expected = _advantages([r for r, _ in members])
        assert [a for _, a in members] == pytest.approx(expected, abs=1e-5)
    return groups


def _trained_on(groups: dict[str, list[tuple[float, float]]]) -> int:
    """Members of groups with a learning signal: one SDE transition each (R3's default)."""
    return sum(len(m) for m in groups.values() if len({r for r, _ in m}) > 1)


def test_train_draw_then_continue_from_the_saved_version(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, out = _copy(recorded, tmp_path), tmp_path / "policies"
    model = str(_model_dir(recorded))
    capsys.readouterr()
    assert _train(db, out, "--policy", "draw", "--run", "draws", "--model", model) == 0
    printed = capsys.readouterr()
    assert float(_table(printed.out)["first_max_abs_log_ratio"]) < 1e-5  # what the sampler saw
    assert float(_table(printed.out)["steps"]) >= 1
    assert f"saved {out / 'draw-1'}" in printed.out
    assert f"--lora draw@1={(out / 'draw-1').resolve()}" in printed.err

    store = TrajectoryStore(f"sqlite:///{db}")
    (version,) = store.policy_versions(name="draw")
    assert (version.version, Path(version.path)) == ("1", (out / "draw-1").resolve())
    assert version.metadata["reward"] == "reason_image" and version.metadata["config"]["r"] == 4
    assert version.metadata["kind"] == "diffusion-lora" and version.metadata["sampled_by"] == [
        "base"
    ]
    assert (out / "draw-1" / "adapter_model.safetensors").is_file()

    # reason_image on each draw step is R3's r_image = V of the image that draw made, V as the
    # graph stored it with the image (the judge's score against the prompt).
    stored = _rows(store, "reason_image")
    draws = 0
    for tid, steps in _steps_of(store, "draws").items():
        (draw,) = [s for s in steps if s.node == "draw"]
        (image,) = draw.update["images"]
        assert stored[(tid, draw.seq)].value == float(image["score"])
        draws += 1
    assert draws == 27
    groups = _check_trained_rows(store, "reason_image", "draw@1")
    assert len(groups) == float(_table(printed.out)["groups"]) == 9
    assert _trained_on(groups) == float(_table(printed.out)["transitions"]) > 0
    before = Counter(r.id for r in store.rewards() if not r.name.startswith("flow_"))
    store.close()

    # Again, from the saved version: version 2, and not one stage-reward row stored twice.
    init = ("--init", str(out / "draw-1"))
    assert _train(db, out, "--policy", "draw", "--run", "draws", "--model", model, *init) == 0
    printed = capsys.readouterr()
    assert "sampled by base, not draw@1" in printed.err  # off-policy, said so
    store = TrajectoryStore(f"sqlite:///{db}")
    second = store.policy_versions(name="draw", version="2")[0]
    assert second.metadata["parent"] == "1" and (out / "draw-2").is_dir()
    assert Counter(r.id for r in store.rewards() if not r.name.startswith("flow_")) == before
    assert _check_trained_rows(store, "reason_image", "draw@2") == groups
    store.close()

    # A third time from version 1 would save version 2 again: refused, nothing written.
    assert _train(db, out, "--policy", "draw", "--run", "draws", "--model", model, *init) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("atelier: error: draw@2, which training from draw@1 would save")


def test_train_refine_stores_r3s_correction_per_refine_step(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, out = _copy(recorded, tmp_path), tmp_path / "policies"
    model = str(_model_dir(recorded))
    store = TrajectoryStore(f"sqlite:///{db}")
    assert not store.rewards(name="refinement")  # nothing stored by hand
    store.close()
    capsys.readouterr()
    assert _train(db, out, "--policy", "refine", "--run", "refl", "--model", model) == 0
    printed = capsys.readouterr()
    assert float(_table(printed.out)["first_max_abs_log_ratio"]) < 1e-5
    assert float(_table(printed.out)["groups_used"]) >= 1

    # C_j by hand: V̂ of the image the reflection looked at, V of the image its edit made (both
    # as the graph stored them, against the prompt): V − V̂ if V̂ < 1, else 1[stop phrase].
    store = TrajectoryStore(f"sqlite:///{db}")
    stored = _rows(store, "refinement")
    refines = 0
    for tid, steps in _steps_of(store, "refl").items():
        images = [image for step in steps for image in step.update.get("images") or ()]
        for index, step in enumerate(steps[:-1]):
            following = steps[index + 1]
            if step.node != "reflect" or following.node != "refine":
                continue
            (reflection,) = step.update["reflections"]
            assert reflection["target"] == store.trajectory(tid).prompt
            v_prev = float(images[reflection["image_index"]]["score"])
            (made,) = following.update["images"]
            v_new = float(made["score"])
            c = v_new - v_prev if v_prev < 1.0 else float(reflection["stop_phrase"])
            assert stored[(tid, following.seq)].value == pytest.approx(c, abs=1e-12)
            refines += 1
    assert refines == len(stored) > 0
    groups = _check_trained_rows(store, "refinement", "refine@1")
    assert sum(map(len, groups.values())) == refines
    assert _trained_on(groups) == float(_table(printed.out)["transitions"]) > 0
    (version,) = store.policy_versions(name="refine")
    assert version.version == "1" and version.metadata["reward"] == "refinement"
    store.close()


def test_train_draw_on_two_runs_reads_the_groups_of_both(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reflect-mode run's first draws are draw members too: 9 groups from each run."""
    db, out = _copy(recorded, tmp_path), tmp_path / "policies"
    runs = ("--run", "draws", "--run", "refl")
    capsys.readouterr()
    assert _train(db, out, "--policy", "draw", *runs, "--model", str(_model_dir(recorded))) == 0
    assert float(_table(capsys.readouterr().out)["groups"]) == 18
    store = TrajectoryStore(f"sqlite:///{db}")
    (version,) = store.policy_versions(name="draw")
    named = {store.match_run(name).run.id for name in ("draws", "refl")}
    assert set(version.metadata["runs"]) == named
    store.close()


def _model_dir(db: Path) -> Path:
    """The tiny SD3 the fixture's backends file names."""
    text = (db.parent / "flow.toml").read_text()
    return Path(text.split('model = "', 1)[1].split('"', 1)[0])


def _not_flow(tmp: Path) -> str:
    path = tmp / "sd15"
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return str(path)


def _empty(tmp: Path) -> str:
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


BAD = [
    (("--world", "shapeworld"), "trains from recorded runs: give them with --run"),
    (("--model", "/no/such/model"), "--model /no/such/model: no such model directory"),
    (("--model", "{empty}"), "is not a diffusers pipeline directory"),
    (("--model", "{not_flow}"), "is a StableDiffusionPipeline, not a flow-matching pipeline"),
    (("--run", "plain"), "no draw step recorded denoising transitions: record runs with a traced"),
    (("--run", "draws", "--policy", "refine"), "(refine steps: --mode reflect)"),
    (("--reward", "no_such_reward"), "no draw groups of 2 or more"),
    (("--flow-lr", "-1"), "--flow-lr must be finite and >=0, not -1.0"),
    (("--flow-clip-range", "nan"), "--flow-clip-range must be finite and >0"),
    (("--flow-minibatch", "0"), "--flow-minibatch must be an integer >= 1, not 0"),
    (("--init", "{empty}"), "is not a saved diffusion LoRA (no adapter_config.json)"),
    (("--lr", "0.1"), "--lr: text-policy options; --policy draw takes the --flow-* options"),
    (("--reward-source", "judge"), "--reward-source judge scores images with a VLM, and"),
    (("--policy", "refine", "--reward-source", "gvu"), "apply to --policy draw with --run"),
    (("--policy", "stop", "--model", "{empty}"), "train a text or image policy"),
    (("--policy", "plan", "--flow-beta", "0"), "--flow-beta: the Flow-GRPO options train"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_image_policy_input_is_one_line(
    recorded: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    message: str,
) -> None:
    db = _copy(recorded, tmp_path)
    paths = {"empty": _empty(tmp_path), "not_flow": _not_flow(tmp_path)}
    given = [part.format(**paths) for part in extra]
    args = {"--policy": "draw", "--run": "draws", "--model": str(_model_dir(recorded))}
    for flag in list(args):  # the case's own --policy, --run (or --world) and --model win
        if flag in given or (flag == "--run" and "--world" in given):
            del args[flag]
    capsys.readouterr()
    out = ("--out", str(tmp_path / "atelier-policies"))
    code = main(["train", "--db", db, *out, *[p for kv in args.items() for p in kv], *given])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("atelier: error:") and message in lines[0], lines[0]
    assert not (tmp_path / "atelier-policies").exists()


def test_the_flow_options_match_the_trainers_config_and_load_no_torch() -> None:
    from dataclasses import fields

    from atelier.cli.train_image import FLOW_OPTIONS
    from training.images.trainer import FlowGRPOConfig

    defaults = {f.name: f.default for f in fields(FlowGRPOConfig)}
    assert {o.field: o.default for o in FLOW_OPTIONS} == {
        name: value for name, value in defaults.items() if name not in ("target_modules", "seed")
    }
    probe = "import sys, atelier.cli.train; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0
