"""The learning demonstration, small: ``benchmarks/learn_decomposer.py --quick`` end to end.

A random-weight LM (built offline) is taught ShapeWorld's decomposer role by LoRA SFT on the
rule-based role's recorded outputs, served by ``atelier serve lm`` as the graph's decomposer,
and trained by GRPO from the recorded graph runs with stored rewards, the new adapter loaded
into the server between iterations. Checked: the SFT student decomposes held-out prompts well
enough to finish most of them correctly (the random base writes no parseable plan at all), every
GRPO iteration starts on policy (ratio 1: the trainer saw what the server saw), and every
version is registered and its rewards stored. The full run's numbers are in BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from storage.store import TrajectoryStore

pytestmark = [pytest.mark.slow, pytest.mark.models]
ROOT = Path(__file__).resolve().parents[1]


def test_sft_then_grpo_on_a_served_decomposer(tmp_path: Path) -> None:
    out = tmp_path / "work"
    script = str(ROOT / "benchmarks" / "learn_decomposer.py")
    command = [sys.executable, script, "--quick", "--out", str(out)]
    done = subprocess.run(
        [*command, "--json", str(tmp_path / "results.json")],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    sft_only = [seed["all"] for seed in results["eval"]["SFT only"]]
    rule = [seed["all"] for seed in results["eval"]["rule-based"]]
    # SFT taught the language: a good share of its plans parse (the random base's: none) and
    # most held-out prompts end correct. Rows: accuracy, images, well-formed, role success.
    assert min(row[0] for row in sft_only) >= 0.5
    assert min(row[2] for row in sft_only) >= 0.2
    assert min(row[0] for row in rule) >= 0.8
    assert all(row[2] == 1.0 for row in rule)
    assert all(row[3] == row[0] for row in rule)  # every rule-based plan is well formed
    for runs in results["eval"].values():  # correct through a well-formed plan: both at once
        assert all(row[3] <= min(row[0], row[2]) + 1e-12 for row in (r["all"] for r in runs))
    for row in results["iterations"]:
        assert row["groups"] > 0
        assert row["first_ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    store = TrajectoryStore(f"sqlite:///{out / 'runs.db'}")
    versions = sorted(int(v.version) for v in store.policy_versions(name="decompose"))
    assert versions == list(range(1, 2 + len(results["iterations"])))  # SFT, then each GRPO
    sft_version = store.policy_versions(name="decompose", version="1")[0]
    assert Path(sft_version.path, "adapter_model.safetensors").is_file()
    names = {r.name for r in store.rewards()}
    assert {"checker", "stepwise", "sair", "sair_penalised", "lora_advantage"} <= names
    store.close()
