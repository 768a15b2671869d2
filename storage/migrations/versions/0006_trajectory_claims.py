"""Trajectory claims: many rollout workers sample one run, each trajectory by one worker at a time.

Revision ID: 0006_trajectory_claims
Revises: 0005_full_text_search
Create Date: 2026-12-05

Read and written by ``storage.claims``. Two nullable columns on ``trajectories``:

* ``claimed_by``: the worker (``atelier worker``) that holds, or last held, the trajectory;
  kept after it finishes, so a finished trajectory names the worker that finished it;
* ``lease_until``: when the holder's claim runs out unless renewed (NULL: not claimed, or
  finished). A claim whose lease has passed is free to take again: its worker is presumed
  dead, and the next worker continues the trajectory from its last recorded step.

Why columns on ``trajectories`` and not a claims table: a trajectory has at most one claim, and
claiming is locking the trajectory's own row (PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED``),
so the recorder's fence — write a step only while this worker holds the trajectory — checks
and locks the one row it writes anyway, with no join and no claim rows to clean up. Trajectories
recorded before this revision, or by a single-process ``rollout``, have both columns NULL.

No index: a claim looks for the run's unfinished trajectories, which the existing
``(status, run_id)`` index finds; renewals and releases go by primary key. ``ADD COLUMN`` does
not rebuild the table on SQLite, so the full-text triggers of 0005 stay as they are (and the
downgrade's ``DROP COLUMN`` needs SQLite 3.35).
Frozen copy of the schema at version 6 (this file never imports the live schema).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0006_trajectory_claims"
down_revision: str | None = "0005_full_text_search"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _set_schema_version(version: int, revision_id: str) -> None:
    op.execute(sa.text("DELETE FROM schema_version"))
    op.execute(
        sa.text(
            "INSERT INTO schema_version (version, revision, applied_at) VALUES (:v, :r, :t)"
        ).bindparams(v=version, r=revision_id, t=datetime.now(timezone.utc))
    )


def upgrade() -> None:
    op.add_column("trajectories", sa.Column("claimed_by", sa.String(200), nullable=True))
    op.add_column(
        "trajectories", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True)
    )
    _set_schema_version(6, revision)


def downgrade() -> None:
    op.drop_column("trajectories", "lease_until")
    op.drop_column("trajectories", "claimed_by")
    _set_schema_version(5, "0005_full_text_search")
