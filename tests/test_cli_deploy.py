"""Trained decision-policy versions back in service from the command line (issue 15, item 1).

``atelier train`` saves and registers router@1, router@2 and stop@1 in a real SQLite store;
``run``, ``rollout``, ``demo`` and ``resume`` then take them with ``--router`` / ``--stop``
(``name@version`` or a directory) or from a backends file's ``[policies]`` table. Each recorded
decision names the registered version, and its recorded log-prob is what that version's weights
give (so the version was really the one deciding, not merely its name). A run interrupted
mid-way is resumed with the versions it recorded; another version is refused. Every bad
reference is one ``atelier: error:`` line and exit code 2."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest

from storage.store import TrajectoryStore
from tests.cli_helpers import run_atelier

pytestmark = pytest.mark.slow  # see pyproject's markers: make test-fast skips it


def atelier(*args: str, db: Path, cwd: Path) -> subprocess.CompletedProcess:
    return run_atelier(*args, db=db, cwd=cwd, timeout=600)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atelier: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder, store) holding router@1, router@2 and stop@1, saved under folder/versions."""
    tmp = tmp_path_factory.mktemp("deploy")
    db = tmp / "atelier.db"
    common = ("--per-category", "1", "-G", "2", "--max-rounds", "1", "--out", "versions")
    for args in (("--iterations", "2"), ("--policy", "stop", "--iterations", "1")):
        done = atelier("train", "--world", "shapeworld", *args, *common, db=db, cwd=tmp)
        assert done.returncode == 0, done.stderr
    with TrajectoryStore(f"sqlite:///{db}") as store:
        names = {(v.name, v.version) for v in store.policy_versions()}
    assert {("router", "1"), ("router", "2"), ("stop", "1")} <= names
    return tmp, db


def decisions(db: Path, run_ref: str) -> list[tuple[dict, str, str | None, str | None]]:
    """(decision, prompt, step policy, step policy version) of every decision of the run."""
    found = []
    with TrajectoryStore(f"sqlite:///{db}") as store:
        run = store.resolve_run(run_ref)
        for summary in store.trajectories(run=run.id):
            for step in store.trajectory(summary.id).steps:
                for decision in step.update.get("decisions", []):
                    found.append((decision, summary.prompt, step.policy, step.policy_version))
    return found


def assert_decided_by(db: Path, run_ref: str, folder: Path, router: str, stop: str | None):
    """Every mode decision was taken by ``router`` (name@version), every stop decision by
    ``stop``: named so in the decision and the step row, and with the log-prob the saved
    version's weights give for that observation (the router's is recomputed exactly)."""
    from policies.base import ModeObservation
    from policies.weights import load_policy

    found = decisions(db, run_ref)
    kinds = {d["kind"] for d, *_ in found}
    assert "mode" in kinds and (stop is None or "stop" in kinds)
    name, version = router.split("@")
    policy = load_policy(folder / "versions" / f"{name}-{version}")
    for decision, prompt, step_policy, step_version in found:
        if decision["kind"] == "mode":
            assert (decision["policy"], decision["version"]) == (name, version)
            assert (step_policy, step_version) == (name, version)
            expected = policy.log_prob([ModeObservation(prompt)], [decision["action"]]).item()
            assert math.isclose(decision["log_prob"], expected, abs_tol=1e-9)
            assert decision["log_prob"] < 0  # sampled, not a fixed choice
        elif stop is not None:
            assert f"{decision['policy']}@{decision['version']}" == stop


def test_rollout_and_run_record_decisions_naming_the_registered_versions(trained):
    tmp, db = trained
    done = atelier(
        *("rollout", "--per-category", "1", "-G", "2", "--name", "deployed"),
        *("--router", "router@1", "--stop", "stop@1"),
        db=db,
        cwd=tmp,
    )
    assert done.returncode == 0, done.stderr
    assert_decided_by(db, "deployed", tmp, "router@1", "stop@1")
    with TrajectoryStore(f"sqlite:///{db}") as store:
        config = store.resolve_run("deployed").config
    assert config["policies"] == {"router": "router@1", "stop": "stop@1"}
    assert config["policy_paths"]["router"] == str((tmp / "versions" / "router-1").resolve())
    assert "mode" not in config  # no built-in router ran

    # A directory names the version its own config holds (router@2), recorded as such.
    by_path = atelier("run", "two red circles", "--router", "versions/router-2", db=db, cwd=tmp)
    assert by_path.returncode in (0, 1), by_path.stderr  # 1: a failed drawing, still recorded
    assert_decided_by(db, "run", tmp, "router@2", None)


def test_a_config_policies_table_names_the_versions_and_the_command_line_overrides_it(trained):
    tmp, db = trained
    config = tmp / "deployed.toml"
    config.write_text(
        '[backends.world]\nkind = "shapeworld"\n\n'
        '[roles]\nplanner = "world"\nreflector = "world"\ndecomposer = "world"\n'
        'generator = "world"\neditor = "world"\njudge = "world"\n\n'
        # a registered version, and a directory relative to the file's folder
        '[policies]\nrouter = "router@2"\nstop = "versions/stop-1"\n'
    )
    base = ("rollout", "--config", str(config), "--per-category", "1", "-G", "2")
    done = atelier(*base, "--name", "from-file", db=db, cwd=tmp / "versions")  # cwd: no matter
    assert done.returncode == 0, done.stderr
    assert_decided_by(db, "from-file", tmp, "router@2", "stop@1")

    overridden = atelier(*base, "--router", "router@1", "--name", "cli-router", db=db, cwd=tmp)
    assert overridden.returncode == 0, overridden.stderr
    assert_decided_by(db, "cli-router", tmp, "router@1", "stop@1")

    # --mode is a built-in router: it replaces the file's, and says so.
    fixed = atelier(*base, "--mode", "direct", "--name", "cli-mode", db=db, cwd=tmp)
    assert fixed.returncode == 0, fixed.stderr
    assert "--mode direct replaces" in fixed.stderr and "router@2" in fixed.stderr
    modes = {
        (d["policy"], d["action"]) for d, *_ in decisions(db, "cli-mode") if d["kind"] == "mode"
    }
    assert modes == {("fixed-direct", "direct")}


def test_demo_runs_a_trained_router_as_one_more_column(trained):
    tmp, db = trained
    done = atelier(
        *("demo", "--per-category", "1", "--router", "router@1", "--stop", "stop@1"),
        db=db,
        cwd=tmp,
    )
    assert done.returncode == 0, done.stderr
    assert "router@1 chose:" in done.stdout and "stopped with stop@1" in done.stdout
    header = next(line for line in done.stdout.splitlines() if "decompose" in line)
    assert "router@1" in header
    assert_decided_by(db, "demo-router@1", tmp, "router@1", "stop@1")
    stops = {d["policy"] for d, *_ in decisions(db, "demo-reflect") if d["kind"] == "stop"}
    assert stops == {"stop"}  # the built-in columns stop with the trained version too


def _interrupted_rollout(db: Path, args: list[str]) -> str:
    """``atelier rollout ARGS`` in this process, Ctrl-C'd once the first step is recorded (as a
    user would); returns the run id it names to resume."""
    from atelier.cli import app as cli
    from storage.recorder import SQLRecorder

    record_step = SQLRecorder.record_step
    sent: list[int] = []

    async def record_then_interrupt(self, record):
        await record_step(self, record)
        if not sent:
            sent.append(record.seq)
            os.kill(os.getpid(), signal.SIGINT)

    SQLRecorder.record_step = record_then_interrupt
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = cli.main([*args, "--db", str(db)])
    finally:
        signal.signal(signal.SIGINT, previous)
        SQLRecorder.record_step = record_step
    assert code == 130
    with TrajectoryStore(f"sqlite:///{db}") as store:
        run = store.resolve_run("killed")
        left = [t for t in store.trajectories(run=run.id) if t.status != "succeeded"]
        assert left  # something to resume
        return run.id


def test_resume_continues_with_the_recorded_versions_and_refuses_others(
    trained, monkeypatch, capsys
):
    tmp, db = trained
    monkeypatch.chdir(tmp)
    args = ["rollout", "--per-category", "2", "-G", "2", "--name", "killed"]
    run_id = _interrupted_rollout(db, [*args, "--router", "router@1", "--stop", "stop@1"])
    capsys.readouterr()

    other = atelier("resume", run_id, "--router", "router@2", db=db, cwd=tmp)
    line = one_error_line(other)
    assert "router@2" in line and "recorded with router@1" in line
    unset = atelier("resume", run_id, "--stop", "versions/router-1", db=db, cwd=tmp)
    assert "holds a router (mode policy), not a stop policy" in one_error_line(unset)

    resumed = atelier("resume", run_id, db=db, cwd=tmp)  # no option: the recorded versions
    assert resumed.returncode == 0, resumed.stderr
    assert "succeeded" in resumed.stdout
    with TrajectoryStore(f"sqlite:///{db}") as store:
        statuses = {t.status for t in store.trajectories(run=run_id)}
    assert statuses == {"succeeded"}
    assert_decided_by(db, run_id, tmp, "router@1", "stop@1")

    # The recorded version named again is fine (nothing left to do here).
    again = atelier("resume", run_id, "--router", "router@1", "--stop", "stop@1", db=db, cwd=tmp)
    assert again.returncode == 0 and "resumed 0 trajectories" in again.stdout, again.stderr

    # A run recorded with the built-in router is not resumed with a trained one.
    builtin = atelier(
        *("rollout", "--mode", "auto", "--per-category", "1", "-G", "1", "--name", "auto"),
        db=db,
        cwd=tmp,
    )
    assert builtin.returncode == 0, builtin.stderr
    mixed = atelier("resume", "auto", "--router", "router@1", db=db, cwd=tmp)
    assert "built-in mode policy 'auto'" in one_error_line(mixed)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


WORLD_ROLES = (
    '[backends.world]\nkind = "shapeworld"\n\n[backends.lm]\nkind = "openai"\n'
    'urls = ["http://127.0.0.1:9"]\n\n'  # never contacted: every case fails before
    '[roles]\nplanner = "world"\nreflector = "world"\ngenerator = "world"\neditor = "world"\n'
)


BAD = {
    "unknown version": (
        ["run", "a red circle", "--router", "router@9"],
        "--router router@9: not registered in the store",
        "registered router versions: 1, 2",
    ),
    "unknown name": (
        ["rollout", "--stop", "halt@1"],
        "--stop halt@1: not registered",
        "no version of 'halt' is registered there",
    ),
    "garbage path": (
        ["run", "a red circle", "--router", "no/such/dir"],
        "--router no/such/dir: no such file or directory",
        "name@version",
    ),
    "router as stop": (
        ["rollout", "--stop", "router@1"],
        "--stop router@1: router@1 holds a router (mode policy), not a stop policy",
        "",
    ),
    "stop as router": (
        ["demo", "--router", "versions/stop-1"],
        "holds a stop policy, not a router",
        "",
    ),
    "not a saved policy": (
        ["run", "a red circle", "--router", "junk"],
        "--router junk: ",
        "is not a saved version (no config.json",
    ),
    "not an atelier policy": (
        ["run", "a red circle", "--stop", "foreign"],
        "--stop foreign: ",
        "is not a saved Atelier policy version",
    ),
    "mode and router": (
        ["run", "a red circle", "--mode", "auto", "--router", "router@1"],
        "--mode auto and --router router@1 both choose the router",
        "",
    ),
    "no store": (
        ["run", "a red circle", "--no-record", "--db", "missing.db", "--router", "router@1"],
        "name@version is looked up in a store, and none is given here",
        "",
    ),
    "registered elsewhere": (
        ["run", "a red circle", "--router", "copy-of-router-1"],
        "holds router@1, but the store",
        "registers router@1 at",
    ),
    "registered as another version": (
        ["run", "a red circle", "--router", "router@7"],
        "--router router@7: its directory",
        "holds router@1, not the registered router@7",
    ),
    "registered directory gone": (
        ["rollout", "--router", "router@8"],
        "--router router@8: its directory",
        "does not exist",
    ),
    "resume": (["resume", "plain", "--stop", "stop@5"], "--stop stop@5: not registered", ""),
    "config: unknown version": (
        ["rollout", "--config", "configs/unknown.toml"],
        "configs/unknown.toml: policies.router router@4: not registered in the store",
        "",
    ),
    "config: wrong kind": (
        ["rollout", "--config", "configs/kind.toml"],
        "policies.stop",
        "holds a router (mode policy), not a stop policy",
    ),
    "config: adapter not registered": (
        ["rollout", "--config", "configs/adapter.toml"],
        "configs/adapter.toml: roles.decomposer.adapter decompose@3: not registered",
        "",
    ),
    "config: adapter directory missing": (
        ["rollout", "--config", "configs/adapter-dir.toml"],
        "roles.decomposer.adapter",
        "no such file or directory",
    ),
    "config: a policy as adapter": (
        ["run", "a red circle", "--config", "configs/adapter-kind.toml"],
        "roles.decomposer.adapter router@1: router@1 holds a router (mode policy), not a "
        "text/VLM LoRA adapter",
        "",
    ),
    "config: no store": (
        ["run", "a red circle", "--no-record", "--db", "missing.db", "--config", "configs/k.toml"],
        "policies.stop stop@1: name@version is looked up in a store, and none is given",
        "",
    ),
}


@pytest.fixture(scope="module")
def bad_inputs(trained) -> tuple[Path, Path]:
    import shutil

    tmp, db = trained
    (tmp / "junk").mkdir(exist_ok=True)
    _write(tmp / "foreign" / "config.json", json.dumps({"format": "something-else"}))
    copy = tmp / "copy-of-router-1"
    if not copy.exists():
        shutil.copytree(tmp / "versions" / "router-1", copy)
    gone = tmp / "gone-router"
    plain = ("rollout", "--per-category", "1", "-G", "1", "--mode", "direct", "--name", "plain")
    assert atelier(*plain, db=db, cwd=tmp).returncode == 0
    with TrajectoryStore(f"sqlite:///{db}") as store:
        store.register_policy_version("router", "7", path=str(tmp / "versions" / "router-1"))
        store.register_policy_version("router", "8", path=str(gone))
    policies = '\n[policies]\nrouter = "{router}"\nstop = "{stop}"\n'
    decomposer = 'decomposer = "world"\n'
    _write(
        tmp / "configs/unknown.toml",
        WORLD_ROLES + decomposer + policies.format(router="router@4", stop="stop@1"),
    )
    _write(
        tmp / "configs/kind.toml",
        WORLD_ROLES + decomposer + policies.format(router="router@1", stop="../versions/router-2"),
    )
    _write(tmp / "configs/k.toml", WORLD_ROLES + decomposer + '\n[policies]\nstop = "stop@1"\n')
    for name, adapter in (
        ("adapter", "decompose@3"),
        ("adapter-dir", "./adapters/decompose-9"),
        ("adapter-kind", "router@1"),
    ):
        role = f'decomposer = {{ backend = "lm", adapter = "{adapter}" }}\n'
        _write(tmp / f"configs/{name}.toml", WORLD_ROLES + role)
    return tmp, db


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_bad_reference_is_one_line(bad_inputs, case):
    tmp, db = bad_inputs
    args, first, second = BAD[case]
    with TrajectoryStore(f"sqlite:///{db}") as store:
        runs_before = len(store.runs())
    result = atelier(*args, db=db, cwd=tmp)
    line = one_error_line(result)
    assert first in line and second in line, line
    assert "Traceback" not in result.stderr
    with TrajectoryStore(f"sqlite:///{db}") as store:
        assert len(store.runs()) == runs_before  # refused before any run was created
