"""Drop ``ix_step_images_ref``: no query reads step images by image, and it cost every commit.

Revision ID: 0003_drop_step_images_ref_index
Revises: 0002_diffusion_transitions
Create Date: 2026-11-21

The index ordered step images by their image's sha256, i.e. at random: each step image a group
commit inserted dirtied its own index page, which made it the largest part of a commit's WAL
frames (83 → 46 frames per commit of ~60 records without it, ``benchmarks/overhead.py``).
Nothing looked step images up by ``ref`` (they are read by trajectory), and images are never
deleted, so the foreign key to ``images`` needs no index on this side either. Whoever adds image
garbage collection should add back an index (or read through an anti-join in bulk).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0003_drop_step_images_ref_index"
down_revision: str | None = "0002_diffusion_transitions"
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
    op.drop_index("ix_step_images_ref", table_name="step_images")
    _set_schema_version(3, revision)


def downgrade() -> None:
    op.create_index("ix_step_images_ref", "step_images", ["ref"])
    _set_schema_version(2, "0002_diffusion_transitions")
