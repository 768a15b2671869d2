"""A command that needs an optional extra the install lacks (``make demo`` installs no model
extras) says which extra, in one line — and a command that does not need it runs without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_helpers import run_atelier

pytestmark = pytest.mark.slow  # an on-policy loop in a subprocess

ROOT = Path(__file__).resolve().parents[1]
SHAPEWORLD = ROOT / "examples" / "configs" / "shapeworld.toml"


def _without_transformers(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH under which ``import transformers`` fails as in an install without it."""
    blocked = tmp_path / "blocked" / "transformers"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'transformers'\", name='transformers')\n"
    )
    return {"PYTHONPATH": f"{blocked.parent}:{ROOT}"}


def test_the_router_loop_needs_no_model_extra_and_a_lora_loop_names_it(tmp_path):
    env = _without_transformers(tmp_path)
    db = tmp_path / "a.db"
    common = ("--iterations", "1", "--per-category", "1", "-G", "2", "--out", str(tmp_path / "v"))
    router = run_atelier(
        "train", "--config", str(SHAPEWORLD), "--policy", "router", *common, db=db, **env
    )
    assert router.returncode == 0, router.stderr
    assert "newest version router@1" in router.stderr

    lora = run_atelier(
        *("train", "--config", str(ROOT / "examples" / "configs" / "tiny-decomposer.toml")),
        *("--policy", "decompose", "--model", str(tmp_path), "--mode", "decompose", *common),
        db=db,
        **env,
    )
    assert lora.returncode == 2
    assert lora.stderr == (
        "atelier: error: this command needs transformers, from the optional extra 'models': "
        "install it with `make install-dev` (every extra) or pip install -e '.[models]'\n"
    )
