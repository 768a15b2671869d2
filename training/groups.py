"""GRPO groups of node-policy decisions, read back from the trajectory store.

A stored group is the G trajectories of one prompt (same ``group_id`` within a run). For a
decision kind (``mode`` or ``stop``) each member carries the decisions of that kind its
trajectory took, with the log-prob recorded *at sampling time* (the GRPO "old" log-prob: never
recomputed), the observation the policy saw (rebuilt from the step's ``state_before`` and
``update``, exactly as the node built it) and the trajectory's reward components. A member
with no decision of the kind (a direct trajectory has no stop decision) still counts in its
group's reward baseline; it just contributes no term to the loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from policies.base import ModeObservation, StopObservation
from training.rewards import trajectory_format_reward

DecisionKind = Literal["mode", "stop"]
Observation = ModeObservation | StopObservation
T = TypeVar("T")

READ_BATCH = 1000
"""Trajectories read back per bulk store call (``steps_many``, ``trajectory_details``): a few
queries per batch rather than several per trajectory, with the steps of only one batch in
memory at a time."""


def batches(items: Sequence[T], size: int = READ_BATCH) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stored_groups(
    store: Any, runs: str | Iterable[str], status: str | None, min_size: int
) -> Iterator[tuple[str, str, list[Any]]]:
    """(run id, group id, its members' ``TrajectoryDetail``) for every stored group of
    ``runs`` with at least ``min_size`` members of ``status``. Members are read in bulk, whole
    groups at a time, about ``READ_BATCH`` trajectories per read (a larger group alone)."""
    for run_id in [runs] if isinstance(runs, str) else list(runs):
        groups = [
            (group_id, [summary.id for summary in summaries])
            for group_id, summaries in store.groups(run=run_id, status=status).items()
            if len(summaries) >= min_size
        ]
        batch: list[tuple[str, list[str]]] = []
        for index, group in enumerate(groups):
            batch.append(group)
            following = groups[index + 1][1] if index + 1 < len(groups) else None
            if following is None or sum(len(ids) for _, ids in batch) + len(following) > READ_BATCH:
                wanted = [tid for _, ids in batch for tid in ids]
                details = store.trajectory_details(wanted)
                for group_id, ids in batch:
                    yield run_id, group_id, [details[tid] for tid in ids]
                batch = []


@dataclass(frozen=True)
class DecisionRecord:
    kind: DecisionKind
    action: str
    log_prob: float
    """log π_old(action | observation), as recorded when the action was sampled."""
    policy: str
    version: str
    step: int
    """The state's step counter when the decision was taken."""
    step_seq: int
    """The stored step (``steps.seq``) whose update holds the decision."""
    observation: Observation


@dataclass(frozen=True)
class Member:
    trajectory_id: str
    sample_index: int
    status: str
    mode: str | None
    image_count: int
    rewards: Mapping[str, float]
    """Reward components by name: ``checker`` (the judge's score; 0 for a failed trajectory),
    ``format`` (seed 002's binary R_f) and every trajectory-level reward in the store."""
    decisions: tuple[DecisionRecord, ...] = ()


@dataclass(frozen=True)
class DecisionGroup:
    run_id: str
    group_id: str
    prompt: str
    category: str | None
    kind: DecisionKind
    members: tuple[Member, ...] = field(default_factory=tuple)

    @property
    def decision_count(self) -> int:
        return sum(len(m.decisions) for m in self.members)


def mode_observation(state_before: Mapping[str, Any]) -> ModeObservation:
    """What ``nodes.plan`` showed the router."""
    task = state_before["task"]
    return ModeObservation(
        prompt=task["prompt"], input_image_count=len(task.get("input_images") or ())
    )


def stop_observation(state_before: Mapping[str, Any], update: Mapping[str, Any]) -> StopObservation:
    """What ``nodes.reflect`` showed the stop policy: the reflection is in the step's update,
    the counters and image scores in the state before it."""
    reflection = update["reflections"][0]
    images = state_before.get("images") or []
    return StopObservation(
        prompt=state_before["task"]["prompt"],
        target=reflection["target"],
        reflection=reflection["text"],
        stop_phrase=bool(reflection["stop_phrase"]),
        well_formed=bool(reflection["well_formed"]),
        rounds_used=int(state_before.get("rounds", 0)),
        max_rounds=int(state_before["budget"]["max_rounds"]),
        image_count=len(images),
        scores=tuple(float(i["score"]) for i in images if i.get("score") is not None),
    )


def _observation(kind: str, step: Any) -> Observation:
    if kind == "mode":
        return mode_observation(step.state_before)
    return stop_observation(step.state_before, step.update)


def trajectory_decisions(
    detail: Any,
    kind: DecisionKind,
    *,
    policy: str | None = None,
    version: str | None = None,
) -> tuple[DecisionRecord, ...]:
    """The decisions of ``kind`` in a stored trajectory (``store.trajectory(id)``), in order;
    only those of ``policy`` / ``version`` when given."""
    found = []
    for step in detail.steps:
        for raw in step.update.get("decisions") or ():
            if raw["kind"] != kind:
                continue
            if policy is not None and raw["policy"] != policy:
                continue
            if version is not None and raw["version"] != version:
                continue
            found.append(
                DecisionRecord(
                    kind=kind,
                    action=raw["action"],
                    log_prob=float(raw["log_prob"]),
                    policy=raw["policy"],
                    version=raw["version"],
                    step=int(raw["step"]),
                    step_seq=step.seq,
                    observation=_observation(kind, step),
                )
            )
    return tuple(found)


def member_rewards(detail: Any) -> dict[str, float]:
    """Reward components of a stored trajectory (see :attr:`Member.rewards`)."""
    final = detail.final_state or {}
    rewards = {
        "checker": float(detail.score) if detail.score is not None else 0.0,
        "format": trajectory_format_reward(final) if final else 0.0,
    }
    rewards.update({k: float(v) for k, v in (detail.rewards or {}).items()})
    return rewards


def decision_groups(
    store: Any,
    runs: str | Iterable[str],
    kind: DecisionKind = "mode",
    *,
    policy: str | None = None,
    version: str | None = None,
    status: str | None = "succeeded",
    min_size: int = 2,
) -> list[DecisionGroup]:
    """GRPO groups of ``kind`` decisions from the stored groups of ``runs``.

    ``status`` keeps only trajectories with that status (None: all; a failed trajectory's
    ``checker`` reward is 0). ``policy`` / ``version`` keep only decisions taken by that
    policy (a group whose members took none is dropped); pass them, since deterministic
    policies (fixed, rules) record log-prob 0.0, which is no sampling probability. Groups
    with fewer than ``min_size`` members are dropped: a group of one has no baseline.
    """
    groups: list[DecisionGroup] = []
    for run_id, group_id, details in stored_groups(store, runs, status, min_size):
        members = [
            member(
                detail,
                member_rewards(detail),
                trajectory_decisions(detail, kind, policy=policy, version=version),
            )
            for detail in details
        ]
        group = DecisionGroup(
            run_id=run_id,
            group_id=group_id,
            prompt=details[0].prompt,
            category=details[0].category,
            kind=kind,
            members=tuple(members),
        )
        if group.decision_count:
            groups.append(group)
    return groups


def member(
    detail: Any, rewards: Mapping[str, float], decisions: Sequence[DecisionRecord]
) -> Member:
    """A group member from its stored trajectory, its rewards and the decisions it trains."""
    return Member(
        trajectory_id=detail.id,
        sample_index=detail.sample_index,
        status=detail.status,
        mode=detail.mode,
        image_count=detail.image_count,
        rewards=rewards,
        decisions=tuple(decisions),
    )
