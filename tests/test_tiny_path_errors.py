"""``atelier serve`` given a model folder it cannot serve says so in one line (issue 12): exit
code 2, one ``atelier: error:`` line naming the option and the problem, no traceback — where it
used to print 49 lines ending in a misleading "Repo id must be in the form ..."."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atelier.cli import main

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models


def one_error_line(err: str) -> str:
    assert err.startswith("atelier: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "Repo id" not in err
    return err


@pytest.mark.parametrize("server", ["lm", "image"])
def test_serve_a_missing_folder_is_one_line_from_the_installed_command(server: str):
    atelier = shutil.which("atelier", path=str(Path(sys.executable).parent))
    if atelier is None:
        pytest.skip("the atelier script is not installed in this environment")
    done = subprocess.run(
        [atelier, "serve", server, "--model", "/nonexistent", "--port", "9"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    line = one_error_line(done.stderr)
    assert "--model: no such directory: /nonexistent" in line
    assert done.stdout == ""


def test_serve_lm_given_an_image_model_names_the_right_server(tiny_models, capsys):
    assert main(["serve", "lm", "--model", str(tiny_models.sd)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is a diffusers pipeline" in line and "atelier serve image" in line


def test_serve_image_given_a_language_model_names_the_right_server(tiny_models, capsys):
    assert main(["serve", "image", "--model", str(tiny_models.vlm)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is a transformers model" in line and "atelier serve lm" in line
    argv = ["serve", "image", "--model", str(tiny_models.sd), "--edit-model", "/nowhere"]
    assert main(argv) == 2
    assert "--edit-model: no such directory: /nowhere" in one_error_line(capsys.readouterr().err)


def test_a_model_folder_that_does_not_load_is_one_line(tiny_models, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models.lm, broken)
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    assert main(["serve", "lm", "--model", str(broken), "--port", "9"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot load --model {broken}: " in line and "no-such-architecture" in line


def test_tiny_models_into_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("")
    assert main(["tiny-models", str(target)]) == 2
    assert "is a file, not a folder" in one_error_line(capsys.readouterr().err)


def test_tiny_models_without_the_model_extras_says_what_to_install(tmp_path, capsys, monkeypatch):
    import nodes.backends.engines.tiny_models as tiny

    monkeypatch.setattr(tiny, "missing_packages", lambda: ["transformers", "diffusers"])
    assert main(["tiny-models", str(tmp_path / "tiny")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "need transformers, diffusers" in line and "pip install -e '.[models,serve]'" in line
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("record", [False, True])
def test_a_config_adapter_that_does_not_load_is_one_line(tiny_models, tmp_path, capsys, record):
    # The config parses and its folders exist; the adapter fails only when the backend is
    # built, inside the run: still one line, exit 2, with or without the store.
    adapter = tmp_path / "not-an-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[backends.vlm]\nkind = "inprocess-lm"\nmodel = "{tiny_models.vlm}"\n'
        f'adapters = {{ plan = "{adapter}" }}\n'
        '[backends.world]\nkind = "shapeworld"\n'
        '[roles]\nplanner = { backend = "vlm", adapter = "plan" }\nreflector = "vlm"\n'
        'decomposer = "vlm"\ngenerator = "world"\neditor = "world"\n'
    )
    where = ["--db", f"sqlite:///{tmp_path / 'a.db'}"] if record else ["--no-record"]
    assert main(["run", "a red circle", "--config", str(config), *where]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("atelier")]
    assert len(line) == 1 and "Traceback" not in err
    assert line[0].startswith("atelier: error: backends.vlm.adapters.plan: could not load")
