"""Recording commands as a new user meets them (issue 12), run as real subprocesses: the exit
code of a rollout whose trajectories failed, run names that must be new, names shared by several
runs, and Ctrl-C naming the run to resume."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from storage.store import TrajectoryStore
from tests.cli_helpers import ATELIER, run_atelier
from tests.faults_common import write_backends_config

RUN_ID = r"[0-9a-f]{32}"


atelier = run_atelier


def one_error_line(result: subprocess.CompletedProcess, prefix: str = "atelier: error: ") -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


def down_server_url() -> str:
    """A loopback URL nothing listens on: a model server that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def prompts_file(path: Path, *prompts: str) -> Path:
    path.write_text("".join(f"{p}\n" for p in prompts))
    return path


# --- 1. failed trajectories --------------------------------------------------------------------


def test_a_rollout_whose_every_trajectory_failed_exits_1_after_its_summary(tmp_path):
    db = tmp_path / "atelier.db"
    url = down_server_url()
    config = write_backends_config(tmp_path / "down.toml", url, retries=0)
    prompts = prompts_file(tmp_path / "prompts.txt", "three red circles", "a blue square")
    result = atelier(
        "rollout", "--prompts", str(prompts), "-G", "2", "--config", str(config), db=db
    )
    assert result.returncode == 1, result.stderr
    summary = re.search(
        rf"^run ({RUN_ID}): 4 trajectories, 0 succeeded, 4 failed, 0 correct$", result.stdout, re.M
    )
    assert summary, result.stdout
    error = one_error_line(result)
    assert "all 4 trajectories failed" in error and url in error and "BackendUnavailable" in error
    assert f"--run {summary.group(1)[:12]} --status failed" in error
    with TrajectoryStore(f"sqlite:///{db}") as store:
        assert {t.status for t in store.trajectories(run=summary.group(1))} == {"failed"}


def test_a_rollout_with_some_failed_trajectories_exits_0_and_counts_them(tmp_path):
    db = tmp_path / "atelier.db"
    # ShapeWorld cannot draw a cat: those samples fail, the circles succeed.
    prompts = prompts_file(tmp_path / "prompts.txt", "three red circles", "a photograph of a cat")
    result = atelier("rollout", "--prompts", str(prompts), "-G", "2", "--mode", "direct", db=db)
    assert result.returncode == 0, result.stderr
    assert re.search(
        rf"^run {RUN_ID}: 4 trajectories, 2 succeeded, 2 failed, ", result.stdout, re.M
    )
    assert result.stderr == ""


# --- 4. run names --------------------------------------------------------------------------------


def _run_count(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        runs = conn.execute("select count(*) from runs").fetchone()[0]
        trajectories = conn.execute("select count(*) from trajectories").fetchone()[0]
    return runs, trajectories


@pytest.mark.parametrize("name", ["", "   "])
def test_rollout_refuses_an_empty_name_before_any_work(tmp_path, name):
    db = tmp_path / "atelier.db"
    refused = atelier("rollout", "--per-category", "1", "-G", "1", "--name", name, db=db)
    assert refused.returncode == 2 and refused.stdout == ""
    assert one_error_line(refused) == (
        "atelier: error: --name is empty: give the run a name, or leave --name out"
    )
    assert _run_count(db) == (0, 0)  # refused before any run or trajectory was created


@pytest.mark.slow
def test_rollout_refuses_a_name_a_run_already_has_before_any_work(tmp_path):
    db = tmp_path / "atelier.db"
    small = ("--per-category", "1", "-G", "1")
    first = atelier("rollout", *small, "--name", "explore", db=db)
    assert first.returncode == 0, first.stderr
    first_id = re.search(rf"^run ({RUN_ID}):", first.stdout, re.M).group(1)
    before = _run_count(db)

    again = atelier("rollout", *small, "--name", "explore", db=db)
    assert again.returncode == 2 and again.stdout == ""
    error = one_error_line(again)
    assert f"a run named 'explore' already exists ({first_id[:12]}, created " in error
    assert "choose another --name, e.g. 'explore-2'" in error
    assert _run_count(db) == before  # refused before any run or trajectory was created

    # The suggestion is free; once taken, the next one is suggested.
    assert atelier("rollout", *small, "--name", "explore-2", db=db).returncode == 0
    third = atelier("rollout", *small, "--name", "explore", db=db)
    assert third.returncode == 2 and "e.g. 'explore-3'" in one_error_line(third)
    # A name that is the start of a run id would be read as that id by `resume NAME`.
    shadow = atelier("rollout", *small, "--name", first_id[:8], db=db)
    assert shadow.returncode == 2
    assert f"is the start of run id {first_id[:12]}" in one_error_line(shadow)
    with TrajectoryStore(f"sqlite:///{db}") as store:
        assert [r.name for r in store.runs()] == ["explore", "explore-2"]


@pytest.mark.slow
def test_a_name_shared_by_several_runs_resolves_to_the_newest_with_a_note(tmp_path):
    db = tmp_path / "atelier.db"
    # `atelier run` names every run it records "run": the name is shared by design.
    for prompt in ("a red circle", "two blue squares"):
        assert atelier("run", prompt, "--mode", "direct", db=db).returncode == 0
    with TrajectoryStore(f"sqlite:///{db}") as store:
        older, newer = store.runs()
    assert older.name == newer.name == "run"

    listed = atelier("ls", "--run", "run", db=db)
    assert listed.returncode == 0, listed.stderr
    assert "two blue squares" in listed.stdout and "a red circle" not in listed.stdout
    note = one_error_line(listed, "atelier: note: ")
    assert f"2 runs are named 'run'; using the newest, {newer.id[:12]} (created " in note
    assert newer.created_at.strftime("%Y-%m-%d %H:%M:%S") in note

    by_id = atelier("ls", "--run", older.id[:12], db=db)  # the id `atelier runs` shows
    assert by_id.returncode == 0 and by_id.stderr == ""
    assert "a red circle" in by_id.stdout and "two blue squares" not in by_id.stdout
    runs = atelier("runs", db=db)
    assert older.id[:12] in runs.stdout and newer.id[:12] in runs.stdout
    assert "shared names: run ×2" in runs.stdout


# --- 7. Ctrl-C -----------------------------------------------------------------------------------


def _steps_in(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("select count(*) from steps").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _sigint_as_in_a_terminal() -> None:
    """A test run started in the background (``cmd &`` in a script, as CI may start it) has
    SIGINT ignored, and children inherit that; a command in a terminal, where a user types
    Ctrl-C, has the default disposition. Give the child the terminal's."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_once_recording(args: list[str], db: Path, after_steps: int) -> tuple[int, str]:
    """Start ``atelier ARGS``, send SIGINT (Ctrl-C) once the store holds more than
    ``after_steps`` steps; returns (exit code, stderr)."""
    env = {**os.environ, "NO_COLOR": "1", "ATELIER_DB": str(db)}
    process = subprocess.Popen(
        [*ATELIER, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    deadline = time.monotonic() + 120
    while _steps_in(db) <= after_steps and time.monotonic() < deadline:
        assert process.poll() is None, "it finished before it could be interrupted"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.mark.slow
def test_ctrl_c_names_the_run_to_resume_and_resume_finishes_it(tmp_path):
    db = tmp_path / "atelier.db"
    args = ["rollout", "--per-category", "10", "-G", "4", "--name", "big"]  # 360 trajectories
    code, stderr = _interrupt_once_recording(args, db, after_steps=0)
    assert code == 130, stderr
    message = re.fullmatch(
        rf"atelier: interrupted — every recorded step is kept; finish with: "
        rf"atelier resume ({RUN_ID})\n",
        stderr,
    )
    assert message, stderr
    run_id = message.group(1)
    with TrajectoryStore(f"sqlite:///{db}") as store:
        assert store.run(run_id).name == "big"
        left = [t for t in store.trajectories(run=run_id) if t.status != "succeeded"]
    assert left and {t.status for t in left} == {"incomplete"}

    # Ctrl-C under `resume` names the same run.
    code, stderr = _interrupt_once_recording(["resume", run_id], db, _steps_in(db))
    assert code == 130 and stderr.endswith(f"finish with: atelier resume {run_id}\n"), stderr

    resumed = atelier("resume", run_id, db=db)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"resumed (\d+) trajectories, \1 succeeded$", resumed.stdout, re.M)
    with TrajectoryStore(f"sqlite:///{db}") as store:
        finished = store.trajectories(run=run_id)
        assert len(finished) == 9 * 10 * 4
        assert {t.status for t in finished} == {"succeeded"}
        for summary in finished[:40]:  # no step lost or repeated across the two interruptions
            steps = store.steps(summary.id)
            assert [s.seq for s in steps] == list(range(len(steps)))
            assert steps[-1].node == "stop"


def test_ctrl_c_during_atelier_run_names_its_run(tmp_path, monkeypatch, capsys):
    # One ShapeWorld trajectory takes milliseconds, too short to hit from outside: the process
    # sends itself the SIGINT once the first step is recorded (asyncio.run turns it into the
    # main task's cancellation, as it does for a Ctrl-C typed in the terminal).
    from atelier.cli import app as cli
    from storage.recorder import SQLRecorder

    record_step = SQLRecorder.record_step
    sent = []

    async def record_then_interrupt(self, record):
        await record_step(self, record)
        if not sent:
            sent.append(record.seq)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(SQLRecorder, "record_step", record_then_interrupt)
    # Python's own Ctrl-C handler, as in a terminal, even when this test run was started with
    # SIGINT ignored (asyncio.run only turns SIGINT into cancellation under this handler).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    db = tmp_path / "atelier.db"
    try:
        code = cli.main(["run", "four blue squares", "--mode", "reflect", "--db", str(db)])
    finally:
        signal.signal(signal.SIGINT, previous)
        monkeypatch.undo()
    assert code == 130
    with TrajectoryStore(f"sqlite:///{db}") as store:
        (run,) = store.runs()
        (trajectory,) = store.trajectories(run=run.id)
        assert trajectory.status == "incomplete" and store.steps(trajectory.id)
    message = "atelier: interrupted — every recorded step is kept; finish with: atelier resume"
    assert capsys.readouterr().err == f"{message} {run.id}\n"
    resumed = atelier("resume", run.id, db=db)
    assert resumed.returncode == 0 and "resumed 1 trajectories, 1 succeeded" in resumed.stdout
