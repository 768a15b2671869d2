"""The trajectory store: runs, trajectories, steps, generations, images, rewards, policies.

::

    store = TrajectoryStore("sqlite:///atelier.db")            # or postgresql+psycopg://…
    context = ReasonerContext(..., images=store, recorder=SQLRecorder(store, run.id))
    store.groups(run=run.id)                                   # GRPO groups
    store.trajectory(tid).steps[2].generations[0].logprobs     # bit-exact

Opening a store brings the database to this code's schema (Alembic, see
:mod:`storage.migrate`). Every read is one transaction returning plain dataclasses
(:mod:`storage.records`); every write is one transaction, retried while another process holds
the SQLite write lock.

Many rollout workers (``atelier worker``) sample one run by claiming its trajectories:
:meth:`TrajectoryStore.claim`, ``renew``, ``release`` (:mod:`storage.claims`).

The store is also an :class:`~storage.images.ImageStore` (pass it as the graph's image store):
PNGs are deduplicated by sha256 and kept in the ``images`` table, or as files under
``image_dir`` with only their metadata in the table. While an :class:`SQLRecorder` is attached,
``put`` only buffers the image in memory (readable at once) and the recorder writes it in the
same transaction as the next batch of steps, so images cost no commit of their own.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import timezone
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from sqlalchemy import Connection, Row, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from storage import claims
from storage.blobs import SQLImageStore
from storage.codec import unpack_ids, unpack_logprobs
from storage.engine import Database
from storage.images import (
    DirectoryImageStore,
)
from storage.migrate import ensure_schema
from storage.records import (
    GenerationInfo,
    PolicyVersionInfo,
    RewardInfo,
    RunInfo,
    StepInfo,
    StoredImage,
    TrajectoryDetail,
    TrajectorySummary,
)
from storage.rows import (
    DEFAULT_REDUCED_FIELDS,
    as_utc,
    merge_update,
    now,
    reduced_fields,
    replay_states,
    state_json,
    trajectory_row,
)
from storage.schema import (
    TRAJECTORY_STATUSES,
    GenerationRow,
    ImageRow,
    PolicyVersionRow,
    RewardRow,
    RunRow,
    StepImageRow,
    StepRow,
    TrajectoryRow,
)
from storage.writes import insert_ignore

M = TypeVar("M", bound=BaseModel)

SUMMARY_COLUMNS = (
    # What a TrajectorySummary is built from, in summary_from_row's order (storage.search too).
    TrajectoryRow.id,
    TrajectoryRow.run_id,
    TrajectoryRow.prompt,
    TrajectoryRow.category,
    TrajectoryRow.group_id,
    TrajectoryRow.sample_index,
    TrajectoryRow.seed,
    TrajectoryRow.mode,
    TrajectoryRow.status,
    TrajectoryRow.final_image,
    TrajectoryRow.image_count,
    TrajectoryRow.score,
    TrajectoryRow.correct,
    TrajectoryRow.rewards,
    TrajectoryRow.started_at,
    TrajectoryRow.finished_at,
    TrajectoryRow.duration_s,
    TrajectoryRow.error,
)

_UTC = timezone.utc

_IN_CHUNK = 500
"""Ids per ``IN (...)`` list: well under SQLite's bound-variable limit (32766; 999 before
3.32), and a plan PostgreSQL handles well."""


class TrajectoryNotFound(KeyError):
    pass


@dataclass(frozen=True)
class RunMatch:
    """What :meth:`TrajectoryStore.match_run` found for a reference."""

    run: RunInfo
    by: Literal["id", "name"]
    """``id``: the exact id or a unique id prefix; ``name``: the newest run of that name."""
    same_name: int
    """Runs bearing the name (1 when found by id): more than 1 means the name is shared."""


@dataclass(frozen=True)
class RewardInput:
    trajectory_id: str
    name: str
    value: float
    step: int | None = None
    source: str = ""
    details: dict[str, Any] | None = None


class TrajectoryStore(SQLImageStore):
    """Trajectory store over SQLite (default) or PostgreSQL; also an ``ImageStore``.

    ``synchronous`` (SQLite): ``NORMAL`` (default; commits survive a killed process, not a power
    loss) or ``FULL`` (survive power loss; image files are fsynced too). ``busy_timeout_s`` is
    how long SQLite waits for another writer's lock before the store retries the transaction;
    ``lock_retry_s`` bounds the retries.
    """

    def __init__(
        self,
        url: str = "sqlite:///atelier.db",
        image_dir: str | None = None,
        *,
        synchronous: str = "NORMAL",
        busy_timeout_s: float = 30.0,
        lock_retry_s: float = 300.0,
        max_pending_image_bytes: int = 256 << 20,
        echo: bool = False,
    ) -> None:
        self.db = Database(
            url,
            synchronous=synchronous,
            busy_timeout_s=busy_timeout_s,
            lock_retry_s=lock_retry_s,
            echo=echo,
        )
        self.url = self.db.url.render_as_string(hide_password=True)
        ensure_schema(self.db)
        durable_files = synchronous.upper() in ("FULL", "EXTRA")
        files = DirectoryImageStore(image_dir, fsync=durable_files) if image_dir else None
        super().__init__(self.db, files, max_pending_image_bytes)

    def __repr__(self) -> str:
        return f"TrajectoryStore({self.url!r})"

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Write any buffered images and release the connections; on SQLite the WAL is
        checkpointed into the database file first, so the ``.db`` file alone holds every
        committed row (see :meth:`~storage.engine.Database.dispose`)."""
        try:
            self.flush_images()
        finally:
            self.db.dispose()

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- runs ----------------------------------------------------------------------------------

    def create_run(
        self,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> RunInfo:
        run_id = run_id or uuid.uuid4().hex
        row = {
            "id": run_id,
            "name": name or run_id,
            "created_at": now(),
            "config": dict(config or {}),
            "status": "running",
        }
        self.db.write(lambda conn: _insert_run(conn, row))
        return self.run(run_id)

    def run(self, run_id: str) -> RunInfo:
        for info in self.runs(ids=[run_id]):
            return info
        raise KeyError(f"no run {run_id!r}")

    def runs(self, *, ids: Sequence[str] | None = None) -> list[RunInfo]:
        counts = (
            select(TrajectoryRow.run_id, func.count().label("n"))
            .group_by(TrajectoryRow.run_id)
            .subquery()
        )
        query = (
            select(RunRow.__table__, counts.c.n)
            .outerjoin(counts, counts.c.run_id == RunRow.id)
            .order_by(RunRow.created_at, RunRow.id)
        )
        if ids is not None:
            query = query.where(RunRow.id.in_(list(ids)))
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        return [
            RunInfo(r.id, r.name, as_utc(r.created_at), r.config or {}, r.status, r.n or 0)
            for r in rows
        ]

    def register_trajectories(self, run_id: str, states: Iterable[Any]) -> int:
        """Insert trajectories as ``incomplete`` before they start, so that a run killed before
        it reached them still knows them and ``resume`` runs them from their initial state."""
        started_at = now()
        rows = [
            {**trajectory_row(state_json(state) or {}, run_id, started_at), "status": "incomplete"}
            for state in states
        ]
        if rows:
            self.db.write(lambda conn: conn.execute(insert(TrajectoryRow.__table__), rows))
        return len(rows)

    def resolve_run(self, ref: str) -> RunInfo:
        """A run by id, unique id prefix, or name (the newest run of that name; see
        :meth:`match_run` to learn whether other runs share the name)."""
        return self.match_run(ref).run

    def match_run(self, ref: str) -> RunMatch:
        """:meth:`resolve_run`, saying how the run was found: an exact id or a unique id
        prefix wins; otherwise the newest run named ``ref``, with how many runs bear that name
        (names are not unique: ``atelier demo`` re-creates ``demo-auto`` each time)."""
        with self.db.read() as conn:
            ids = (
                conn.execute(
                    select(RunRow.id).where(RunRow.id.startswith(ref, autoescape=True)).limit(2)
                )
                .scalars()
                .all()
            )
            if ref in ids or len(ids) == 1:
                return RunMatch(self.run(ref if ref in ids else ids[0]), "id", 1)
            named = conn.execute(
                select(RunRow.id, func.count().over().label("n"))
                .where(RunRow.name == ref)
                .order_by(RunRow.created_at.desc(), RunRow.id.desc())
                .limit(1)
            ).first()
        if named is not None:
            return RunMatch(self.run(named.id), "name", int(named.n))
        raise KeyError(f"{'ambiguous' if ids else 'no'} run {ref!r}")

    def resolve_trajectory(self, ref: str) -> str:
        """A trajectory id from an id, a unique id prefix, or a unique id suffix (time-ordered
        ids share their leading timestamp digits: the CLI shows their random tail)."""
        if not ref:
            raise TrajectoryNotFound("no trajectory ''")
        ids: list[str] = []
        with self.db.read() as conn:
            for match in (TrajectoryRow.id.startswith, TrajectoryRow.id.endswith):
                ids = list(
                    conn.execute(
                        select(TrajectoryRow.id).where(match(ref, autoescape=True)).limit(2)
                    )
                    .scalars()
                    .all()
                )
                if ref in ids or len(ids) == 1:
                    return ref if ref in ids else ids[0]
                if ids:
                    break
        raise TrajectoryNotFound(f"{'ambiguous' if ids else 'no'} trajectory {ref!r}")

    def finish_run(self, run_id: str, status: str = "finished") -> None:
        self.db.write(
            lambda conn: conn.execute(
                update(RunRow).where(RunRow.id == run_id).values(status=status)
            )
        )

    def mark_incomplete(self, run: str) -> int:
        """Mark the ``running`` trajectories of a dead run ``incomplete``; returns how many.

        Only for runs whose writer is gone (a killed process): a live recorder's trajectories
        would be marked too. Resume one with ``last_state`` and ``start_trajectory`` again.
        Rollout workers' leases on the run's unfinished trajectories end too (the caller takes
        them over; ``resume_run`` refuses a run whose leases are live).
        """

        def work(conn: Connection) -> int:
            result = conn.execute(
                update(TrajectoryRow)
                .where(TrajectoryRow.run_id == run, TrajectoryRow.status == "running")
                .values(status="incomplete", lease_until=None)
            )
            conn.execute(
                update(TrajectoryRow)
                .where(
                    TrajectoryRow.run_id == run,
                    TrajectoryRow.status == "incomplete",
                    TrajectoryRow.lease_until.is_not(None),
                )
                .values(lease_until=None)
            )
            conn.execute(
                update(RunRow)
                .where(RunRow.id == run, RunRow.status == "running")
                .values(status="incomplete")
            )
            return int(result.rowcount)

        return self.db.write(work)

    # --- claims: many rollout workers on one run (storage.claims) ----------------------------

    def claim(self, run_id: str, worker: str, n: int, lease_s: float) -> list[str]:
        """Claim up to ``n`` trajectories of ``run_id`` for ``worker``, each under a lease of
        ``lease_s`` seconds: registered ones no worker holds, or ones whose lease has passed (their
        worker presumed dead). Their ids, oldest first; ``[]`` when none is free now. PostgreSQL
        ``FOR UPDATE SKIP LOCKED``: concurrent claimers get disjoint sets without waiting."""
        return self.db.write(lambda conn: claims.claim(conn, run_id, worker, n, lease_s))

    def renew(self, worker: str, ids: Sequence[str], lease_s: float) -> list[str]:
        """Extend ``worker``'s leases on ``ids`` to ``lease_s`` seconds from now; the ids that
        are still its own, held or finished by it (the rest were taken over after their lease
        passed, or released: stop working on them)."""
        return self.db.write(lambda conn: claims.renew(conn, worker, list(ids), lease_s))

    def release(
        self, worker: str, run_id: str | None = None, *, ids: Sequence[str] | None = None
    ) -> int:
        """Give back ``worker``'s unfinished claims (all of ``run_id``'s, or ``ids``), free for
        any worker at once; how many. Finishing is the recorder's (``SQLRecorder(claimant=)``),
        which writes nothing of a trajectory the worker no longer holds."""
        return self.db.write(lambda conn: claims.release(conn, worker, run_id=run_id, ids=ids))

    def claim_counts(self, run_id: str) -> claims.ClaimCounts:
        """How many of the run's trajectories are unfinished, free to claim now, and leased."""
        with self.db.read() as conn:
            return claims.counts(conn, run_id)

    def settle_run(self, run_id: str) -> str:
        """The run's status set from its trajectories (a worker leaving it): ``finished``,
        ``running`` (other workers hold leases) or ``incomplete``."""
        return self.db.write(lambda conn: claims.settle_run(conn, run_id))

    def initial_states_if_unstarted(self, trajectory_ids: Sequence[str]) -> dict[str, Any]:
        """``{id: initial state}`` of those of ``trajectory_ids`` with no step recorded (one
        read: what a worker needs to start its fresh claims)."""
        found: dict[str, Any] = {}
        ids = list(trajectory_ids)
        with self.db.read() as conn:
            for chunk in _chunks(ids):
                started = select(StepRow.trajectory_id).where(
                    StepRow.trajectory_id == TrajectoryRow.id
                )
                query = select(TrajectoryRow.id, TrajectoryRow.initial_state).where(
                    _among(TrajectoryRow.id, chunk), ~started.exists()
                )
                found.update((row.id, row.initial_state) for row in conn.execute(query))
        return found

    def last_step_node(self, trajectory_id: str) -> str | None:
        """The node of the trajectory's last recorded step (None: no step yet)."""
        with self.db.read() as conn:
            return conn.scalar(
                select(StepRow.node)
                .where(StepRow.trajectory_id == trajectory_id)
                .order_by(StepRow.seq.desc())
                .limit(1)
            )

    # --- trajectories --------------------------------------------------------------------------

    def trajectories(
        self,
        run: str | None = None,
        status: str | None = None,
        mode: str | None = None,
        min_reward: float | None = None,
        limit: int | None = None,
        *,
        reward: str | None = None,
        group: str | None = None,
        offset: int = 0,
    ) -> list[TrajectorySummary]:
        """Trajectories by start time. ``min_reward`` filters on the final judge score, or on
        the trajectory-level reward named ``reward`` (its latest value) when given."""
        query = select(*SUMMARY_COLUMNS).order_by(TrajectoryRow.started_at, TrajectoryRow.id)
        query = query.where(*trajectory_filters(run, status, mode, min_reward, reward, group))
        if limit is not None:
            query = query.limit(limit)
        if offset:
            query = query.offset(offset)
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        return [summary_from_row(row) for row in rows]

    def count_trajectories(
        self,
        run: str | None = None,
        status: str | None = None,
        mode: str | None = None,
        min_reward: float | None = None,
        *,
        reward: str | None = None,
        group: str | None = None,
    ) -> int:
        """How many trajectories :meth:`trajectories` would return with no limit (one
        ``COUNT``, on the same filters)."""
        filters = trajectory_filters(run, status, mode, min_reward, reward, group)
        query = select(func.count()).select_from(TrajectoryRow).where(*filters)
        with self.db.read() as conn:
            return int(conn.scalar(query) or 0)

    def groups(
        self, run: str | None = None, status: str | None = None
    ) -> dict[str, list[TrajectorySummary]]:
        """GRPO groups: group id -> its trajectories by sample index (ungrouped ones left out)."""
        query = (
            select(*SUMMARY_COLUMNS)
            .where(TrajectoryRow.group_id != "")
            .order_by(TrajectoryRow.group_id, TrajectoryRow.sample_index, TrajectoryRow.id)
        )
        if run is not None:
            query = query.where(TrajectoryRow.run_id == run)
        if status is not None:
            query = query.where(TrajectoryRow.status == status)
        with self.db.read() as conn:
            rows = conn.execute(query).all()
        groups: dict[str, list[TrajectorySummary]] = {}
        for row in rows:
            summary = summary_from_row(row)
            groups.setdefault(summary.group_id, []).append(summary)
        return groups

    def trajectory(self, trajectory_id: str) -> TrajectoryDetail:
        return self.trajectory_details([trajectory_id])[trajectory_id]

    def trajectory_details(self, trajectory_ids: Sequence[str]) -> dict[str, TrajectoryDetail]:
        """``{id: store.trajectory(id)}`` for many trajectories, read in one transaction with a
        few chunked queries instead of a handful per trajectory. Raises
        :class:`TrajectoryNotFound` for an unknown id, as :meth:`trajectory` does."""
        ids = list(dict.fromkeys(trajectory_ids))
        with self.db.read() as conn:
            rows = {
                row.id: row
                for chunk in _chunks(ids)
                for row in conn.execute(
                    select(
                        *SUMMARY_COLUMNS, TrajectoryRow.initial_state, TrajectoryRow.final_state
                    ).where(_among(TrajectoryRow.id, chunk))
                )
            }
            missing = [tid for tid in ids if tid not in rows]
            if missing:
                raise TrajectoryNotFound(missing[0])
            steps = self._steps_many(
                conn, ids, lambda wanted: {tid: rows[tid].initial_state for tid in wanted}
            )
            rewards: dict[str, list[RewardInfo]] = {tid: [] for tid in ids}
            for reward in self._rewards(conn, ids, None):
                rewards[reward.trajectory_id].append(reward)
        details = {}
        for tid in ids:
            row = rows[tid]
            summary = summary_from_row(row)
            details[tid] = TrajectoryDetail(
                **{f.name: getattr(summary, f.name) for f in fields(TrajectorySummary)},
                initial_state=row.initial_state,
                final_state=row.final_state,
                steps=steps[tid],
                reward_records=rewards[tid],
            )
        return details

    def steps(self, trajectory_id: str) -> list[StepInfo]:
        """The trajectory's steps by ``seq``, each with its full ``state_before`` (rebuilt from
        snapshots and deltas); ``[]`` for a trajectory without steps or an unknown id."""
        return self.steps_many([trajectory_id])[trajectory_id]

    def steps_many(self, trajectory_ids: Sequence[str]) -> dict[str, list[StepInfo]]:
        """``{id: store.steps(id)}`` for many trajectories, read in one transaction with a few
        chunked queries (at most ``_IN_CHUNK`` ids each) instead of three or four per
        trajectory. Every id is a key (``[]`` for one without steps or unknown)."""
        with self.db.read() as conn:
            return self._steps_many(conn, trajectory_ids)

    def _steps_many(
        self,
        conn: Connection,
        trajectory_ids: Sequence[str],
        initial_states: Callable[[list[str]], dict[str, Any]] | None = None,
    ) -> dict[str, list[StepInfo]]:
        """Steps of many trajectories in ``conn``'s transaction. ``initial_states`` (ids ->
        their initial states) replaces the query for them when the caller has them already;
        either way they are asked for only for trajectories whose first step is a delta."""
        ids = list(dict.fromkeys(trajectory_ids))
        generations: dict[tuple[str, int], list[GenerationInfo]] = {}
        images: dict[tuple[str, int, str], list[StoredImage]] = {}
        steps: dict[str, list[Row[Any]]] = {tid: [] for tid in ids}
        for chunk in _chunks(ids):
            query = (
                select(GenerationRow.__table__)
                .where(_among(GenerationRow.trajectory_id, chunk))
                .order_by(
                    GenerationRow.trajectory_id, GenerationRow.step_seq, GenerationRow.position
                )
            )
            for g in conn.execute(query):
                generations.setdefault((g.trajectory_id, g.step_seq), []).append(
                    GenerationInfo(
                        g.position,
                        g.role,
                        g.text,
                        g.model,
                        g.latency_s,
                        unpack_ids(g.token_ids),
                        unpack_logprobs(g.logprobs),
                        g.messages,
                        g.sampling,
                        None if g.prompt_token_ids is None else unpack_ids(g.prompt_token_ids),
                    )
                )
            query = (
                select(
                    StepImageRow.trajectory_id,
                    StepImageRow.step_seq,
                    StepImageRow.direction,
                    ImageRow.sha256,
                    ImageRow.width,
                    ImageRow.height,
                    ImageRow.size,
                )
                .join(ImageRow, ImageRow.sha256 == StepImageRow.ref)
                .where(_among(StepImageRow.trajectory_id, chunk))
                .order_by(
                    StepImageRow.trajectory_id,
                    StepImageRow.step_seq,
                    StepImageRow.direction,
                    StepImageRow.position,
                )
            )
            for r in conn.execute(query):
                images.setdefault((r.trajectory_id, r.step_seq, r.direction), []).append(
                    StoredImage(r.sha256, r.width, r.height, r.size, self.get)
                )
            query = (
                select(StepRow.__table__)
                .where(_among(StepRow.trajectory_id, chunk))
                .order_by(StepRow.trajectory_id, StepRow.seq)
            )
            for s in conn.execute(query):
                steps[s.trajectory_id].append(s)
        # Only a trajectory whose first step is a delta replays from its initial state.
        wanted = [tid for tid, rows in steps.items() if rows and rows[0].state_before is None]
        initial: dict[str, Any] = {}
        if wanted and initial_states is not None:
            initial = initial_states(wanted)
        elif wanted:
            for chunk in _chunks(wanted):
                query = select(TrajectoryRow.id, TrajectoryRow.initial_state).where(
                    _among(TrajectoryRow.id, chunk)
                )
                initial.update((row.id, row.initial_state) for row in conn.execute(query))
        result: dict[str, list[StepInfo]] = {}
        for tid, rows in steps.items():
            states = replay_states(
                lambda tid=tid: initial.get(tid),
                [(s.state_before, s.state_update) for s in rows],
                DEFAULT_REDUCED_FIELDS,
            )
            result[tid] = [
                StepInfo(
                    trajectory_id=s.trajectory_id,
                    seq=s.seq,
                    node=s.node,
                    stage=s.stage,
                    started_at=as_utc(s.started_at),
                    latency_s=s.latency_s,
                    text=s.text,
                    error=s.error,
                    models=list(s.models or []),
                    policy=s.policy,
                    policy_version=s.policy_version,
                    state_before=state_before,
                    update=s.state_update,
                    generations=generations.get((tid, s.seq), []),
                    images_in=images.get((tid, s.seq, "in"), []),
                    images_out=images.get((tid, s.seq, "out"), []),
                )
                for s, state_before in zip(rows, states, strict=True)
            ]
        return result

    def last_state_dict(
        self, trajectory_id: str, state_type: type[BaseModel] | None = None
    ) -> dict[str, Any]:
        """The state (JSON) after the last recorded step: that step's ``state_before`` merged
        with its update (list fields appended, the rest replaced, as the graph does); the
        initial state when no step was recorded."""
        reduced = reduced_fields(state_type)
        with self.db.read() as conn:
            initial = conn.scalar(
                select(TrajectoryRow.initial_state).where(TrajectoryRow.id == trajectory_id)
            )
            rows = conn.execute(
                select(StepRow.state_before, StepRow.state_update)
                .where(StepRow.trajectory_id == trajectory_id)
                .order_by(StepRow.seq)
            ).all()
        if not rows:
            if initial is None:
                raise TrajectoryNotFound(trajectory_id)
            return dict(initial)
        states = replay_states(lambda: initial, [(r[0], r[1]) for r in rows], reduced)
        return merge_update(states[-1], rows[-1][1], reduced)

    def last_state(self, trajectory_id: str, state_type: type[M]) -> M:
        """:meth:`last_state_dict` validated as ``state_type`` (e.g. ``nodes.state.
        ReasonerState``), e.g. to resume a killed trajectory from it. The store knows no state
        model of its own: it sits below the graph's packages."""
        return state_type.model_validate(self.last_state_dict(trajectory_id, state_type))

    # --- rewards and policy versions -------------------------------------------------------------

    def add_reward(
        self,
        trajectory_id: str,
        name: str,
        value: float,
        *,
        step: int | None = None,
        source: str = "",
        details: dict[str, Any] | None = None,
    ) -> RewardInfo:
        """Record a reward of a trajectory (``step=None``) or of one of its steps."""
        ids = self.add_rewards([RewardInput(trajectory_id, name, value, step, source, details)])
        with self.db.read() as conn:
            row = conn.execute(select(RewardRow.__table__).where(RewardRow.id == ids[0])).one()
            return _reward(row)

    def add_rewards(self, rewards: Iterable[RewardInput]) -> list[int]:
        """Record many rewards in one transaction; returns their ids."""
        items = list(rewards)
        return self.db.write(lambda conn: _insert_rewards(conn, items))

    def rewards(
        self,
        trajectory_id: str | None = None,
        name: str | None = None,
        *,
        trajectory_ids: Sequence[str] | None = None,
    ) -> list[RewardInfo]:
        """Reward rows in the order stored: of one trajectory, of ``trajectory_ids``, or of
        every trajectory; of the reward ``name`` only when given."""
        if trajectory_id is not None:
            if trajectory_ids is not None:
                raise ValueError("give trajectory_id or trajectory_ids, not both")
            trajectory_ids = [trajectory_id]
        with self.db.read() as conn:
            return self._rewards(conn, trajectory_ids, name)

    def _rewards(
        self, conn: Connection, trajectory_ids: Sequence[str] | None, name: str | None
    ) -> list[RewardInfo]:
        """Rewards by id; of these trajectories only (chunked ``IN`` queries) when given."""
        query = select(RewardRow.__table__).order_by(RewardRow.id)
        if name is not None:
            query = query.where(RewardRow.name == name)
        if trajectory_ids is None:
            return [_reward(r) for r in conn.execute(query)]
        rewards = [
            _reward(r)
            for chunk in _chunks(trajectory_ids)
            for r in conn.execute(query.where(_among(RewardRow.trajectory_id, chunk)))
        ]
        rewards.sort(key=lambda r: r.id)
        return rewards

    def register_policy_version(
        self,
        name: str,
        version: str,
        *,
        path: str | None = None,
        metadata: dict[str, Any] | None = None,
        rewards: Iterable[RewardInput] = (),
    ) -> PolicyVersionInfo:
        """Record a policy version (idempotent for identical data; a conflicting re-registration
        of the same name and version raises ``ValueError``). ``rewards`` (what the version was
        trained with, e.g. each member's advantage) are inserted in the same transaction: a
        process killed mid-way leaves both or neither, and registering again adds no row."""
        row = {
            "name": name,
            "version": version,
            "created_at": now(),
            "path": path,
            "meta": dict(metadata or {}),
        }
        items = list(rewards)

        def work(conn: Connection) -> None:
            conn.execute(PolicyVersionRow.__table__.insert(), row)
            _insert_rewards(conn, items)

        with contextlib.suppress(IntegrityError):  # already registered: compared below
            self.db.write(work)
        info = self.policy_versions(name=name, version=version)[0]
        if info.path != path or info.metadata != row["meta"]:
            raise ValueError(
                f"policy {name!r} version {version!r} is already registered with "
                f"path={info.path!r} metadata={info.metadata!r}"
            )
        return info

    def policy_versions(
        self, name: str | None = None, version: str | None = None
    ) -> list[PolicyVersionInfo]:
        query = select(PolicyVersionRow.__table__).order_by(PolicyVersionRow.id)
        if name is not None:
            query = query.where(PolicyVersionRow.name == name)
        if version is not None:
            query = query.where(PolicyVersionRow.version == version)
        with self.db.read() as conn:
            return [
                PolicyVersionInfo(
                    p.id, p.name, p.version, as_utc(p.created_at), p.path, p.meta or {}
                )
                for p in conn.execute(query)
            ]


def trajectory_filters(
    run: str | None,
    status: str | None,
    mode: str | None,
    min_reward: float | None,
    reward: str | None,
    group: str | None,
) -> list[Any]:
    """The WHERE clauses shared by :meth:`TrajectoryStore.trajectories`, its count and
    :func:`storage.search.search_trajectories`."""
    if status is not None and status not in TRAJECTORY_STATUSES:
        raise ValueError(f"status must be one of {TRAJECTORY_STATUSES}")
    filters: list[Any] = []
    if run is not None:
        filters.append(TrajectoryRow.run_id == run)
    if status is not None:
        filters.append(TrajectoryRow.status == status)
    if mode is not None:
        filters.append(TrajectoryRow.mode == mode)
    if group is not None:
        filters.append(TrajectoryRow.group_id == group)
    if min_reward is not None:
        value = TrajectoryRow.score if reward is None else TrajectoryRow.rewards[reward].as_float()
        filters.append(value >= min_reward)
    return filters


def _chunks(ids: Sequence[str], size: int = _IN_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _among(column: Any, ids: Sequence[str]) -> Any:
    """``column IN ids``; ``column = id`` for one id (a cached statement: the single-trajectory
    reads take this path)."""
    return column == ids[0] if len(ids) == 1 else column.in_(ids)


def _insert_rewards(conn: Connection, items: Sequence[RewardInput]) -> list[int]:
    """Insert reward rows and update their trajectories' reward summaries (one transaction:
    the caller's)."""
    ids = []
    summaries: dict[str, dict[str, Any]] = {}
    for item in items:
        if item.trajectory_id not in summaries:
            current = conn.execute(
                select(TrajectoryRow.rewards)
                .where(TrajectoryRow.id == item.trajectory_id)
                .with_for_update()
            ).first()
            if current is None:
                raise TrajectoryNotFound(item.trajectory_id)
            summaries[item.trajectory_id] = dict(current[0] or {})
        ids.append(
            conn.execute(
                RewardRow.__table__.insert().returning(RewardRow.id),
                {
                    "trajectory_id": item.trajectory_id,
                    "step_seq": item.step,
                    "name": item.name,
                    "value": float(item.value),
                    "source": item.source,
                    "created_at": now(),
                    "details": item.details,
                },
            ).scalar_one()
        )
        if item.step is None:
            summaries[item.trajectory_id][item.name] = float(item.value)
    for trajectory_id, summary in summaries.items():
        conn.execute(
            update(TrajectoryRow).where(TrajectoryRow.id == trajectory_id).values(rewards=summary)
        )
    return ids


def _insert_run(conn: Connection, row: dict[str, Any]) -> None:
    insert_ignore(conn, RunRow.__table__, [row], ["id"])


def summary_from_row(row: Row[Any] | tuple[Any, ...]) -> TrajectorySummary:
    # Positional (SUMMARY_COLUMNS' order): with 100k rows, named Row access dominates otherwise.
    (
        id_,
        run_id,
        prompt,
        category,
        group_id,
        sample_index,
        seed,
        mode,
        status,
        final_image,
        image_count,
        score,
        correct,
        rewards,
        started_at,
        finished_at,
        duration_s,
        error,
    ) = row[:18]
    if started_at.tzinfo is None:  # SQLite: stored in UTC, handed back naive
        started_at = started_at.replace(tzinfo=_UTC)
    if finished_at is not None and finished_at.tzinfo is None:
        finished_at = finished_at.replace(tzinfo=_UTC)
    return TrajectorySummary(
        id_,
        run_id,
        prompt,
        category,
        group_id,
        sample_index,
        seed,
        mode,
        status,
        final_image,
        image_count,
        score,
        correct,
        rewards or {},
        started_at,
        finished_at,
        duration_s,
        error,
    )


def _reward(r: Row[Any]) -> RewardInfo:
    return RewardInfo(
        r.id,
        r.trajectory_id,
        r.step_seq,
        r.name,
        r.value,
        r.source,
        as_utc(r.created_at),
        r.details,
    )
