"""A role's adapter version from a backends file, on real servers (issue 15, item 1).

Two replicas of ``atelier serve lm`` (the tiny text LM, in this process, on loopback) are the
decomposer of ``examples/configs/tiny-deployed.toml``; its ``decomposer`` role names the adapter
``decompose@1`` (a peft LoRA registered in the store, as ``atelier train`` registers one) and its
``[policies]`` table router@1 and stop@1 (trained by ``atelier train``). ``atelier rollout``
loads the adapter on both replicas before anything runs, and every recorded decomposer
generation names ``decompose@1`` as its model (the server answers under the name it served).
A run interrupted mid-way resumes only with the adapter versions it recorded, loading them
again on servers that lost them; an adapter the servers cannot load stops the rollout before a
run is created, with one line."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest

from storage.store import TrajectoryStore
from tests.cli_helpers import run_atelier

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytest_plugins = ("tests.tiny_models",)
pytestmark = pytest.mark.models

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny-deployed.toml"
PROMPTS = "two red circles left of a blue square\nthree green triangles above a yellow star\n"


@pytest.fixture(scope="module")
def replicas(text_lm_replicas: Any) -> Any:
    """Two ``atelier serve lm`` replicas of the tiny text LM: (servers, services)."""
    return text_lm_replicas


def peft_lora(model_dir: Path, directory: Path, targets: list[str], seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():  # peft calls a transformers API deprecated for v6
        warnings.simplefilter("ignore", FutureWarning)
        get_peft_model(model, config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def deployed(replicas: Any, tiny_models: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A store with router@1, stop@1 (trained) and decompose@1 (a registered LoRA adapter), and
    the environment pointing the example config at the two replicas."""
    servers, _ = replicas
    tmp = tmp_path_factory.mktemp("deploy-adapters")
    db = tmp / "atelier.db"
    common = ("--per-category", "1", "-G", "2", "--max-rounds", "1", "--out", "versions")
    for args in (("--iterations", "1"), ("--policy", "stop", "--iterations", "1")):
        done = run_atelier("train", "--world", "shapeworld", *args, *common, db=db, cwd=tmp)
        assert done.returncode == 0, done.stderr
    adapter = peft_lora(tiny_models.lm, tmp / "adapters" / "decompose-1", ["q_proj", "v_proj"], 3)
    broken = shutil.copytree(adapter, tmp / "adapters" / "decompose-2")
    config = json.loads((broken / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_proj"]  # peft finds nothing to adapt: a failed load
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with TrajectoryStore(f"sqlite:///{db}") as store:
        for version, path in (("1", adapter), ("2", broken)):
            store.register_policy_version(
                "decompose", version, path=str(path.resolve()), metadata={"kind": "text-lora"}
            )
    (tmp / "prompts.txt").write_text(PROMPTS)
    env = {"ATELIER_LM_URL": servers[0].url, "ATELIER_LM_URL_2": servers[1].url}
    return tmp, db, env


def generations(db: Path, run_id: str, node: str) -> list[Any]:
    with TrajectoryStore(f"sqlite:///{db}") as store:
        return [
            generation
            for summary in store.trajectories(run=run_id)
            for step in store.trajectory(summary.id).steps
            if step.node == node
            for generation in step.generations
        ]


def test_the_example_config_loads_the_adapter_version_on_every_replica(deployed, replicas):
    tmp, db, env = deployed
    _, services = replicas
    for service in services:  # as if freshly started: the version is not there yet
        if "decompose@1" in service.engine.adapters:
            asyncio.run(service.unload_adapter("decompose@1"))
    done = run_atelier(
        *("rollout", "--config", str(EXAMPLE), "--mode", "decompose"),
        *("--prompts", "prompts.txt", "-G", "2", "--name", "deployed"),
        db=db,
        cwd=tmp,
        timeout=600,
        **env,
    )
    assert done.returncode == 0, done.stderr
    assert "--mode decompose replaces" in done.stderr  # the example's [policies] router
    path = str((tmp / "adapters" / "decompose-1").resolve())
    for service in services:
        assert service.engine.adapters.get("decompose@1") == path
    with TrajectoryStore(f"sqlite:///{db}") as store:
        run = store.resolve_run("deployed")
    assert run.config["adapters"] == {"decomposer": "decompose@1"}
    assert run.config["adapter_paths"] == {"decomposer": path}
    assert run.config["policies"] == {"stop": "stop@1"}  # --mode replaced the file's router
    made = generations(db, run.id, "decompose")
    assert len(made) >= 4 and {g.model for g in made} == {"decompose@1"}
    assert all(g.token_ids and len(g.logprobs) == len(g.token_ids) for g in made)


def _interrupted(db: Path, config: Path, env: dict[str, str], cwd: Path) -> str:
    """``atelier rollout`` in this process, Ctrl-C'd once its first step is recorded."""
    from atelier.cli import app as cli
    from storage.recorder import SQLRecorder

    record_step = SQLRecorder.record_step
    sent: list[int] = []

    async def record_then_interrupt(self, record):
        await record_step(self, record)
        if not sent:
            sent.append(record.seq)
            os.kill(os.getpid(), signal.SIGINT)

    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    here = Path.cwd()
    os.chdir(cwd)
    SQLRecorder.record_step = record_then_interrupt
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = ["rollout", "--config", str(config), "--mode", "decompose", "--prompts"]
        code = cli.main([*args, "prompts.txt", "-G", "2", "--name", "cut", "--db", str(db)])
    finally:
        signal.signal(signal.SIGINT, previous)
        SQLRecorder.record_step = record_step
        os.chdir(here)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert code == 130
    with TrajectoryStore(f"sqlite:///{db}") as store:
        run = store.resolve_run("cut")
        assert any(t.status != "succeeded" for t in store.trajectories(run=run.id))
        return run.id


def test_resume_keeps_the_recorded_adapter_and_loads_it_again(deployed, replicas, capsys):
    tmp, db, env = deployed
    _, services = replicas
    config = tmp / "configs" / "deployed.toml"
    config.parent.mkdir(exist_ok=True)
    shutil.copy(EXAMPLE, config)
    run_id = _interrupted(db, config, env, tmp)
    capsys.readouterr()
    for service in services:  # the servers restarted meanwhile: the adapter is gone
        asyncio.run(service.unload_adapter("decompose@1"))

    config.write_text(EXAMPLE.read_text().replace('"decompose@1"', '"decompose@2"'))
    changed = run_atelier("resume", run_id, db=db, cwd=tmp, timeout=600, **env)
    assert changed.returncode == 2, changed.stderr
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atelier: error: "), changed.stderr
    assert "roles.decomposer.adapter now names decompose@2" in lines[0]
    assert "recorded with decompose@1" in lines[0]
    for service in services:
        assert "decompose@2" not in service.engine.adapters  # refused before loading anything

    shutil.copy(EXAMPLE, config)
    resumed = run_atelier("resume", run_id, db=db, cwd=tmp, timeout=600, **env)
    assert resumed.returncode == 0, resumed.stderr
    path = str((tmp / "adapters" / "decompose-1").resolve())
    for service in services:
        assert service.engine.adapters.get("decompose@1") == path
    with TrajectoryStore(f"sqlite:///{db}") as store:
        assert {t.status for t in store.trajectories(run=run_id)} == {"succeeded"}
    made = generations(db, run_id, "decompose")
    assert len(made) >= 4 and {g.model for g in made} == {"decompose@1"}


def test_an_adapter_directory_is_named_by_the_registry_and_a_failed_load_stops_the_rollout(
    deployed, replicas
):
    tmp, db, env = deployed
    _, services = replicas
    base = EXAMPLE.read_text().split("\n[policies]\n")[0]  # no trained router or stop here
    by_path = tmp / "configs" / "by-path.toml"
    by_path.parent.mkdir(exist_ok=True)
    by_path.write_text(base.replace('"decompose@1"', '"../adapters/decompose-1"'))
    args = ("--mode", "decompose", "--prompts", "prompts.txt", "-G", "1")
    done = run_atelier(
        "rollout", "--config", str(by_path), *args, "--name", "by-path", db=db, cwd=tmp, **env
    )
    assert done.returncode == 0, done.stderr
    with TrajectoryStore(f"sqlite:///{db}") as store:
        run = store.resolve_run("by-path")
    assert run.config["adapters"] == {"decomposer": "decompose@1"}
    assert {g.model for g in generations(db, run.id, "decompose")} == {"decompose@1"}

    broken = tmp / "configs" / "broken.toml"
    broken.write_text(base.replace('"decompose@1"', '"decompose@2"'))
    with TrajectoryStore(f"sqlite:///{db}") as store:
        runs_before = len(store.runs())
    failed = run_atelier("rollout", "--config", str(broken), *args, db=db, cwd=tmp, **env)
    assert failed.returncode == 2, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atelier: error: "), failed.stderr
    assert "roles.decomposer.adapter: loading decompose@2" in lines[0] and "failed" in lines[0]
    assert "no_such_proj" in lines[0]  # the server's reason
    with TrajectoryStore(f"sqlite:///{db}") as store:
        assert len(store.runs()) == runs_before  # nothing ran, nothing was recorded
    for service in services:
        assert "decompose@2" not in service.engine.adapters  # the failed load left nothing
