"""Diffusion transitions (Flow-GRPO training data) and a generic content-addressed blob table.

Revision ID: 0002_diffusion_transitions
Revises: 0001_initial
Create Date: 2026-11-21

``blobs`` holds binary data that is not an image (the ``images`` table has width/height and the
viewer reads it); ``diffusion_transitions`` holds one row per stochastic denoising step an image
step took, its latents as a blob reference. Frozen copy of the schema at version 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_diffusion_transitions"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _blob() -> sa.types.TypeEngine:
    return sa.LargeBinary().with_variant(postgresql.BYTEA(), "postgresql")


def _ts() -> sa.types.TypeEngine:
    return sa.DateTime(timezone=True)


def _set_schema_version(version: int, revision_id: str) -> None:
    op.execute(sa.text("DELETE FROM schema_version"))
    op.execute(
        sa.text(
            "INSERT INTO schema_version (version, revision, applied_at) VALUES (:v, :r, :t)"
        ).bindparams(v=version, r=revision_id, t=datetime.now(timezone.utc))
    )


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("data", _blob(), nullable=False),
        sa.Column("media_type", sa.String(length=100), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.create_table(
        "diffusion_transitions",
        sa.Column("trajectory_id", sa.String(length=64), nullable=False),
        sa.Column("step_seq", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("num_steps", sa.Integer(), nullable=False),
        sa.Column("timestep", sa.Float(), nullable=False),
        sa.Column("sigma", sa.Float(), nullable=False),
        sa.Column("sigma_next", sa.Float(), nullable=False),
        sa.Column("sigma_cap", sa.Float(), nullable=False),
        sa.Column("noise_level", sa.Float(), nullable=False),
        sa.Column("logprob", sa.Float(), nullable=False),
        sa.Column("latents", sa.String(length=64), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=False),
        sa.Column("guidance_scale", sa.Float(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("lora", sa.String(length=200), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("strength", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["latents"], ["blobs.sha256"], name=op.f("fk_diffusion_transitions_latents_blobs")
        ),
        sa.ForeignKeyConstraint(
            ["trajectory_id", "step_seq"],
            ["steps.trajectory_id", "steps.seq"],
            name="fk_diffusion_transitions_step",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "trajectory_id", "step_seq", "position", name=op.f("pk_diffusion_transitions")
        ),
    )
    op.create_index("ix_diffusion_transitions_latents", "diffusion_transitions", ["latents"])
    _set_schema_version(2, revision)


def downgrade() -> None:
    op.drop_table("diffusion_transitions")
    op.drop_table("blobs")
    _set_schema_version(1, "0001_initial")
