"""Initial schema: runs, trajectories, steps, generations, images, step_images, rewards,
policy_versions, schema_version.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-21

Frozen copy of ``storage/schema.py`` at schema version 1 (later revisions change it; this file
never imports the live schema). A test checks that upgrading an empty database to head yields
exactly the ORM schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _blob() -> sa.types.TypeEngine:
    return sa.LargeBinary().with_variant(postgresql.BYTEA(), "postgresql")


def _big_id() -> sa.types.TypeEngine:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts() -> sa.types.TypeEngine:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("data", _blob(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_images")),
    )
    op.create_table(
        "policy_versions",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=200), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("meta", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_versions")),
        sa.UniqueConstraint("name", "version", name="uq_policy_versions_name_version"),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("config", _json(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    schema_version = op.create_table(
        "schema_version",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("revision", sa.String(length=64), nullable=False),
        sa.Column("applied_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_schema_version")),
    )
    op.create_table(
        "trajectories",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("category", sa.String(length=200), nullable=True),
        sa.Column("group_id", sa.String(length=200), nullable=False),
        sa.Column("sample_index", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("mode", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("final_image", sa.String(length=64), nullable=True),
        sa.Column("image_count", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("correct", sa.Boolean(), nullable=True),
        sa.Column("rewards", _json(), nullable=False),
        sa.Column("started_at", _ts(), nullable=False),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("initial_state", _json(), nullable=True),
        sa.Column("final_state", _json(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_trajectories_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trajectories")),
    )
    op.create_index("ix_trajectories_group", "trajectories", ["group_id", "sample_index"])
    op.create_index(
        "ix_trajectories_run_group", "trajectories", ["run_id", "group_id", "sample_index"]
    )
    op.create_index("ix_trajectories_score", "trajectories", ["score"])
    op.create_index("ix_trajectories_started", "trajectories", ["started_at"])
    op.create_index("ix_trajectories_status_run", "trajectories", ["status", "run_id"])
    op.create_table(
        "steps",
        sa.Column("trajectory_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=100), nullable=False),
        sa.Column("stage", sa.String(length=100), nullable=False),
        sa.Column("state_before", _json(), nullable=False),
        sa.Column("state_update", _json(), nullable=False),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("latency_s", sa.Float(), nullable=False),
        sa.Column("started_at", _ts(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("models", _json(), nullable=False),
        sa.Column("policy", sa.String(length=200), nullable=True),
        sa.Column("policy_version", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(
            ["trajectory_id"],
            ["trajectories.id"],
            name=op.f("fk_steps_trajectory_id_trajectories"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("trajectory_id", "seq", name=op.f("pk_steps")),
    )
    op.create_index("ix_steps_stage_node", "steps", ["stage", "node"])
    op.create_table(
        "generations",
        sa.Column("trajectory_id", sa.String(length=64), nullable=False),
        sa.Column("step_seq", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=100), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("latency_s", sa.Float(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("token_ids", _blob(), nullable=False),
        sa.Column("logprobs", _blob(), nullable=False),
        sa.ForeignKeyConstraint(
            ["trajectory_id", "step_seq"],
            ["steps.trajectory_id", "steps.seq"],
            name="fk_generations_step",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "trajectory_id", "step_seq", "position", name=op.f("pk_generations")
        ),
    )
    op.create_table(
        "step_images",
        sa.Column("trajectory_id", sa.String(length=64), nullable=False),
        sa.Column("step_seq", sa.Integer(), nullable=False),
        sa.Column("direction", sa.String(length=3), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("ref", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["ref"], ["images.sha256"], name=op.f("fk_step_images_ref_images")),
        sa.ForeignKeyConstraint(
            ["trajectory_id", "step_seq"],
            ["steps.trajectory_id", "steps.seq"],
            name="fk_step_images_step",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "trajectory_id", "step_seq", "direction", "position", name=op.f("pk_step_images")
        ),
    )
    op.create_index("ix_step_images_ref", "step_images", ["ref"])
    # rewards after steps: a step reward references its step.
    op.create_table(
        "rewards",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("trajectory_id", sa.String(length=64), nullable=False),
        sa.Column("step_seq", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("details", _json(), nullable=True),
        sa.ForeignKeyConstraint(
            ["trajectory_id"],
            ["trajectories.id"],
            name=op.f("fk_rewards_trajectory_id_trajectories"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["trajectory_id", "step_seq"],
            ["steps.trajectory_id", "steps.seq"],
            name="fk_rewards_step",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rewards")),
    )
    op.create_index("ix_rewards_name_value", "rewards", ["name", "value"])
    op.create_index("ix_rewards_trajectory_name", "rewards", ["trajectory_id", "name"])
    op.bulk_insert(
        schema_version,
        [
            {"version": 1, "revision": revision, "applied_at": datetime.now(timezone.utc)},
        ],
    )


def downgrade() -> None:
    for table in (
        "rewards",
        "step_images",
        "generations",
        "steps",
        "trajectories",
        "schema_version",
        "runs",
        "policy_versions",
        "images",
    ):
        op.drop_table(table)
