"""What a model folder is, checked from its files before anything heavy loads.

``transformers`` and ``diffusers`` answer a missing or wrong folder with a long traceback that
ends in a misleading hub message ("Repo id must be in the form ..."). These checks read only the
file system, so ``atelier serve`` and the config loader can name the problem in one line:
``lm_dir_problem(path)`` / ``image_dir_problem(path)`` / ``adapter_dir_problem(path)`` return
None for a usable folder, else a sentence saying what is wrong with it.
"""

from __future__ import annotations

import re
from pathlib import Path

TRANSFORMERS_CONFIG = "config.json"
DIFFUSERS_INDEX = "model_index.json"
ADAPTER_CONFIG = "adapter_config.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` that is not a folder here: left to ``from_pretrained`` (hub or cache)."""
    return bool(_HUB_ID.match(value)) and not Path(value).exists()


def _folder_problem(path: Path) -> str | None:
    if not path.exists():
        return f"no such directory: {path}"
    if not path.is_dir():
        return f"{path} is a file, not a model directory"
    return None


def lm_dir_problem(path: str | Path) -> str | None:
    """None when ``path`` holds a transformers model (``config.json``)."""
    folder = Path(path).expanduser()
    problem = _folder_problem(folder)
    if problem:
        return problem
    if (folder / DIFFUSERS_INDEX).is_file():
        return (
            f"{folder} is a diffusers pipeline ({DIFFUSERS_INDEX}), not a transformers "
            "language model: serve it with `atelier serve image`"
        )
    if not (folder / TRANSFORMERS_CONFIG).is_file():
        return f"{folder} has no {TRANSFORMERS_CONFIG}: not a model saved with save_pretrained"
    return None


def image_dir_problem(path: str | Path) -> str | None:
    """None when ``path`` holds a diffusers pipeline (``model_index.json``)."""
    folder = Path(path).expanduser()
    problem = _folder_problem(folder)
    if problem:
        return problem
    if (folder / DIFFUSERS_INDEX).is_file():
        return None
    if (folder / TRANSFORMERS_CONFIG).is_file():
        return (
            f"{folder} is a transformers model ({TRANSFORMERS_CONFIG}), not a diffusers "
            f"pipeline ({DIFFUSERS_INDEX}): serve it with `atelier serve lm`"
        )
    return f"{folder} has no {DIFFUSERS_INDEX}: not a diffusers pipeline saved with save_pretrained"


def adapter_dir_problem(path: str | Path) -> str | None:
    """None when ``path`` holds a peft adapter (``adapter_config.json``)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        return f"LoRA adapter path {str(folder)!r} does not exist"
    if not folder.is_dir():
        return f"LoRA adapter path {str(folder)!r} is not a directory"
    if not (folder / ADAPTER_CONFIG).is_file():
        return f"{folder} has no {ADAPTER_CONFIG}: not a peft LoRA adapter directory"
    return None
