"""Training scalars to TensorBoard (optional: ``pip install 'atelier[tensorboard]'``).

The console table and the store's policy-version metadata are the primary record; this mirrors
the same numbers as event files so long runs can be watched live in TensorBoard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class TensorBoardUnavailable(RuntimeError):
    """The ``tensorboard`` package is not installed."""


class TensorBoardLog:
    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise TensorBoardUnavailable(
                "TensorBoard logging needs the tensorboard package: "
                "pip install 'atelier[tensorboard]'"
            ) from exc
        self.log_dir = Path(log_dir)
        self._writer: Any = SummaryWriter(log_dir=str(self.log_dir))

    def scalars(self, step: int, metrics: Mapping[str, Any], prefix: str) -> None:
        """Every finite number of ``metrics`` as ``prefix/name`` at ``step``; others skipped."""
        for name, value in sorted(metrics.items()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{name}", float(value), step)
        self._writer.flush()  # live curves: each iteration is visible once logged

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
