"""GRPO iterations on ShapeWorld: roll out (recorded) → read decision groups → train → save →
repeat.

Iteration 0 may use another behaviour policy (e.g. the uniform router, maximal exploration);
every later iteration rolls out the version the previous one returned, so the log-probs the
store holds are those of the policy being improved (on-policy GRPO).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodes.backends.protocols import Analyzer
from nodes.context import GraphSettings
from nodes.state import Budget, Task
from training.decisions.groups import DecisionKind, read_groups
from training.decisions.rewards import (
    FORMAT,
    store_member_rewards,
    store_trained_rewards,
)
from training.decisions.sampling import collect
from training.decisions.trainer import GRPOTrainer
from training.rewards.sources import ImageReward, describe_source, score_final_images
from training.rewards.stepwise import store_stepwise_rewards
from training.versions import save_version

if TYPE_CHECKING:
    from storage.store import TrajectoryStore


@dataclass
class Iteration:
    run_id: str
    behaviour: str
    """name@version of the policy that made the run."""
    trained: str
    """name@version of the policy this iteration produced."""
    metrics: dict[str, float] = field(default_factory=dict)


async def grpo_iterations(
    store: TrajectoryStore,
    trainer: GRPOTrainer,
    task_batches: Sequence[Sequence[Task]],
    *,
    kind: DecisionKind = "mode",
    first_behaviour: Any = None,
    budget: Budget | None = None,
    settings: GraphSettings | None = None,
    save_dir: str | Path | None = None,
    on_iteration: Callable[[int, Iteration], None] | None = None,
    analyzer: Analyzer | None = None,
    reward_source: ImageReward | None = None,
) -> tuple[Any, list[Iteration]]:
    """One iteration per task batch; returns (the last policy version, per-iteration logs).

    ``kind`` "mode" trains the router, "stop" the stop policy (the other role keeps
    ShapeWorld's defaults). With ``save_dir``, every version is saved under
    ``save_dir/<name>-<version>`` and registered in the store. ``on_iteration(index,
    iteration)`` is called as each iteration ends (e.g. to log it live). With ``analyzer``,
    every run's intermediate texts are analysed and R_s stored before its groups are read (the
    composite's a3·R_s needs it). With ``reward_source``, every run's final images are scored
    with it and stored under its name before its groups are read, and R_o is that reward (the
    trainer's ``outcome_reward`` must name it); without, R_o is the stored judge score
    (``checker``). Each saved version records the source in its metadata (``reward_source``),
    the run it was trained from (``run``) and its place in this call's series of versions
    (``series``: ``grpo-<first run id>``, ``series_iteration``: the index; see
    ``storage.analysis.training_series``).
    """
    outcome = trainer.config.outcome_reward
    if reward_source is not None and outcome != reward_source.name:
        raise ValueError(
            f"the trainer's outcome_reward is {outcome!r}, but the reward source stores "
            f"{reward_source.name!r}: set GRPOConfig(outcome_reward={reward_source.name!r})"
        )
    source_info = {"reward_source": describe_source(reward_source)}
    policy = trainer.policy.clone()
    log: list[Iteration] = []
    series = ""
    for index, tasks in enumerate(task_batches):
        behaviour = first_behaviour if index == 0 and first_behaviour is not None else policy
        role = {"mode_policy": behaviour} if kind == "mode" else {"stop_policy": behaviour}
        run_id, _ = await collect(
            store, tasks, budget=budget, settings=settings, name=f"grpo-{index}", **role
        )
        series = series or f"grpo-{run_id}"  # names this call's versions: one training series
        if analyzer is not None:  # before read_groups: a group keeps the rewards read with it
            await store_stepwise_rewards(store, run_id, analyzer)
        if reward_source is not None:  # likewise: R_o stored under the source's name first
            await score_final_images(store, run_id, reward_source)
        groups = read_groups(store, run_id, kind, policy=behaviour.name, version=behaviour.version)
        store_member_rewards(store, groups, (outcome, FORMAT))  # R_o, R_f: stored before use
        result = trainer.train(groups)
        store_trained_rewards(store, result, trainer.name, {"run": run_id})
        policy = result.policy
        if save_dir is not None and result.history:  # no optimizer step: no new version
            directory = Path(save_dir) / f"{trainer.name}-{trainer.version}"
            where = {"run": run_id, "series": series, "series_iteration": index}
            save_version(trainer, store, directory, {**result.metrics, **source_info, **where})
        log.append(
            Iteration(
                run_id,
                f"{behaviour.name}@{behaviour.version}",
                f"{policy.name}@{policy.version}",
                result.metrics,
            )
        )
        if on_iteration is not None:
            on_iteration(index, log[-1])
    return policy, log
