"""Storage: content-addressed images, the SQL trajectory store, and its recorder.

Importing ``storage`` (or ``storage.images``) stays light; the SQL parts (SQLAlchemy) load on
first use of the names below.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "TrajectoryStore": "storage.store",
    "TrajectoryNotFound": "storage.store",
    "RewardInput": "storage.store",
    "SQLRecorder": "storage.recorder",
    "RecorderStats": "storage.recorder",
    "pack_ids": "storage.codec",
    "unpack_ids": "storage.codec",
    "pack_logprobs": "storage.codec",
    "unpack_logprobs": "storage.codec",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    return getattr(import_module(module), name)
