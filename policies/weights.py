"""Versioned policy weights on disk: ``model.safetensors`` + ``config.json`` in one directory.

Never pickle: safetensors holds only tensors, and the JSON config names the policy class from a
closed list (:data:`POLICY_CLASSES`), so loading a directory cannot run code from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "atelier-policy/1"

POLICY_CLASSES = {
    "router": ("policies.mode", "LearnedModePolicy"),
    "stop": ("policies.stop", "LearnedStopPolicy"),
}
"""config["class"] -> (module, class) of the learned policies ``load_policy`` may build."""


def save_weights(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write the tensors (safetensors) and the config (JSON) into a new ``directory``; returns it.

    A saved policy version is never overwritten: an existing ``directory`` raises
    ``FileExistsError``; the files appear all at once (:func:`write_new_directory`).
    """
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(flat, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        payload = {"format": FORMAT, **config}
        (staging / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")

    return write_new_directory(directory, write)


def write_new_directory(directory: str | Path, write: Callable[[Path], object]) -> Path:
    """Create ``directory`` with the files ``write(staging)`` puts into an empty staging
    directory, atomically: the staging directory (a hidden sibling) is renamed into place, so
    a crash leaves either the whole version or none of it. An existing ``directory`` raises
    ``FileExistsError`` (before ``write`` runs, and again if another process made it since)."""
    path = Path(directory)
    if path.exists():
        raise FileExistsError(f"{path} already exists: a saved policy version is never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(staging)
        for file in staging.rglob("*"):
            if file.is_file():  # the contents on disk before the rename makes them visible
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        # rename(2) of a directory onto an existing non-empty one fails: nothing is replaced.
        os.rename(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if path.exists():
            raise FileExistsError(
                f"{path} already exists: a saved policy version is never overwritten"
            ) from None
        raise
    return path


def load_weights(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) as written by :func:`save_weights`."""
    from safetensors.torch import load_file

    path = Path(directory)
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not an Atelier policy directory ({config.get('format')!r})")
    return load_file(str(path / WEIGHTS_FILE)), config


def load_policy(directory: str | Path) -> Any:
    """Load any learned policy saved with ``save(directory)``, dispatching on its config."""
    import importlib

    config = json.loads((Path(directory) / CONFIG_FILE).read_text())
    try:
        module, name = POLICY_CLASSES[config.get("class", "")]
    except KeyError:
        raise ValueError(f"unknown policy class {config.get('class')!r}") from None
    return getattr(importlib.import_module(module), name).load(directory)


def next_version(version: str) -> str:
    """The version after ``version``: its trailing number + 1 ("3" -> "4", "v2" -> "v3"), or
    ".1" appended when it has none."""
    match = re.fullmatch(r"(.*?)(\d+)", version)
    if match is None:
        return f"{version}.1"
    return f"{match[1]}{int(match[2]) + 1}"
