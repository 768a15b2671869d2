"""Tree-RL (R3): stage-wise GRPO from stored intermediate states.

R3 splits a trajectory into a reason stage and reflect-refine stages. Each stage starts from a
result of the previous one; the trainer forks G continuations from a start state, rewards each
by what *this stage* achieved, and runs GRPO on the group of one start state. Here:

1. **Start states** (:func:`stage_start_states`): every recorded point of a stored run where a
   reflect-refine stage began — the state right before a ``reflect`` step that follows an image
   (``draw`` or ``refine``), i.e. a stage-(k−1) result (reason, decompose or an earlier
   reflect-refine round), with its image's judge score V̂. Points inside a decomposition (the
   reflection checks a sub-task's expectation, not the prompt) are left out: V̂ is the prompt's
   score, which says nothing there.
2. **Selection** (:func:`select_start_states`): by default as R3's released code draws a start
   state (``RolloutBuffer.sample`` in sen-ye/R3's ``train/online_rl.py``): each draw is an
   already-perfect state (V̂ = 1: the stage should learn to stop there) with probability
   ``perfect_share`` (0.15, R3's ``perfect_ratio``), else an imperfect one, uniformly within
   either pool. ``weighting="room"`` instead weights the imperfect states by 1 − V̂, the room
   left to improve, with a fixed perfect share (this module's earlier default; not R3's).
3. **Forks** (:func:`fork`): G continuations of each selected state through
   ``Runner.resume((state, node))``, recorded as new trajectories of a new run: new trajectory
   ids, new task seeds (so reflections, edits and policy samples differ), group id = the fork
   point ``<parent trajectory>@<step seq>``. They run on the backends the parent runs were
   recorded with (ShapeWorld, or the backends file and adapter versions their config records:
   :func:`parent_backends`), with the stop policy being trained; the run's config records those
   backends, the stop policy and every fork's parent. A continuation runs to the end of the
   graph; its later rounds are later stages' results, so a forked run is itself a parent run
   for the next stage's forks (the tree grows a level).
4. **Stage groups** (:func:`read_stage_groups`): per fork point, the G members' decision of this
   stage (the stop policy's first decision after the fork) with R3's stage rewards: the
   correction C_j, ``reflection`` = C + r_format, ``refinement`` = C
   (``training.rewards.stages``).
5. **Training**: ``GRPOTrainer`` on those groups with R_o = C (:func:`stage_config`).

The stop policy's decision plays the role of R3's "No further edit needed": in Atelier the
reflector writes the reflection and the stop policy decides whether the loop ends, so for the
policy trained here "the reflection was the stop phrase" means "the policy stopped".
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_graph.deploy import redeploy
from agent_graph.ids import time_ordered_id
from agent_graph.presets import builtin_mode_policy
from agent_graph.rollout import run_config
from agent_graph.runner import Runner
from nodes.common import derive_seed
from nodes.context import GraphSettings, ReasonerContext
from nodes.reflect import reflection_target
from nodes.state import Budget, ReasonerState
from storage.recorder import SQLRecorder
from training.decisions.groups import DecisionGroup, decision_member, trajectory_decisions
from training.decisions.rewards import store_member_rewards, store_trained_rewards
from training.reading import batches, run_list, stored_groups
from training.rewards import correction, reflection_format_reward, reflection_reward
from training.versions import save_version

if TYPE_CHECKING:
    from nodes.context import Backends
    from storage.records import StepInfo, TrajectoryDetail
    from storage.store import TrajectoryStore
    from training.decisions.trainer import GRPOConfig, GRPOTrainer

STAGE_DECISIONS = {"reflect_refine": "stop"}
"""The decision each trainable stage's groups carry. The reason stage's decision (the router's
mode) is trained from whole trajectories (``training.decisions.groups.read_groups``): a mode's
worth shows only at the end of the trajectory, not in the first image."""

STAGE_REWARD = {"reflect_refine": "correction"}
"""The stage reward the stop policy is trained on: C_j (r_format is the reflector's, not the
stop policy's output)."""

IMAGE_NODES = ("draw", "refine")
PERFECT = 1.0 - 1e-9
"""V̂ at or above this counts as perfect (ShapeWorld's V is a fraction of criteria met)."""


@dataclass(frozen=True)
class StartState:
    """A stored point where a stage can be forked: the state after step ``step_seq``."""

    trajectory_id: str
    step_seq: int
    """The stored step whose result this state is; the fork continues after it."""
    node: str
    """That step's node: the graph goes on along its out-edges."""
    from_stage: str
    """That step's stage (the stage k−1 whose result this is)."""
    state: Mapping[str, Any]
    """The state (JSON) the next stage's first step saw."""
    score: float
    """V̂: the judge score of the current image."""
    rounds: int
    """Correction rounds already used (0: the stage is the first reflect-refine round)."""
    run_id: str | None = None
    """The run the state was recorded in: its forks run on that run's backends."""

    @property
    def point(self) -> str:
        """The fork point's id, used as the forks' group id."""
        return f"{self.trajectory_id}@{self.step_seq}"

    @property
    def perfect(self) -> bool:
        return self.score >= PERFECT


# --- 1. start states ------------------------------------------------------------------------


def stage_start_states(
    store: TrajectoryStore,
    run_ids: str | Sequence[str],
    stage: str = "reflect_refine",
    *,
    rounds: int | None = None,
    status: str | None = "succeeded",
) -> list[StartState]:
    """Every point in the runs where ``stage`` began after an image (see the module doc);
    ``rounds`` keeps only starts with that many correction rounds already used."""
    if stage not in STAGE_DECISIONS:
        raise ValueError(f"Tree-RL trains the stages {sorted(STAGE_DECISIONS)}, not {stage!r}")
    found: list[StartState] = []
    for run_id in run_list(run_ids):
        summaries = store.trajectories(run=run_id, status=status)
        for batch in batches(summaries):
            steps_of = store.steps_many([summary.id for summary in batch])
            for summary in batch:
                found.extend(_start_states(summary.id, steps_of[summary.id], rounds, run_id))
    # Trajectory ids and start times differ between otherwise identical runs; the tasks do not.
    found.sort(key=_stable_key)
    return found


def _start_states(
    trajectory_id: str,
    steps: Sequence[StepInfo],
    rounds: int | None,
    run_id: str | None = None,
) -> Iterator[StartState]:
    """The start states among one trajectory's stored steps."""
    for before, step in pairwise(steps):
        if step.node != "reflect" or before.node not in IMAGE_NODES:
            continue
        state = ReasonerState.model_validate(step.state_before)
        current = state.current_image
        if current is None or current.score is None:
            continue  # no V̂: the graph did not score images
        if reflection_target(state) != state.task.prompt:
            continue  # inside a decomposition: V̂ (the prompt's score) says nothing
        if rounds is not None and state.rounds != rounds:
            continue
        yield StartState(
            trajectory_id=trajectory_id,
            step_seq=before.seq,
            node=before.node,
            from_stage=before.stage,
            state=step.state_before,
            score=float(current.score),
            rounds=state.rounds,
            run_id=run_id,
        )


def _stable_key(start: StartState) -> tuple[str, int, int, int]:
    task = start.state["task"]
    return (task["group_id"], task["sample_index"], task["seed"], start.step_seq)


# --- 2. selection ---------------------------------------------------------------------------


def room_to_improve(score: float) -> float:
    """Sampling weight of an imperfect start state under ``weighting="room"``: 1 − V̂."""
    return max(0.0, 1.0 - score)


WEIGHTINGS = ("uniform", "room")
"""How :func:`select_start_states` draws: ``uniform`` (R3's released code, the default) or
``room`` (imperfect states ∝ 1 − V̂, a fixed perfect share)."""


def select_start_states(
    candidates: Sequence[StartState],
    n: int,
    *,
    perfect_share: float = 0.15,
    weighting: str = "uniform",
    seed: int = 0,
) -> list[StartState]:
    """Draw ``n`` start states, with replacement; deterministic for a ``seed``.

    ``weighting="uniform"`` (default) is R3's released code, ``RolloutBuffer.sample`` in
    sen-ye/R3's ``train/online_rl.py`` (one call per group there, ``perfect_ratio=0.15``):
    every draw independently is

        a perfect state (V̂ = 1), uniformly,     with probability ``perfect_share``
        an imperfect one, uniformly,             otherwise

    so the number of perfect draws is Binomial(n, perfect_share).

    ``weighting="room"`` (Atelier's earlier default, not R3's): exactly
    round(perfect_share · n) draws uniformly from the perfect states, the rest with
    P(s) ∝ 1 − V̂(s) (:func:`room_to_improve`) from the imperfect ones.

    Either way, when one pool is empty every draw comes from the other (as R3's).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if not 0.0 <= perfect_share <= 1.0:
        raise ValueError("perfect_share must be in [0, 1]")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    perfect = [c for c in candidates if c.perfect]
    imperfect = [c for c in candidates if not c.perfect]
    if n and not candidates:
        raise ValueError("no start states to select from")
    rng = random.Random(derive_seed(seed, "tree-select"))
    if weighting == "uniform":
        chosen = []
        for _ in range(n):
            from_perfect = rng.random() < perfect_share
            pool = (perfect if from_perfect else imperfect) or perfect or imperfect
            chosen.append(pool[rng.randrange(len(pool))])
        return chosen
    n_perfect = round(perfect_share * n)
    if not perfect:
        n_perfect = 0
    elif not imperfect:
        n_perfect = n
    chosen = [rng.choice(perfect) for _ in range(n_perfect)]
    if n - n_perfect:
        chosen += rng.choices(
            imperfect, weights=[room_to_improve(c.score) for c in imperfect], k=n - n_perfect
        )
    return chosen


# --- 3. forks -------------------------------------------------------------------------------


def fork_points(
    starts: Sequence[StartState], group_size: int, seed: int = 0
) -> list[tuple[ReasonerState, str]]:
    """G copies of each start state as new trajectories: (state, node) points for
    ``Runner.resume``. Only the trajectory id and the task's group id, sample index and seed
    change; a state drawn m times forks m·G members into its one group."""
    if group_size < 1:
        raise ValueError("group_size must be at least 1")
    drawn: dict[str, int] = {}
    points = []
    for start in starts:
        first = drawn.get(start.point, 0)
        drawn[start.point] = first + group_size
        state = ReasonerState.model_validate(start.state)
        for sample in range(first, first + group_size):
            task = state.task.model_copy(
                update={
                    "group_id": start.point,
                    "sample_index": sample,
                    # From the parent's task seed, not its (random) id: reproducible forks.
                    "seed": derive_seed(seed, state.task.seed, start.step_seq, sample, "fork"),
                }
            )
            forked = state.model_copy(
                update={
                    "trajectory_id": time_ordered_id(),
                    "task": task,
                }
            )
            points.append((forked, start.node))
    return points


BACKEND_KEYS = ("world", "backends_config", "adapters", "adapter_paths", "adapter_overrides")
"""The keys of a run's config that say which backends it ran on (``agent_graph.rollout``)."""


def parent_backends(store: TrajectoryStore, run_ids: str | Sequence[str]) -> dict[str, Any]:
    """What the runs' configs record of their backends (``BACKEND_KEYS``): ShapeWorld, or a
    backends file and its adapter versions. One kind for all the runs, else ``ValueError``;
    so is a run whose backends were given in code (``rollout(context=...)``: nothing to
    rebuild them from)."""
    run_ids = run_list(run_ids)
    if not run_ids:
        raise ValueError("no parent run: the start states name none (give parent_runs=)")
    recorded = {}
    for run_id in run_ids:
        config = store.run(run_id).config
        recorded[run_id] = {key: config[key] for key in BACKEND_KEYS if key in config}
    first_id, first = next(iter(recorded.items()))
    for run_id, backends in recorded.items():
        if backends != first:
            raise ValueError(
                f"runs {first_id[:12]} ({_backends_label(first)}) and {run_id[:12]} "
                f"({_backends_label(backends)}) were recorded on different backends; fork the "
                "runs of one kind at a time"
            )
    if first.get("world") not in ("shapeworld", "config"):
        raise ValueError(
            f"run {first_id[:12]} was recorded with backends given in code "
            f"(world {first.get('world')!r}), which its config cannot rebuild: fork it in "
            "Python with fork(..., backends=...)"
        )
    return first


def _backends_label(backends: Mapping[str, Any]) -> str:
    if backends.get("world") == "config":
        adapters = backends.get("adapters") or {}
        with_ = ", ".join(f"{role} {label}" for role, label in sorted(adapters.items()))
        return f"{backends['backends_config']}" + (f" with {with_}" if with_ else "")
    return str(backends.get("world", "no recorded backends"))


def _parent_runs(starts: Sequence[StartState], given: Sequence[str]) -> list[str]:
    """The given parent runs, then any other run a start state names, in order."""
    runs = list(dict.fromkeys(given))
    for start in starts:
        if start.run_id is not None and start.run_id not in runs:
            runs.append(start.run_id)
    return runs


async def fork(
    store: TrajectoryStore,
    starts: Sequence[StartState],
    *,
    stop_policy: Any,
    group_size: int = 8,
    seed: int = 0,
    stage: str = "reflect_refine",
    parent_runs: Sequence[str] = (),
    name: str | None = None,
    settings: GraphSettings | None = None,
    concurrency: int = 64,
    backends: Backends | None = None,
) -> str:
    """Run G continuations of every start state with ``stop_policy`` as the stop policy, recorded
    into a new run of ``store`` (the store holding the start states' images); returns its id.

    The continuations run on the backends the parent runs (``parent_runs`` and the runs the
    start states were recorded in) were recorded with (:func:`parent_backends`): ShapeWorld,
    or the same backends file, with the adapter versions the parents recorded loaded again on
    its servers (``agent_graph.deploy.redeploy``; a file whose adapters changed since is a
    ``VersionError``). The router is the built-in ``auto``: it decides only in ``plan``, before
    any fork point. ``backends`` (code) replaces them, for parents whose backends were given in
    code.

    The run's config records the backends as a rollout does (``world``, ``backends_config``,
    ``adapters``), names the stop policy and holds ``tree``: the stage, the parent runs, and
    per group (fork point) the parent trajectory, step, node and V̂.
    """
    points = fork_points(starts, group_size, seed)
    parents = _parent_runs(starts, parent_runs)
    budget = points[0][0].budget if points else Budget()
    deployment = None
    if backends is None:
        recorded = parent_backends(store, parents)
        deployment = await redeploy(store, recorded, run_name=f"parent run {parents[0][:12]}")
        config = run_config("auto", budget, recorded.get("backends_config"))
        config.update(deployment.record())  # the adapter versions loaded
    else:
        config = run_config("auto", budget)
        config["world"] = "context"
    config["stop_policy"] = f"{stop_policy.name}@{stop_policy.version}"
    if settings is not None:
        config["settings"] = {"width": settings.width, "height": settings.height}
    forks = {
        s.point: {
            "trajectory": s.trajectory_id,
            "step": s.step_seq,
            "node": s.node,
            "from_stage": s.from_stage,
            "score": s.score,
        }
        for s in starts
    }
    config["tree"] = {
        "stage": stage,
        "parent_runs": parents,
        "group_size": group_size,
        "seed": seed,
        "forks": forks,
    }
    run = store.create_run(name or f"tree-{stage}", config)
    try:
        async with SQLRecorder(store, run.id) as recorder:
            if deployment is not None:
                context = deployment.context(store, recorder, settings)
            else:
                context = ReasonerContext(
                    backends=backends,
                    mode_policy=builtin_mode_policy("auto"),
                    stop_policy=stop_policy,
                    images=store,
                    settings=settings or GraphSettings(),
                    recorder=recorder,
                )
            context = dataclasses.replace(context, stop_policy=stop_policy)  # the trained one
            runner = Runner(context, concurrency=concurrency, keep_steps=False)
            store.register_trajectories(run.id, [state for state, _ in points])
            await runner.resume(points, description=f"tree {stage}")
    finally:
        if deployment is not None:  # the parents' backends, built again for the forks
            await deployment.aclose()
    store.finish_run(run.id)
    return run.id


# --- 4. stage rewards and groups ------------------------------------------------------------


def reflect_refine_rewards(
    v_prev: float, v_new: float | None, stopped: bool, r_format: float
) -> dict[str, float]:
    """R3's reflect-refine stage rewards for one member (``training.rewards.stages``):

    C            = V − V̂ if V̂ < 1, else 1[stopped]    (V = V̂ when no image was made)
    reflection   = C + r_format
    refinement   = C
    """
    c = correction(v_prev, v_new, stopped)
    return {
        "correction": c,
        "reflection": reflection_reward(v_prev, v_new, stopped, r_format),
        "refinement": c,
    }


def member_stage_rewards(detail: TrajectoryDetail) -> tuple[dict[str, float], int]:
    """Stage rewards of a forked trajectory (``store.trajectory(id)``) and the seq of the
    stage's first step. V̂ is the current image's score when the fork started, V the score of
    the first image the stage made (None: it made none), ``stopped`` the stop policy's first
    decision, r_format that of the first reflection."""
    first = detail.steps[0]
    if first.node != "reflect":
        raise ValueError(f"trajectory {detail.id} does not start with a reflect-refine stage")
    before = first.state_before["images"]
    v_prev = float(before[-1]["score"])
    after = (detail.final_state or {}).get("images") or []
    new = after[len(before)]["score"] if len(after) > len(before) else None
    reflection = first.update["reflections"][0]
    rewards = reflect_refine_rewards(
        v_prev,
        None if new is None else float(new),
        bool(reflection["accept"]),
        reflection_format_reward(reflection["text"]),
    )
    rewards["checker"] = float(detail.score) if detail.score is not None else 0.0
    return rewards, first.seq


def read_stage_groups(
    store: TrajectoryStore,
    run_ids: str | Sequence[str],
    stage: str = "reflect_refine",
    *,
    policy: str | None = None,
    version: str | None = None,
    status: str | None = "succeeded",
    min_size: int = 2,
) -> list[DecisionGroup]:
    """Per fork point, a GRPO group of the stage's decision: each member carries only the
    decision taken at the fork (later rounds are later stages) and the stage rewards
    (:func:`member_stage_rewards`; ``checker`` is the trajectory's final score)."""
    kind = STAGE_DECISIONS[stage]
    keyed: list[tuple[tuple[str, int], DecisionGroup]] = []
    for run_id, point, details in stored_groups(store, run_ids, status, min_size):
        members = []
        for detail in details:
            rewards, seq = member_stage_rewards(detail)
            decisions = trajectory_decisions(detail, kind, policy=policy, version=version)
            at_fork = [d for d in decisions if d.step_seq == seq]
            members.append(decision_member(detail, rewards, at_fork))
        group = DecisionGroup(
            run_id=run_id,
            group_id=point,
            prompt=details[0].prompt,
            category=details[0].category,
            kind=kind,
            members=tuple(members),
        )
        if group.decision_count:
            seeds = [int(detail.initial_state["task"]["seed"]) for detail in details]
            keyed.append(((run_id, min(seeds)), group))
    # Fork points are named after random trajectory ids; order the groups by their members'
    # (derived) seeds instead, so that training on them is reproducible.
    return [group for _, group in sorted(keyed, key=lambda kv: kv[0])]


# --- 5. training ----------------------------------------------------------------------------


def stage_config(config: GRPOConfig, stage: str = "reflect_refine") -> GRPOConfig:
    """A ``GRPOConfig`` for a stage: R = the stage reward alone, no complexity penalty (the
    stage's members all start from one state; the penalty is for whole trajectories)."""
    return dataclasses.replace(
        config,
        outcome_reward=STAGE_REWARD[stage],
        reward_weights=(1.0, 0.0, 0.0),
        complexity_eps=None,
    )


@dataclass
class StageIteration:
    run_id: str
    """The forked run."""
    behaviour: str
    trained: str
    starts: int
    perfect_starts: int
    metrics: dict[str, float]


async def tree_iterations(
    store: TrajectoryStore,
    trainer: GRPOTrainer,
    run_ids: str | Sequence[str],
    *,
    stage: str = "reflect_refine",
    iterations: int = 1,
    starts: int = 32,
    group_size: int = 8,
    perfect_share: float = 0.15,
    weighting: str = "uniform",
    rounds: int | None = None,
    seed: int = 0,
    settings: GraphSettings | None = None,
    save_dir: str | Path | None = None,
    backends: Backends | None = None,
    series: str | None = None,
) -> tuple[Any, list[StageIteration]]:
    """Tree-RL on one stage: per iteration, draw ``starts`` start states from the runs
    (:func:`select_start_states` with ``perfect_share`` and ``weighting``), fork G
    continuations with the current policy version (on-policy) on the runs' own backends
    (``backends``: given in code instead; see :func:`fork`), train on the stage groups.
    ``trainer`` is a ``GRPOTrainer`` of the stage's policy whose config is a
    :func:`stage_config`. With ``save_dir``, every version is saved under
    ``save_dir/<name>-<version>`` and registered in the store, with the forked run it was
    trained from (``run``, also ``fork_run``) and its place in a series of versions
    (``series``: given, e.g. by R3's alternation, whose rounds call this once each; else
    ``tree-<stage>-<first fork run id>``; ``series_iteration``: the index within this call).
    Returns (last policy version, per-iteration logs)."""
    run_ids = run_list(run_ids)
    if trainer.config.outcome_reward != STAGE_REWARD[stage]:
        raise ValueError("train a stage with stage_config(config, stage)")
    if backends is None:
        parent_backends(store, run_ids)  # one kind, rebuildable: refused before any fork
    candidates = stage_start_states(store, run_ids, stage, rounds=rounds)
    if not candidates:
        raise ValueError(f"no {stage} start states in {', '.join(run_ids)}")
    policy = trainer.policy.clone()
    log = []
    for index in range(iterations):
        chosen = select_start_states(
            candidates,
            starts,
            perfect_share=perfect_share,
            weighting=weighting,
            seed=derive_seed(seed, index),
        )
        run_id = await fork(
            store,
            chosen,
            stop_policy=policy,
            group_size=group_size,
            seed=derive_seed(seed, index, "fork"),
            stage=stage,
            parent_runs=run_ids,
            name=f"tree-{stage}-{index}",
            settings=settings,
            backends=backends,
        )
        series = series or f"tree-{stage}-{run_id}"
        groups = read_stage_groups(store, run_id, stage, policy=policy.name, version=policy.version)
        store_member_rewards(store, groups)  # the stage rewards: stored before use
        result = trainer.train(groups)
        store_trained_rewards(store, result, trainer.name, {"run": run_id, "stage": stage})
        if save_dir is not None and result.version != policy.version:  # else: no update
            directory = Path(save_dir) / f"{trainer.name}-{trainer.version}"
            where = {"run": run_id, "fork_run": run_id, "series": series}
            where["series_iteration"] = index
            save_version(trainer, store, directory, {**result.metrics, **where})
        log.append(
            StageIteration(
                run_id,
                f"{policy.name}@{policy.version}",
                f"{result.policy.name}@{result.policy.version}",
                len(chosen),
                sum(s.perfect for s in chosen),
                result.metrics,
            )
        )
        policy = result.policy
    return policy, log
