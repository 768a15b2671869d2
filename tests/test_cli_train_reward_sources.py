"""``atelier train --run --reward-source``: R_o scored by the runs' own VLM, with real servers.

``atelier rollout`` records a run whose judge is the tiny VLM behind ``atelier serve lm`` (in
this process, on loopback) and whose other roles are ShapeWorld. ``atelier train --run ...
--reward-source gvu`` then scores every final image with GvU's intrinsic reward through that
server, stores it as ``gvu``, and trains on it: the test recomputes one stored value through
the in-process model and every stored composite, penalised reward and advantage from the stored
``gvu`` and ``format`` rows. The backends file's ``[rewards]`` table sets the defaults, the
command line overrides it, and a bad table stops the command with one line."""

from __future__ import annotations

import asyncio
import math
import statistics
from pathlib import Path
from typing import Any

import pytest

from storage.store import TrajectoryStore
from tests.cli_helpers import run_atelier

pytest_plugins = ("tests.tiny_models",)
pytestmark = pytest.mark.models

PROMPTS = "a red circle\ntwo blue squares\nthree green triangles above a yellow star\n"
WEIGHTS = (1.0, 0.5, 0.0)
EPS = 0.05  # GRPOConfig's complexity_eps (--penalty scale, the default)
ADVANTAGE_EPS = 1e-4


def _backends(path: Path, url: str, rewards: str = "") -> Path:
    path.write_text(
        '[backends.world]\nkind = "shapeworld"\n\n'
        f'[backends.vlm]\nkind = "openai"\nurls = ["{url}"]\ntimeout_s = 60\nretries = 0\n\n'
        '[roles]\nplanner = "world"\nreflector = "world"\ndecomposer = "world"\n'
        'generator = "world"\neditor = "world"\njudge = "vlm"\n' + rewards
    )
    return path


def _rows(store: TrajectoryStore, name: str) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for reward in store.rewards(name=name):
        found.setdefault(reward.trajectory_id, []).append(reward)
    return found


def _penalised(rewards: list[float], images: list[int]) -> list[float]:
    """SAIR's penalty as the paper states it: near-best members scaled by N* / N_i."""
    counts = [max(1, n) for n in images]
    near = [r >= max(rewards) - EPS for r in rewards]
    fewest = min(n for n, is_near in zip(counts, near, strict=True) if is_near)
    return [r * fewest / n if m else r for r, n, m in zip(rewards, counts, near, strict=True)]


@pytest.fixture(scope="module")
def recorded(lm_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("reward-sources")
    config = _backends(tmp / "served.toml", lm_server.url)
    (tmp / "prompts.txt").write_text(PROMPTS)
    db = tmp / "runs.db"
    done = run_atelier(
        *("rollout", "--config", str(config), "--prompts", "prompts.txt", "-G", "3"),
        *("--max-rounds", "1", "--name", "served"),
        db=db,
        cwd=tmp,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return tmp, db, config


def test_gvu_scores_final_images_on_the_runs_vlm_and_the_trainer_uses_them(
    recorded: Any, vlm_service: Any
):
    tmp, db, _ = recorded
    before = vlm_service.batcher.requests
    done = run_atelier(
        *("train", "--run", "served", "--reward-source", "gvu", "--out", "versions"),
        *("--reward-weights", ",".join(map(str, WEIGHTS))),
        db=db,
        cwd=tmp,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    served = vlm_service.batcher.requests - before
    assert "trained router@1" in done.stdout

    with TrajectoryStore(f"sqlite:///{db}") as store:
        run = store.resolve_run("served")
        finals = [
            t for t in store.trajectories(run=run.id, limit=None) if t.final_image is not None
        ]
        gvu, judged = _rows(store, "gvu"), {t.id: t.score for t in finals}
        assert not _rows(store, "checker")  # the stored judge score was not trained on
        # One gvu reward per final image, each scored by the run's own VLM server (score_text
        # over HTTP: the conversation with the prompt, and without it: two requests).
        assert finals and set(gvu) == {t.id for t in finals}
        assert all(len(rows) == 1 for rows in gvu.values()) and served == 2 * len(finals)
        for rows in gvu.values():
            assert 0 < rows[0].value < 1 and rows[0].details["model"] == "tiny-vlm"

        # A stored value is GvU's: exp(mean log p(prompt | image, instruction)), here from the
        # in-process model's own scoring, not through the server.
        from nodes.backends.base import ChatMessage
        from nodes.backends.engines.lm_inprocess import InProcessChatModel

        first = finals[0]
        turn = ChatMessage("user", "Describe this image.", images=(store.get(first.final_image),))
        scored = asyncio.run(InProcessChatModel(vlm_service).score_text([turn], first.prompt))
        expected = math.exp(statistics.fmean(scored.logprobs))
        assert gvu[first.id][0].value == pytest.approx(expected, rel=1e-5)

        # What the router was trained with recomputes from the stored gvu and format rows.
        fmt, composite = _rows(store, "format"), _rows(store, "composite")
        penalised, advantage = _rows(store, "penalised"), _rows(store, "advantage")
        groups: dict[str, list[str]] = {}
        for tid, rows in advantage.items():
            groups.setdefault(rows[0].details["group"], []).append(tid)
        images = {t.id: t.image_count for t in finals}
        assert len(groups) >= 2
        differs = spread = 0
        for ids in groups.values():
            r = [WEIGHTS[0] * gvu[t][0].value + WEIGHTS[1] * fmt[t][0].value for t in ids]
            assert [composite[t][0].value for t in ids] == pytest.approx(r, abs=1e-12)
            shaped = _penalised(r, [images[t] for t in ids])
            assert [penalised[t][0].value for t in ids] == pytest.approx(shaped, abs=1e-12)
            mean, std = statistics.fmean(shaped), statistics.stdev(shaped)
            expected_adv = [(v - mean) / (std + ADVANTAGE_EPS) for v in shaped]
            assert [advantage[t][0].value for t in ids] == pytest.approx(expected_adv, abs=1e-9)
            spread += std > 0
            on_checker = [judged[t] + WEIGHTS[1] * fmt[t][0].value for t in ids]
            differs += any(abs(a - b) > 1e-6 for a, b in zip(r, on_checker, strict=True))
        assert spread and differs  # a signal, and not the stored judge score's

        versions = store.policy_versions(name="router")
        (version,) = [v for v in versions if Path(v.path).parent.name == "versions"]
        assert version.metadata["config"]["outcome_reward"] == "gvu"
        assert version.metadata["reward_source"] == {
            "reward": "gvu",
            "kind": "gvu",
            "model": "tiny-vlm",
            "instruction": "Describe this image.",
        }


def test_the_files_rewards_table_sets_the_source_and_the_command_line_wins(recorded: Any):
    tmp, db, config = recorded
    original = config.read_text()
    config.write_text(original + '\n[rewards]\nsource = "judge"\ntop_logprobs = 5\n')
    try:
        by_file = run_atelier(
            *("train", "--run", "served", "--out", "by-file"), db=db, cwd=tmp, timeout=600
        )
        by_flag = run_atelier(
            *("train", "--run", "served", "--reward-source", "checker", "--out", "by-flag"),
            db=db,
            cwd=tmp,
            timeout=600,
        )
        wrong_flag = run_atelier(
            *("train", "--run", "served", "--gvu-instruction", "What is this?"),
            db=db,
            cwd=tmp,
        )
    finally:
        config.write_text(original)
    assert by_file.returncode == 0, by_file.stderr
    assert by_flag.returncode == 0, by_flag.stderr
    lines = wrong_flag.stderr.strip().splitlines()
    assert wrong_flag.returncode == 2 and lines == [
        "atelier: error: --gvu-instruction applies to --reward-source gvu, not judge"
    ]
    with TrajectoryStore(f"sqlite:///{db}") as store:
        run = store.resolve_run("served")
        finals = [t for t in store.trajectories(run=run.id, limit=None) if t.final_image]
        yes = _rows(store, "vlm_yes")
        assert set(yes) == {t.id for t in finals}
        assert all(0 <= rows[0].value <= 1 and len(rows) == 1 for rows in yes.values())
        by_path = {Path(v.path).parent.name: v for v in store.policy_versions(name="router")}
        judged, stored = by_path["by-file"].metadata, by_path["by-flag"].metadata
        assert judged["config"]["outcome_reward"] == "vlm_yes"
        assert judged["reward_source"] == {
            "reward": "vlm_yes",
            "kind": "judge",
            "judge": "vlm-judge:tiny-vlm",
            "top_logprobs": 5,
        }
        assert stored["config"]["outcome_reward"] == "checker"
        assert stored["reward_source"]["kind"] == "checker"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('source = "clip"', "rewards.source: Input should be 'checker', 'judge' or 'gvu'"),
        ('source = "gvu"\nbackend = "nope"', "rewards.backend: no backend named 'nope'"),
        (
            'source = "gvu"\nbackend = "world"',
            "rewards.backend: backend 'world' is of kind 'shapeworld'",
        ),
    ],
)
def test_a_bad_rewards_table_stops_training_with_one_line(recorded: Any, table: str, message: str):
    tmp, db, config = recorded
    original = config.read_text()
    config.write_text(original + f"\n[rewards]\n{table}\n")
    try:
        done = run_atelier(*("train", "--run", "served", "--out", "bad"), db=db, cwd=tmp)
    finally:
        config.write_text(original)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("atelier: error: ") and message in lines[0]
    assert str(config.resolve()) in lines[0] and "Traceback" not in done.stderr
    assert not (tmp / "bad").exists()
