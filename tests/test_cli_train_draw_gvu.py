"""GvU's intrinsic reward trains the draw policy with Flow-GRPO, end to end from the command line
(issue 15, item 4): ``atelier rollout`` records direct-mode runs whose generator is a traced tiny
SD3 (transitions stored) and whose judge is the tiny VLM behind ``atelier serve lm``; ``atelier
train --run R --policy draw --reward-source gvu`` scores every final image through that server
(``score_text``), stores the values, and trains the draw LoRA on them. The stored values equal a
transformers forward pass written out in the test, and each draw member was trained with its
trajectory's stored GvU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storage.store import TrajectoryStore
from tests.cli_helpers import run_atelier

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

pytest_plugins = ("tests.tiny_models",)
pytestmark = [pytest.mark.models, pytest.mark.slow]


def _backends(tmp: Path, sd3: Path, vlm: Any) -> Path:
    path = tmp / "gvu.toml"
    path.write_text(
        '[backends.world]\nkind = "shapeworld"\n\n'
        f'[backends.sd3]\nkind = "inprocess-image"\nmodel = "{sd3}"\ntraced = true\nsteps = 2\n'
        'size = "32x32"\ntorch_threads = 1\n\n'
        f'[backends.vlm]\nkind = "openai"\nurls = ["{vlm.url}"]\ntimeout_s = 60\n\n'
        '[roles]\nplanner = "world"\nreflector = "world"\ndecomposer = "world"\n'
        'generator = "sd3"\neditor = "world"\njudge = "vlm"\n'
    )
    return path


def test_gvu_scores_the_final_images_and_trains_the_draw_lora(
    tiny_sd3: Path, lm_server: Any, tiny_models: Any, tmp_path: Path
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tests.test_rewards_sources import gvu_by_hand

    db = tmp_path / "a.db"
    config = _backends(tmp_path, tiny_sd3, lm_server)
    recorded = run_atelier(
        *("rollout", "--config", str(config), "--mode", "direct", "--per-category", "1"),
        *("-G", "3", "--name", "drawn"),
        db=db,
        cwd=tmp_path,
        timeout=600,
    )
    assert recorded.returncode == 0, recorded.stderr
    train = ["train", "--run", "drawn", "--policy", "draw", "--model", str(tiny_sd3)]
    train += ["--reward-source", "gvu", "--flow-r", "4", "--flow-minibatch", "8"]
    done = run_atelier(*train, "--out", "versions", db=db, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr

    model = LlavaForConditionalGeneration.from_pretrained(tiny_models.vlm, dtype=torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(tiny_models.vlm)
    with TrajectoryStore(f"sqlite:///{db}") as store:
        (version,) = store.policy_versions(name="draw")
        assert version.metadata["reward"] == "gvu"
        assert version.metadata["reward_source"]["kind"] == "gvu"
        assert abs(version.metadata["first_max_abs_log_ratio"]) < 1e-4  # ratio 1: on-policy
        finals = store.trajectories(run=store.resolve_run("drawn").id, status="succeeded")
        gvu = {r.trajectory_id: r for r in store.rewards(name="gvu")}
        assert set(gvu) == {t.id for t in finals if t.final_image}
        for summary in finals[:4]:  # the server's value = the forward pass written out
            row = gvu[summary.id]
            image = store.get(summary.final_image)
            instruction = row.details["scored_by"].get("instruction", "Describe this image.")
            expected, _ = gvu_by_hand(model, processor, image, summary.prompt, instruction)
            assert row.value == pytest.approx(expected, rel=1e-5)
        # Every draw member was trained with its trajectory's stored GvU.
        trained = store.rewards(name="flow_reward")
        assert trained and {r.details["trained"] for r in trained} == {f"draw@{version.version}"}
        for row in trained:
            assert row.value == gvu[row.trajectory_id].value and row.step_seq is not None
        rows_before = len(store.rewards(name="gvu"))

    # Training again from draw@1 scores nothing twice: the stored GvU (same source) is kept.
    init = ["--init", version.path, "--out", "versions"]
    again = run_atelier(*train, *init, db=db, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr
    with TrajectoryStore(f"sqlite:///{db}") as store:
        assert len(store.rewards(name="gvu")) == rows_before
        assert [v.version for v in store.policy_versions(name="draw")] == ["1", "2"]


def test_reward_sources_apply_to_draw_from_runs_only(tmp_path: Path, tiny_sd3: Path) -> None:
    for extra in (
        ("--policy", "refine", "--run", "x", "--reward-source", "gvu"),
        ("--policy", "draw", "--run", "x", "--reward-source", "gvu", "--reward", "V"),
    ):
        done = run_atelier(
            "train", *extra, "--model", str(tiny_sd3), db=tmp_path / "a.db", cwd=tmp_path
        )
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "apply to --policy draw with --run" in lines[0], done.stderr
