"""Generations keep their request: the messages and sampling fields as sent, the prompt's ids.

Revision ID: 0004_generation_requests
Revises: 0003_drop_step_images_ref_index
Create Date: 2026-11-22

A text-policy trainer must see exactly the prompt the server saw and never re-tokenise: each
generation now stores the chat messages as sent (image parts as image-store refs), the sampling
fields as sent, and the prompt's token ids when the server returned them. All three are
nullable: generations recorded before this revision read back with None.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_generation_requests"
down_revision: str | None = "0003_drop_step_images_ref_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("messages", "sampling", "prompt_token_ids")


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _blob() -> sa.types.TypeEngine:
    return sa.LargeBinary().with_variant(postgresql.BYTEA(), "postgresql")


def _set_schema_version(version: int, revision_id: str) -> None:
    op.execute(sa.text("DELETE FROM schema_version"))
    op.execute(
        sa.text(
            "INSERT INTO schema_version (version, revision, applied_at) VALUES (:v, :r, :t)"
        ).bindparams(v=version, r=revision_id, t=datetime.now(timezone.utc))
    )


def upgrade() -> None:
    # Nullable columns without defaults: an ALTER TABLE ADD COLUMN on both SQLite and
    # PostgreSQL, no table rebuild and no rewrite of the existing rows.
    op.add_column("generations", sa.Column("messages", _json(), nullable=True))
    op.add_column("generations", sa.Column("sampling", _json(), nullable=True))
    op.add_column("generations", sa.Column("prompt_token_ids", _blob(), nullable=True))
    _set_schema_version(4, revision)


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        for name in reversed(_COLUMNS):
            batch.drop_column(name)
    _set_schema_version(3, "0003_drop_step_images_ref_index")
