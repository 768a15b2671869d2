"""The trajectory store's tables: one typed SQLAlchemy 2.x ORM module, the single source of truth.

The Alembic migrations in ``storage/migrations`` must produce exactly this schema (a test
compares them); change a table here, then add a revision (``alembic -c
storage/migrations/alembic.ini revision --autogenerate -m "..."``) and bump ``SCHEMA_VERSION``.
One exception: SQLite's full-text index (``SQLITE_SEARCH_TABLES``, FTS5 kept by triggers) has
no ORM form; autogenerate on SQLite proposes to drop it, which must be deleted from the revision.

Each ORM class is named ``<What>Row`` (one row of its table), so it never shares a name with a
record the store hands out (``storage.records``, ``storage.transitions``), the graph's
``nodes.common.Generation`` or PIL's ``Image``.

Keys are natural where the data has them: a step is ``(trajectory_id, seq)`` and its
generations and images hang off that pair, so the recorder can insert a whole batch with
``executemany`` and never needs generated ids back.

Stages (``steps.stage``) group nodes the way the training stages do (R3's Tree-RL):

========== ==============================================================================
reason     ``plan``; ``draw`` outside decompose mode (the first text + image)
decompose  ``decompose``; ``draw``/``refine`` carrying out a sub-task (decompose mode)
reflect_refine ``reflect``; ``refine`` making a correction
stop       ``stop``
<node>     any other node (users' own nodes) keeps its own name as its stage
========== ==============================================================================
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    literal_column,
)
from sqlalchemy.dialects.postgresql import BYTEA, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 6
"""Bumped with every migration; recorded in the ``schema_version`` table."""

HEAD_REVISION = "0006_trajectory_claims"
"""The Alembic revision this code's schema corresponds to (a test checks it is the head)."""

TRAJECTORY_STATUSES = ("running", "succeeded", "failed", "incomplete")

# JSON documents: JSONB on PostgreSQL (queryable, indexable), JSON text elsewhere.
# ``none_as_null``: Python None is SQL NULL (not the JSON text 'null'), so IS NULL works.
JSONDoc = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
Blob = LargeBinary().with_variant(BYTEA(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY (a rowid alias); BIGINT would not be one.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Timestamp = DateTime(timezone=True)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    config: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    status: Mapped[str] = mapped_column(String(16))


class TrajectoryRow(Base):
    __tablename__ = "trajectories"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    """The state's ``trajectory_id``."""
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    prompt: Mapped[str] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(200))
    group_id: Mapped[str] = mapped_column(String(200))
    sample_index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    mode: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    final_image: Mapped[str | None] = mapped_column(String(64))
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    score: Mapped[float | None] = mapped_column(Float)
    """The final judgement's score V (``state.judgement.score``)."""
    correct: Mapped[bool | None] = mapped_column(Boolean)
    rewards: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    """Summary of trajectory-level rewards: name -> latest value (the rewards table has all)."""
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    duration_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    initial_state: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    final_state: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    """The rollout worker holding the trajectory, or the one that finished it (``storage.
    claims``); NULL for trajectories no worker claimed (a single-process ``rollout``)."""
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    """When the holder's claim runs out unless renewed; NULL once finished or released."""

    __table_args__ = (
        Index("ix_trajectories_run_group", "run_id", "group_id", "sample_index"),
        Index("ix_trajectories_group", "group_id", "sample_index"),
        Index("ix_trajectories_status_run", "status", "run_id"),
        Index("ix_trajectories_score", "score"),
        # Pages in start order (``store.trajectories``, ``storage.search``): of one run, of all.
        Index("ix_trajectories_run_started", "run_id", "started_at", "id"),
        Index("ix_trajectories_started", "started_at", "id"),
        # A run's summary and filter choices read this index, not the wide rows (0005).
        Index(
            "ix_trajectories_run_summary",
            *("run_id", "mode", "category", "status", "correct", "score"),
            *("image_count", "duration_s"),
        ),
    )


class StepRow(Base):
    __tablename__ = "steps"

    trajectory_id: Mapped[str] = mapped_column(
        ForeignKey("trajectories.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(100))
    stage: Mapped[str] = mapped_column(String(100))
    state_before: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=False)
    """The state the node saw, or JSON ``null`` for a step recorded as a delta (see
    ``SQLRecorder.state_snapshot_every``): the store then rebuilds it from the last snapshot
    (or the trajectory's ``initial_state``) and the updates after it."""
    state_update: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    text: Mapped[str | None] = mapped_column(Text)
    """The step's text output: its generations' texts joined by a blank line."""
    latency_s: Mapped[float] = mapped_column(Float)
    started_at: Mapped[datetime] = mapped_column(Timestamp)
    error: Mapped[str | None] = mapped_column(Text)
    models: Mapped[list[str]] = mapped_column(JSONDoc)
    policy: Mapped[str | None] = mapped_column(String(200))
    """Name of the policy whose decision the step took (the last one, if several)."""
    policy_version: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        # (trajectory_id, seq) is the primary key, hence unique together.
        Index("ix_steps_stage_node", "stage", "node"),
        # Which policy versions a trajectory's steps were recorded with, without reading the
        # steps' wide rows (a policy column sits after the state JSON, often in overflow
        # pages): the search's policy filter and its drop-down for a run (``storage.search``).
        Index("ix_steps_trajectory_policy", "trajectory_id", "policy", "policy_version"),
    )


class GenerationRow(Base):
    __tablename__ = "generations"

    trajectory_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step_seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    role: Mapped[str] = mapped_column(String(100))
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))
    latency_s: Mapped[float] = mapped_column(Float)
    n_tokens: Mapped[int] = mapped_column(Integer)
    token_ids: Mapped[bytes] = mapped_column(Blob)
    """int32 little-endian (see :func:`storage.codec.pack_ids`)."""
    logprobs: Mapped[bytes] = mapped_column(Blob)
    """float64 little-endian (see :func:`storage.codec.pack_logprobs`)."""
    messages: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONDoc, nullable=True)
    """The chat messages as sent, OpenAI-shaped, image parts as ``{"type": "image_ref",
    "ref": <images.sha256>}`` (NULL: recorded before schema version 4)."""
    sampling: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc, nullable=True)
    """The request's other fields as sent: temperature, top_p, max_tokens, seed, logprobs..."""
    prompt_token_ids: Mapped[bytes | None] = mapped_column(Blob, nullable=True)
    """The prompt's token ids as the server encoded them, int32 like ``token_ids`` (NULL: the
    backend did not return them)."""

    __table_args__ = (
        ForeignKeyConstraint(
            ["trajectory_id", "step_seq"],
            ["steps.trajectory_id", "steps.seq"],
            name="fk_generations_step",
            ondelete="CASCADE",
        ),
    )


class ImageRow(Base):
    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes | None] = mapped_column(Blob)
    """PNG bytes; NULL when the store keeps image files in a directory beside the database."""
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class StepImageRow(Base):
    __tablename__ = "step_images"

    trajectory_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step_seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    direction: Mapped[str] = mapped_column(String(3), primary_key=True)
    """``in`` (read by the step) or ``out`` (made by the step)."""
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    ref: Mapped[str] = mapped_column(ForeignKey("images.sha256"))

    __table_args__ = (
        ForeignKeyConstraint(
            ["trajectory_id", "step_seq"],
            ["steps.trajectory_id", "steps.seq"],
            name="fk_step_images_step",
            ondelete="CASCADE",
        ),
        # No index on ``ref``: nothing reads step images by image, and its random keys cost a
        # page per step image in every commit (migration 0003).
    )


class RewardRow(Base):
    __tablename__ = "rewards"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    trajectory_id: Mapped[str] = mapped_column(ForeignKey("trajectories.id", ondelete="CASCADE"))
    step_seq: Mapped[int | None] = mapped_column(Integer)
    """None for a trajectory-level reward."""
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)

    __table_args__ = (
        # A step reward must name a recorded step; NULL step_seq (trajectory-level) is not
        # checked (MATCH SIMPLE), which is what we want.
        ForeignKeyConstraint(
            ["trajectory_id", "step_seq"],
            ["steps.trajectory_id", "steps.seq"],
            name="fk_rewards_step",
            ondelete="CASCADE",
        ),
        Index("ix_rewards_trajectory_name", "trajectory_id", "name"),
        Index("ix_rewards_name_value", "name", "value"),
    )


class PolicyVersionRow(Base):
    __tablename__ = "policy_versions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    path: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(JSONDoc)

    __table_args__ = (UniqueConstraint("name", "version", name="uq_policy_versions_name_version"),)


class BlobRow(Base):
    """Content-addressed binary data that is not an image (e.g. safetensors latents)."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(Blob)
    media_type: Mapped[str] = mapped_column(String(100))
    """e.g. ``application/safetensors``."""
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(Timestamp)


class DiffusionTransitionRow(Base):
    """One stochastic denoising step an image step took (Flow-GRPO trains on these)."""

    __tablename__ = "diffusion_transitions"

    trajectory_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    step_seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_index: Mapped[int] = mapped_column(Integer)
    """Index in the denoising loop (0 = noisiest)."""
    num_steps: Mapped[int] = mapped_column(Integer)
    timestep: Mapped[float] = mapped_column(Float)
    sigma: Mapped[float] = mapped_column(Float)
    sigma_next: Mapped[float] = mapped_column(Float)
    sigma_cap: Mapped[float] = mapped_column(Float)
    noise_level: Mapped[float] = mapped_column(Float)
    logprob: Mapped[float] = mapped_column(Float)
    """Sampling-time log-prob (mean over latent elements)."""
    latents: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    """Blob (safetensors) holding ``latents`` and ``next_latents``."""
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text)
    guidance_scale: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    lora: Mapped[str | None] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    strength: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        ForeignKeyConstraint(
            ["trajectory_id", "step_seq"],
            ["steps.trajectory_id", "steps.seq"],
            name="fk_diffusion_transitions_step",
            ondelete="CASCADE",
        ),
        Index("ix_diffusion_transitions_latents", "latents"),
    )


# --- full-text search (``storage.search``) ------------------------------------------------

WORD_SEPARATORS = "[[:punct:][:space:][:cntrl:]]+"
"""PostgreSQL: a regular expression of what separates words. Each run of it becomes a space
before ``to_tsvector`` parses the text, so that PostgreSQL splits words where SQLite's
``unicode61`` tokenizer does: its own parser would keep ``0.75``, ``example.com`` or
``/tmp/x.png`` as single tokens, and drop ``<think>`` as an XML tag."""


def words_vector(text: Any) -> Any:
    """PostgreSQL: the words of a text expression as a ``tsvector`` (``simple`` configuration:
    lowercased, no stemming, no stop words). The GIN indexes below and the search's queries
    build this same expression (with SQL literals, no bound parameters): PostgreSQL uses an
    expression index only for an identical expression."""
    return func.to_tsvector(
        literal_column("'simple'"),
        func.regexp_replace(
            text,
            literal_column(f"'{WORD_SEPARATORS}'"),
            literal_column("' '"),
            literal_column("'g'"),
        ),
    )


def step_words_vector(text: Any) -> Any:
    """:func:`words_vector` of a step's text (NULL for a step without generations)."""
    return words_vector(func.coalesce(text, literal_column("''")))


# Appended explicitly: an index finds its table from its first column, here a literal.
TrajectoryRow.__table__.append_constraint(
    Index(
        "ix_trajectories_prompt_words", words_vector(TrajectoryRow.prompt), postgresql_using="gin"
    ).ddl_if(dialect="postgresql")
)
StepRow.__table__.append_constraint(
    Index("ix_steps_text_words", step_words_vector(StepRow.text), postgresql_using="gin").ddl_if(
        dialect="postgresql"
    )
)

SQLITE_SEARCH_TABLES = (
    "search_documents",
    "search_state",
    "search_text",
    "search_text_data",
    "search_text_idx",
    "search_text_docsize",
    "search_text_config",
)
"""SQLite: the full-text index, kept outside the ORM (SQLite only) and by triggers, not by the
store's code (see migration 0005): ``search_documents`` numbers the indexed texts (a
trajectory's prompt, ``seq`` -1, or one step's text), ``search_text`` is a contentless FTS5
table over them, with its shadow tables, and ``search_state`` holds the id up to which the
documents are indexed (``storage.search.catch_up_search_index`` indexes the rest). A later
migration that rebuilds ``trajectories`` or ``steps`` on SQLite (``batch_alter_table``) drops
their triggers and must create them again."""


class SchemaVersionRow(Base):
    __tablename__ = "schema_version"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    revision: Mapped[str] = mapped_column(String(64))
    applied_at: Mapped[datetime] = mapped_column(Timestamp)


def derive_stage(node: str, state_before: dict[str, Any], update: dict[str, Any]) -> str:
    """The training stage a step belongs to (see the module docstring)."""
    mode = update.get("mode") or state_before.get("mode")
    if mode == "escalate":  # the escalate stage the step runs in (direct, reflect, decompose)
        mode = state_before.get("stage") or update.get("stage") or mode
    if node == "plan":
        return "reason"
    if node == "draw":
        return "decompose" if mode == "decompose" and state_before.get("subtasks") else "reason"
    if node == "refine":
        return "decompose" if "subtasks_done" in update else "reflect_refine"
    if node == "reflect":
        return "reflect_refine"
    return node  # decompose, stop, and users' own nodes: the node's name
