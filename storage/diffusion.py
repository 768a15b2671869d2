"""Diffusion transitions in the store: rows to write, and reading them back for training.

A step's :class:`~storage.transitions.DiffusionTransition` objects (in its
``NodeTrace.transitions``) become one ``diffusion_transitions`` row each, plus one ``blobs`` row
per distinct latents blob (content-addressed by sha256: recording the same bytes twice stores
them once). The recorder writes them in the step's own transaction (``storage.writes``).

Reading back (:func:`load_transitions`) rebuilds the same dataclass, latents bytes included, so
training recomputes log-probs from exactly what was sampled. Duck-typed on the write side and
torch-free throughout: the store never imports torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, tuple_

from storage.engine import Database
from storage.schema import BlobRow, DiffusionTransitionRow
from storage.transitions import DiffusionTransition

SAFETENSORS = "application/safetensors"

_COLUMNS = (
    "step_index", "num_steps", "timestep", "sigma", "sigma_next", "sigma_cap", "noise_level",
    "logprob", "prompt", "negative_prompt", "guidance_scale", "seed", "width", "height", "model",
    "lora", "kind", "strength",
)  # fmt: skip
"""Columns copied one to one between the dataclass and the row (``latents`` is the blob)."""


def blob_ref(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_row(data: bytes, media_type: str = SAFETENSORS) -> dict[str, Any]:
    from storage.rows import now

    return {
        "sha256": blob_ref(data),
        "data": bytes(data),
        "media_type": media_type,
        "size": len(data),
        "created_at": now(),
    }


def transition_rows(
    trajectory_id: str, seq: int, transitions: Iterable[Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(blob rows, transition rows) for one step's transitions."""
    blobs: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for position, transition in enumerate(transitions):
        blob = blob_row(transition.latents)
        blobs.setdefault(blob["sha256"], blob)
        row = {name: getattr(transition, name) for name in _COLUMNS}
        row.update(
            trajectory_id=trajectory_id, step_seq=seq, position=position, latents=blob["sha256"]
        )
        rows.append(row)
    return list(blobs.values()), rows


@dataclass(frozen=True)
class StoredTransition:
    """A transition as stored, with where it came from."""

    trajectory_id: str
    step_seq: int
    position: int
    transition: Any
    """A :class:`storage.transitions.DiffusionTransition` (latents bytes loaded)."""


def load_transitions(
    db: Database,
    steps: Sequence[tuple[str, int]] | None = None,
    *,
    trajectory_ids: Sequence[str] = (),
) -> list[StoredTransition]:
    """Transitions of the given ``(trajectory_id, step_seq)`` steps and/or whole trajectories,
    in (trajectory, step, position) order, with their latents."""
    table = DiffusionTransitionRow
    found: list[StoredTransition] = []
    with db.read() as conn:
        queries = []
        for start in range(0, len(trajectory_ids), 500):
            queries.append(table.trajectory_id.in_(list(trajectory_ids[start : start + 500])))
        step_list = list(steps or ())
        for start in range(0, len(step_list), 500):
            queries.append(
                tuple_(table.trajectory_id, table.step_seq).in_(step_list[start : start + 500])
            )
        rows: dict[tuple[str, int, int], Any] = {}
        for where in queries:
            for row in conn.execute(
                select(table.__table__, BlobRow.data)
                .join(BlobRow, BlobRow.sha256 == table.latents)
                .where(where)
            ).mappings():
                rows[(row["trajectory_id"], row["step_seq"], row["position"])] = row
    for key in sorted(rows):
        row = rows[key]
        transition = DiffusionTransition(
            latents=bytes(row["data"]), **{n: row[n] for n in _COLUMNS}
        )
        found.append(StoredTransition(key[0], key[1], key[2], transition))
    return found
