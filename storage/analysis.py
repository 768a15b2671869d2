"""Read models over the trajectory store: what a run, a GRPO group, a training series and a
policy version add up to (the trace UI's group, training, versions and compare views, and the
terminal's training curves).

::

    run_summary(store, run_id).accuracy                 # correct / judged, one GROUP BY
    overviews, total = run_groups(store, run_id, limit=50)
    group_view(store, run_id, overviews[0].group_id).members[0].advantage
    for series in training_series(store):                # one per training invocation or loop
        [p.rollout.mean_score for p in series.points if p.rollout]
    version_usage(store)[0].used_by                      # [(run id, run name, trajectories)]

Every figure is computed with SQL aggregates (a store holds 100k trajectories: no summary
loads a trajectory's steps); only :func:`group_view` reads steps, of one group's members.
Everything returned is a plain dataclass, complete when returned, as :mod:`storage.records`.

How versions form a **training series** (:func:`training_series`), from what the store records
in each version's metadata:

- ``series`` (+ ``series_iteration``): ShapeWorld's on-policy GRPO (``training.decisions.loop``)
  and Tree-RL (``training.tree``) name the invocation that produced the version;
- ``loop`` (+ ``loop_iteration``): the on-policy loop over any backends (``training.online``);
  the untrained version a loop starts from (``loop_iteration`` -1) is left out;
- ``r3`` (+ ``r3_round``): R3's alternation (the reason stage's versions);
- ``runs`` (one ``train --run`` invocation from stored runs): a series of its own;
- anything else (a store written before series were recorded): consecutive versions of one
  policy whose trainer kept counting (``optimizer_steps`` increasing) with the same ``config``
  form one series.

A point's run (``run``, ``fork_run``, or the only one of ``runs``) is the run the version was
trained from, rolled out by the version before it; its :class:`RunSummary` is the point's
``rollout``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, case, distinct, func, select

from storage.records import PolicyVersionInfo, RewardInfo, RunInfo, TrajectorySummary
from storage.rows import as_utc
from storage.schema import (
    DiffusionTransitionRow,
    GenerationRow,
    RewardRow,
    RunRow,
    StepImageRow,
    StepRow,
    TrajectoryRow,
)
from storage.store import TrajectoryStore

UNKNOWN = "?"
"""The key of trajectories without a mode or category in :attr:`RunSummary.mode_shares` and
:attr:`RunSummary.categories`."""

ADVANTAGE = "advantage"
"""The reward name a decision trainer stores each member's group-relative advantage under."""

ITERATION_KEYS = ("series_iteration", "loop_iteration", "r3_round")
"""Metadata numbers that say where a version sits in its series: not metrics."""

_CHUNK = 500


# --- records ------------------------------------------------------------------------------


@dataclass(slots=True)
class CategoryStats:
    count: int
    judged: int
    """Trajectories with a judgement (``correct`` not NULL)."""
    accuracy: float | None
    """Correct / judged; None when none was judged."""
    mean_score: float | None
    mean_images: float | None


@dataclass(slots=True)
class RunSummary:
    run: RunInfo
    trajectories: int
    succeeded: int
    failed: int
    judged: int
    """Trajectories with a judgement (``correct`` not NULL)."""
    correct: int
    accuracy: float | None
    """``correct / judged``; None when none was judged."""
    mean_score: float | None
    """Mean judge score V over the trajectories that have one; None when none has."""
    mean_images: float | None
    """Mean images per trajectory (every trajectory counts); None for an empty run."""
    mean_duration_s: float | None
    mode_shares: dict[str, float]
    """Mode -> share of the run's trajectories (``?``: no mode recorded)."""
    categories: dict[str, CategoryStats]
    """Category -> its figures (``?``: no category)."""
    rewards: dict[str, float]
    """Reward name -> mean over the run's trajectories of their latest trajectory-level value
    (rewards rows with no step), over the trajectories that hold one."""


@dataclass(slots=True)
class GroupOverview:
    group_id: str
    prompt: str
    category: str | None
    members: int
    mean_score: float | None
    min_score: float | None
    max_score: float | None
    correct: int
    """Members judged correct."""
    has_advantages: bool
    """Whether any member holds a stored ``advantage`` (the group was trained on)."""
    started_at: datetime
    """When its first member started (groups are listed in this order)."""


@dataclass(slots=True)
class DecisionRecord:
    step_seq: int
    node: str
    kind: str
    action: str
    log_prob: float | None
    """The log-probability the policy gave the action when it sampled it, as recorded."""
    policy: str
    version: str | None


@dataclass(slots=True)
class GroupMember:
    summary: TrajectorySummary
    rewards: list[RewardInfo]
    """Every stored reward row of the trajectory (trajectory- and step-level), by id."""
    latest: dict[str, float]
    """Name -> latest trajectory-level value."""
    advantage: float | None
    """The latest stored reward named ``advantage``; None if none."""
    images: list[str]
    """Refs of the trajectory's images in the order made (``store.get(ref)``), final last."""
    decisions: list[DecisionRecord]


@dataclass(slots=True)
class GroupView:
    run_id: str
    group_id: str
    prompt: str
    members: list[GroupMember]
    """By sample index."""
    reward_names: list[str]
    """Every reward name stored for any member, sorted."""


@dataclass(slots=True)
class TrainingPoint:
    iteration: int
    version: str
    created_at: datetime
    run_id: str | None
    """The run the version was trained from (rolled out by the version before), if recorded."""
    metrics: dict[str, float]
    """Every finite top-level number of the version's metadata (loss, kl, clip_fraction,
    reward_mean, grad_norm, optimizer_steps, ...), but the iteration counters."""
    rollout: RunSummary | None
    """The summary of ``run_id`` (None: no run recorded, or no longer in the store)."""

    @property
    def clip_fraction(self) -> float | None:
        """The fraction of ratios clipped: ``clip_fraction`` as the LoRA trainers report it,
        else the decision trainer's two sides, ``clip_low`` + ``clip_high``."""
        if "clip_fraction" in self.metrics:
            return self.metrics["clip_fraction"]
        if "clip_low" in self.metrics and "clip_high" in self.metrics:
            return self.metrics["clip_low"] + self.metrics["clip_high"]
        return None


@dataclass(slots=True)
class TrainingSeries:
    key: str
    """Stable and URL-safe (``[A-Za-z0-9._-]``): the same series gets the same key as the store
    grows."""
    policy: str
    label: str
    points: list[TrainingPoint] = field(default_factory=list)
    """In the order the versions were registered."""


@dataclass(slots=True)
class VersionUsage:
    info: PolicyVersionInfo
    trained_from: list[str]
    """Run ids the metadata names (``run``, ``runs``, ``fork_run``)."""
    used_by: list[tuple[str, str, int]]
    """(run id, run name, trajectories with a step whose decision this version took), runs in
    creation order."""
    series: str | None = None
    """The key of the :class:`TrainingSeries` the version is a point of."""


# --- runs ---------------------------------------------------------------------------------


def run_summary(store: TrajectoryStore, run_id: str) -> RunSummary:
    """The run's figures; ``KeyError`` for an unknown run."""
    found = run_summaries(store, [run_id])
    if run_id not in found:
        raise KeyError(f"no run {run_id!r}")
    return found[run_id]


def run_summaries(store: TrajectoryStore, run_ids: Iterable[str]) -> dict[str, RunSummary]:
    """:func:`run_summary` of many runs with the same few grouped queries (unknown ids are
    left out)."""
    ids = list(dict.fromkeys(run_ids))
    runs = {run.id: run for chunk in _chunks(ids) for run in store.runs(ids=chunk)}
    ids = [run_id for run_id in ids if run_id in runs]
    summaries = {
        run_id: RunSummary(runs[run_id], 0, 0, 0, 0, 0, None, None, None, None, {}, {}, {})
        for run_id in ids
    }
    with store.db.read() as conn:
        for chunk in _chunks(ids):
            _fill_summaries(conn, chunk, summaries)
    return summaries


def _fill_summaries(conn: Connection, ids: Sequence[str], out: dict[str, RunSummary]) -> None:
    t = TrajectoryRow
    in_runs = t.run_id.in_(list(ids))
    query = select(
        t.run_id,
        func.count(),
        _count_if(t.status == "succeeded"),
        _count_if(t.status == "failed"),
        func.count(t.correct),
        _count_if(t.correct.is_(True)),
        func.avg(t.score),
        func.avg(t.image_count),
        func.avg(t.duration_s),
    ).where(in_runs)
    for run_id, n, ok, failed, judged, correct, score, images, duration in conn.execute(
        query.group_by(t.run_id)
    ):
        summary = out[run_id]
        summary.trajectories, summary.succeeded, summary.failed = int(n), int(ok), int(failed)
        summary.judged, summary.correct = int(judged), int(correct or 0)
        summary.accuracy = summary.correct / summary.judged if summary.judged else None
        summary.mean_score, summary.mean_images = _float(score), _float(images)
        summary.mean_duration_s = _float(duration)
    query = select(t.run_id, t.mode, func.count()).where(in_runs).group_by(t.run_id, t.mode)
    for run_id, mode, n in conn.execute(query.order_by(t.run_id, t.mode)):
        summary = out[run_id]
        key = mode if mode is not None else UNKNOWN
        summary.mode_shares[key] = summary.mode_shares.get(key, 0.0) + n / summary.trajectories
    query = (
        select(
            t.run_id,
            t.category,
            func.count(),
            func.count(t.correct),
            _count_if(t.correct.is_(True)),
            func.avg(t.score),
            func.avg(t.image_count),
        )
        .where(in_runs)
        .group_by(t.run_id, t.category)
        .order_by(t.run_id, t.category)
    )
    for run_id, category, n, judged, correct, score, images in conn.execute(query):
        out[run_id].categories[category if category is not None else UNKNOWN] = CategoryStats(
            int(n),
            int(judged),
            int(correct or 0) / int(judged) if judged else None,
            _float(score),
            _float(images),
        )
    r = RewardRow
    latest = (
        select(func.max(r.id).label("id"))
        .join(t, t.id == r.trajectory_id)
        .where(in_runs, r.step_seq.is_(None))
        .group_by(r.trajectory_id, r.name)
        .subquery()
    )
    query = (
        select(t.run_id, r.name, func.avg(r.value))
        .select_from(r)
        .join(latest, latest.c.id == r.id)
        .join(t, t.id == r.trajectory_id)
        .group_by(t.run_id, r.name)
        .order_by(t.run_id, r.name)
    )
    for run_id, name, value in conn.execute(query):
        out[run_id].rewards[name] = float(value)


# --- groups -------------------------------------------------------------------------------


def run_groups(
    store: TrajectoryStore, run_id: str, *, offset: int = 0, limit: int | None = 50
) -> tuple[list[GroupOverview], int]:
    """The run's GRPO groups (ungrouped trajectories left out) in the order their first member
    started, ``limit`` from ``offset`` (None: all); and how many groups the run has."""
    t, r = TrajectoryRow, RewardRow
    advantages = (
        select(t.group_id.label("group_id"), func.count(r.id).label("n"))
        .select_from(r)
        .join(t, t.id == r.trajectory_id)
        .where(t.run_id == run_id, r.name == ADVANTAGE)
        .group_by(t.group_id)
        .subquery()
    )
    first = func.min(t.started_at)
    query = (
        select(
            t.group_id,
            func.min(t.prompt),
            func.min(t.category),
            func.count(),
            func.avg(t.score),
            func.min(t.score),
            func.max(t.score),
            _count_if(t.correct.is_(True)),
            func.max(advantages.c.n),
            first,
        )
        .outerjoin(advantages, advantages.c.group_id == t.group_id)
        .where(t.run_id == run_id, t.group_id != "")
        .group_by(t.group_id)
        .order_by(first, t.group_id)
        .offset(offset)
    )
    if limit is not None:
        query = query.limit(limit)
    count = select(func.count(distinct(t.group_id))).where(t.run_id == run_id, t.group_id != "")
    with store.db.read() as conn:
        rows = conn.execute(query).all()
        total = int(conn.scalar(count) or 0)
    groups = [
        GroupOverview(
            group_id,
            prompt,
            category,
            int(n),
            _float(mean),
            _float(low),
            _float(high),
            int(correct or 0),
            bool(advantage),
            as_utc(started),
        )
        for group_id, prompt, category, n, mean, low, high, correct, advantage, started in rows
    ]
    return groups, total


def group_view(store: TrajectoryStore, run_id: str, group_id: str) -> GroupView:
    """One group of a run, member by member: rewards, advantage, images and the policies'
    decisions. ``KeyError`` if the run has no such group."""
    summaries = store.trajectories(run=run_id, group=group_id) if group_id else []
    if not summaries:
        raise KeyError(f"run {run_id!r} has no group {group_id!r}")
    summaries.sort(key=lambda s: (s.sample_index, s.id))
    ids = [s.id for s in summaries]
    rewards: dict[str, list[RewardInfo]] = {tid: [] for tid in ids}
    for reward in store.rewards(trajectory_ids=ids):
        rewards[reward.trajectory_id].append(reward)
    images: dict[str, list[str]] = {tid: [] for tid in ids}
    decisions: dict[str, list[DecisionRecord]] = {tid: [] for tid in ids}
    with store.db.read() as conn:
        for chunk in _chunks(ids):
            query = (
                select(StepImageRow.trajectory_id, StepImageRow.ref)
                .where(StepImageRow.trajectory_id.in_(list(chunk)), StepImageRow.direction == "out")
                .order_by(StepImageRow.trajectory_id, StepImageRow.step_seq, StepImageRow.position)
            )
            for tid, ref in conn.execute(query):
                if ref not in images[tid]:
                    images[tid].append(ref)
            query = (
                select(StepRow.trajectory_id, StepRow.seq, StepRow.node, StepRow.state_update)
                .where(StepRow.trajectory_id.in_(list(chunk)))
                .order_by(StepRow.trajectory_id, StepRow.seq)
            )
            for tid, seq, node, update in conn.execute(query):
                decisions[tid].extend(_decisions(seq, node, update))
    members = []
    for summary in summaries:
        rows = rewards[summary.id]
        refs = images[summary.id]
        if summary.final_image:  # the final image last, wherever the steps made it
            refs = [ref for ref in refs if ref != summary.final_image] + [summary.final_image]
        advantage = [row.value for row in rows if row.name == ADVANTAGE]
        members.append(
            GroupMember(
                summary,
                rows,
                {row.name: row.value for row in rows if row.step_seq is None},
                advantage[-1] if advantage else None,
                refs,
                decisions[summary.id],
            )
        )
    names = sorted({row.name for rows in rewards.values() for row in rows})
    return GroupView(run_id, group_id, summaries[0].prompt, members, names)


def _decisions(seq: int, node: str, update: Any) -> list[DecisionRecord]:
    found = []
    entries = update.get("decisions") if isinstance(update, dict) else None
    for decision in entries or []:
        if not isinstance(decision, dict):
            continue
        log_prob = decision.get("log_prob")
        version = decision.get("version")
        found.append(
            DecisionRecord(
                seq,
                node,
                str(decision.get("kind", "decision")),
                str(decision.get("action", "")),
                float(log_prob) if _is_number(log_prob) else None,
                str(decision.get("policy", "")),
                None if version is None else str(version),
            )
        )
    return found


# --- training series and versions ---------------------------------------------------------


def training_series(store: TrajectoryStore) -> list[TrainingSeries]:
    """One series per training invocation or loop, in the order their first version was
    registered (see the module docstring for how versions are grouped)."""
    return _series(store, store.policy_versions())[0]


def version_usage(store: TrajectoryStore) -> list[VersionUsage]:
    """Every registered version: the runs it was trained from, and the runs that used it — a
    decision policy's by the steps that recorded a decision it took, an adapter's (text/VLM
    LoRA, diffusion LoRA) by the generations requested from it (their ``model`` is the
    adapter's name ``name@version``) or the diffusion transitions sampled with it (``lora``).
    One grouped query per table."""
    versions = store.policy_versions()
    _, series_of = _series(store, versions, summaries=False)
    s, t = StepRow, TrajectoryRow
    query = (
        select(
            s.policy,
            s.policy_version,
            t.run_id,
            RunRow.name,
            func.count(distinct(s.trajectory_id)),
            RunRow.created_at,
        )
        .select_from(s)
        .join(t, t.id == s.trajectory_id)
        .join(RunRow, RunRow.id == t.run_id)
        .where(s.policy.is_not(None))
        .group_by(s.policy, s.policy_version, t.run_id, RunRow.name, RunRow.created_at)
        .order_by(RunRow.created_at, t.run_id)
    )
    used: dict[tuple[str, str | None], list[tuple[str, str, int]]] = {}
    labels = {f"{info.name}@{info.version}": (info.name, info.version) for info in versions}
    with store.db.read() as conn:
        for policy, version, run_id, name, n, _created in conn.execute(query):
            used.setdefault((policy, version), []).append((run_id, name, int(n)))
        for key, runs in _adapter_users(conn, list(labels)).items():
            merged = dict(((r, name), n) for r, name, n in used.get(labels[key], []))
            for run_id, name, n in runs:
                merged[(run_id, name)] = max(n, merged.get((run_id, name), 0))
            used[labels[key]] = [(r, name, n) for (r, name), n in merged.items()]
    return [
        VersionUsage(
            info,
            _trained_from(info.metadata),
            used.get((info.name, info.version), []),
            series_of.get(info.id),
        )
        for info in versions
    ]


def _adapter_users(conn: Connection, labels: list[str]) -> dict[str, list[tuple[str, str, int]]]:
    """``name@version`` -> (run id, run name, trajectories) of the runs whose generations were
    requested from that adapter, or whose diffusion transitions were sampled with it."""
    found: dict[str, dict[tuple[str, str], int]] = {}
    if not labels:
        return {}
    t = TrajectoryRow
    for row, column in (
        (GenerationRow, GenerationRow.model),
        (DiffusionTransitionRow, DiffusionTransitionRow.lora),
    ):
        query = (
            select(column, t.run_id, RunRow.name, func.count(distinct(row.trajectory_id)))
            .select_from(row)
            .join(t, t.id == row.trajectory_id)
            .join(RunRow, RunRow.id == t.run_id)
            .where(column.in_(labels))
            .group_by(column, t.run_id, RunRow.name)
        )
        for label, run_id, name, n in conn.execute(query):
            runs = found.setdefault(label, {})
            runs[(run_id, name)] = max(int(n), runs.get((run_id, name), 0))
    return {
        label: [(run_id, name, n) for (run_id, name), n in runs.items()]
        for label, runs in found.items()
    }


def _series(
    store: TrajectoryStore, versions: list[PolicyVersionInfo], *, summaries: bool = True
) -> tuple[list[TrainingSeries], dict[int, str]]:
    """The series, and version id -> series key."""
    grouped: dict[tuple[str, str, str], list[PolicyVersionInfo]] = {}
    chain_end: dict[str, tuple[str, str, str]] = {}  # policy -> its open unrecorded chain
    for info in versions:
        meta = info.metadata or {}
        if _is_number(meta.get("loop_iteration")) and meta["loop_iteration"] < 0:
            continue  # the untrained version a loop starts from: no iteration of it
        identity = _identity(info)
        if identity is None:  # unrecorded: continue the policy's chain, or start one
            open_key = chain_end.get(info.name)
            if open_key is not None and _continues(grouped[open_key][-1], info):
                identity = open_key
            else:
                identity = (info.name, "v", info.version)
            chain_end[info.name] = identity
        else:  # another kind of training came between: an unrecorded chain ends
            chain_end.pop(info.name, None)
        grouped.setdefault(identity, []).append(info)
    runs: dict[int, str | None] = {
        info.id: _point_run(info.metadata or {}) for members in grouped.values() for info in members
    }
    rollouts = run_summaries(store, [r for r in runs.values() if r]) if summaries else {}
    result, series_of = [], {}
    for (policy, kind, value), members in grouped.items():
        key = ".".join(_slug(part) for part in (policy, kind, value))
        recorded = [_recorded_iteration(info.metadata or {}) for info in members]
        if any(i is None for i in recorded) or len(set(recorded)) != len(recorded):
            recorded = list(range(len(members)))
        points = []
        for iteration, info in zip(recorded, members, strict=True):
            series_of[info.id] = key
            run_id = runs[info.id]
            points.append(
                TrainingPoint(
                    int(iteration),  # type: ignore[arg-type]
                    info.version,
                    info.created_at,
                    run_id,
                    _metrics(info.metadata or {}),
                    rollouts.get(run_id) if run_id else None,
                )
            )
        run_names = [p.rollout.run.name if p.rollout else None for p in points]
        label = _label(policy, kind, value, members, run_names)
        result.append(TrainingSeries(key, policy, label, points))
    return result, series_of


def _identity(info: PolicyVersionInfo) -> tuple[str, str, str] | None:
    meta = info.metadata or {}
    for kind in ("series", "loop", "r3"):
        value = meta.get(kind)
        if isinstance(value, str) and value:
            return (info.name, kind, value)
    if isinstance(meta.get("runs"), list):  # one `train --run` invocation
        return (info.name, "runs", info.version)
    return None


def _continues(previous: PolicyVersionInfo, info: PolicyVersionInfo) -> bool:
    """Whether ``info`` was made by the trainer that made ``previous`` (a store without series
    keys): its optimizer kept counting, under the same config."""
    before, now = previous.metadata or {}, info.metadata or {}
    steps_before, steps_now = before.get("optimizer_steps"), now.get("optimizer_steps")
    if not (_is_number(steps_before) and _is_number(steps_now)) or steps_now <= steps_before:
        return False
    return before.get("config") == now.get("config")


def _point_run(meta: dict[str, Any]) -> str | None:
    for key in ("run", "fork_run"):
        if isinstance(meta.get(key), str) and meta[key]:
            return meta[key]
    runs = meta.get("runs")
    if isinstance(runs, list) and len(runs) == 1 and isinstance(runs[0], str):
        return runs[0]
    return None


def _trained_from(meta: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for key in ("run", "fork_run"):
        if isinstance(meta.get(key), str):
            found.append(meta[key])
    if isinstance(meta.get("runs"), list):
        found.extend(r for r in meta["runs"] if isinstance(r, str))
    return list(dict.fromkeys(found))


def _recorded_iteration(meta: dict[str, Any]) -> int | None:
    for key in ITERATION_KEYS:
        value = meta.get(key)
        if _is_number(value) and float(value).is_integer():
            return int(value)
    return None


def _metrics(meta: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in meta.items()
        if key not in ITERATION_KEYS and _is_number(value) and math.isfinite(value)
    }


def _label(
    policy: str,
    kind: str,
    value: str,
    members: list[PolicyVersionInfo],
    run_names: list[str | None],
) -> str:
    first, last = members[0].version, members[-1].version
    versions = f"{policy}@{first}" if first == last else f"{policy}@{first}…{last}"
    named = [name for name in run_names if name]
    if kind == "loop":
        origin = f"loop {value}"
    elif kind == "r3":
        origin = f"R3 {value}"
    elif named:
        origin = named[0] if len(named) == 1 else f"{named[0]} … {named[-1]}"
    else:
        origin = "no run recorded"
    return f"{versions} · {origin}"


# --- helpers ------------------------------------------------------------------------------


def _count_if(condition: Any) -> Any:
    return func.sum(case((condition, 1), else_=0))


def _float(value: Any) -> float | None:
    """SQL aggregates as float (PostgreSQL's AVG of an integer column is a Decimal)."""
    return None if value is None else float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _slug(text: str) -> str:
    """``text`` made URL-safe, with a short hash of it when that changed anything (so two
    texts never share a slug)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:60]
    if slug == text:
        return slug
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else digest


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(ids), _CHUNK):
        yield ids[start : start + _CHUNK]
