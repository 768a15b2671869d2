"""The tiny-model path as a new user walks it (issue 12): build the models with the installed
command, then run a prompt with each example config — in-process, and against Atelier's own
servers on loopback. Before the fix, the command did not exist and every run failed at plan
(``max_tokens`` 1024 > the tiny model's 512-token context)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from atelier.cli import main

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models and servers

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"


def atelier() -> str:
    """The installed ``atelier`` script of this interpreter's environment."""
    found = shutil.which("atelier", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("the atelier script is not installed in this environment")
    return found


def check_trajectory(out: str) -> None:
    """A reflect run that got through every kind of step (random weights: it never stops
    early, so the budget ends it after refining)."""
    for node in ("plan", "draw", "reflect", "refine"):
        assert f" {node} " in out, out
    assert "failed" not in out, out
    assert "final:" in out, out


def test_tiny_models_command_then_the_in_process_config_runs(tmp_path: Path):
    env = {**os.environ, "ATELIER_TINY_MODELS": str(tmp_path / "tiny")}
    built = subprocess.run(
        [atelier(), "tiny-models", "tiny"],
        cwd=tmp_path,  # works from any folder: no repository-relative module path
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    for kind in ("lm", "vlm", "sd", "ip2p", "sd3"):
        assert str(tmp_path / "tiny" / kind) in built.stdout
    assert "examples/configs/tiny-models.toml" in built.stdout  # what to run next

    final = tmp_path / "final.png"
    config = str(CONFIGS / "tiny-models.toml")
    command = [atelier(), "run", "a red circle", "--mode", "reflect", "--config", config]
    run = subprocess.run(
        [*command, "--no-record", "--out", str(final)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    check_trajectory(run.stdout)
    assert "Traceback" not in run.stderr and "max() arg" not in run.stderr
    assert Image.open(final).size == (64, 64)  # the config's size, not the graph's 256


def test_the_servers_config_runs_against_atelier_servers_on_loopback(
    lm_server, image_server, tmp_path: Path, capsys
):
    text = (CONFIGS / "tiny-servers.toml").read_text()
    assert "http://127.0.0.1:8000" in text and "http://127.0.0.1:8001" in text
    config = tmp_path / "servers.toml"
    config.write_text(
        text.replace("http://127.0.0.1:8000", lm_server.url).replace(
            "http://127.0.0.1:8001", image_server.url
        )
    )
    final = tmp_path / "final.png"
    argv = ["run", "a red circle", "--mode", "reflect", "--config", str(config)]
    code = main([*argv, "--no-record", "--out", str(final)])
    out = capsys.readouterr().out
    assert code == 0, out
    check_trajectory(out)
    assert Image.open(final).size == (64, 64)


def test_a_config_whose_model_folder_is_missing_is_one_line(tmp_path: Path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(
        (CONFIGS / "tiny-models.toml")
        .read_text()
        .replace("${ATELIER_TINY_MODELS:-/tmp/atelier-tiny}", str(tmp_path / "nowhere"))
    )
    code = main(["run", "a red circle", "--config", str(config), "--no-record"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("atelier: error:"), err
    assert f"backends.vlm.model: no such directory: {tmp_path / 'nowhere' / 'vlm'}" in err
    assert "backends.painter.model" in err and "backends.painter.edit_model" in err


def test_a_config_naming_an_image_model_for_a_chat_backend_says_so(
    tiny_models, tmp_path: Path, capsys
):
    config = tmp_path / "wrong.toml"
    config.write_text(
        (CONFIGS / "tiny-models.toml")
        .read_text()
        .replace("${ATELIER_TINY_MODELS:-/tmp/atelier-tiny}/vlm", str(tiny_models.sd))
        .replace("${ATELIER_TINY_MODELS:-/tmp/atelier-tiny}", str(tiny_models.root))
    )
    code = main(["run", "a red circle", "--config", str(config), "--no-record"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "backends.vlm.model:" in err and "is a diffusers pipeline" in err
