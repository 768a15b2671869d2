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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from policies.base import MODES, STOP_ACTIONS, ModeObservation, StopObservation
from training.decisions.rewards import trajectory_rewards
from training.reading import stored_groups

if TYPE_CHECKING:
    from storage.records import StepInfo, TrajectoryDetail
    from storage.store import TrajectoryStore

DecisionKind = Literal["mode", "stop"]
Observation = ModeObservation | StopObservation


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
class DecisionMember:
    trajectory_id: str
    sample_index: int
    status: str
    mode: str | None
    image_count: int
    rewards: Mapping[str, float]
    """Reward components by name: ``checker`` (the judge's score; 0 for a failed trajectory),
    ``format`` (the Self-Adaptive Interleaved Reasoner's (SAIR) binary R_f) and every
    trajectory-level reward in the store."""
    decisions: tuple[DecisionRecord, ...] = ()


@dataclass(frozen=True)
class DecisionGroup:
    run_id: str
    group_id: str
    prompt: str
    category: str | None
    kind: DecisionKind
    members: tuple[DecisionMember, ...] = field(default_factory=tuple)

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


def _observation(kind: str, step: StepInfo) -> Observation:
    if kind == "mode":
        return mode_observation(step.state_before)
    return stop_observation(step.state_before, step.update)


LEARNABLE_ACTIONS: dict[str, tuple[str, ...]] = {"mode": MODES, "stop": STOP_ACTIONS}
"""The actions of the learned router and stop policy (``policies.mode``, ``policies.stop``)."""


def trajectory_decisions(
    detail: TrajectoryDetail,
    kind: DecisionKind,
    *,
    policy: str | None = None,
    version: str | None = None,
) -> tuple[DecisionRecord, ...]:
    """The decisions of ``kind`` in a stored trajectory (``store.trajectory(id)``), in order;
    only those of ``policy`` / ``version`` when given, and only actions a learned policy of
    the kind can take (:data:`LEARNABLE_ACTIONS`)."""
    found = []
    for step in detail.steps:
        for raw in step.update.get("decisions") or ():
            if raw["kind"] != kind:
                continue
            if policy is not None and raw["policy"] != policy:
                continue
            if version is not None and raw["version"] != version:
                continue
            if raw["action"] not in LEARNABLE_ACTIONS[kind]:
                continue  # e.g. a fixed ``escalate`` mode: no learned policy can take it
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


def member_rewards(detail: TrajectoryDetail) -> dict[str, float]:
    """Reward components of a stored trajectory (see :attr:`DecisionMember.rewards`): the
    stored ones, and R_o and R_f computed from the trajectory where none is stored
    (``training.decisions.rewards.store_member_rewards`` stores them before training)."""
    rewards = trajectory_rewards(detail)
    rewards.update({k: float(v) for k, v in (detail.rewards or {}).items()})
    return rewards


def decision_member(
    detail: TrajectoryDetail, rewards: Mapping[str, float], decisions: Sequence[DecisionRecord]
) -> DecisionMember:
    """A group member from its stored trajectory, its rewards and the decisions it trains."""
    return DecisionMember(
        trajectory_id=detail.id,
        sample_index=detail.sample_index,
        status=detail.status,
        mode=detail.mode,
        image_count=detail.image_count,
        rewards=rewards,
        decisions=tuple(decisions),
    )


def read_groups(
    store: TrajectoryStore,
    run_ids: str | Sequence[str],
    kind: DecisionKind = "mode",
    *,
    policy: str | None = None,
    version: str | None = None,
    status: str | None = "succeeded",
    min_size: int = 2,
) -> list[DecisionGroup]:
    """GRPO groups of ``kind`` decisions from the stored groups of the runs.

    ``status`` keeps only trajectories with that status (None: all; a failed trajectory's
    ``checker`` reward is 0). ``policy`` / ``version`` keep only decisions taken by that
    policy (a group whose members took none is dropped); pass them, since deterministic
    policies (fixed, rules) record log-prob 0.0, which is no sampling probability. Groups
    with fewer than ``min_size`` members are dropped: a group of one has no baseline.
    """
    groups: list[DecisionGroup] = []
    for run_id, group_id, details in stored_groups(store, run_ids, status, min_size):
        members = [
            decision_member(
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
