"""R3's alternation of stages over any backends: per round, the reason stage, then the
reflect-refine stage from a refreshed buffer of reason-stage results.

R3 (Reason, Reflect, Refine) trains its reason stage (the plan text and the first image) and its
reflect-refine stage (the reflection, the stop phrase, the edit) in alternation: the
reflect-refine stage starts from images the *current* reason policy made, so its start-state
buffer is refreshed after every reason update. Here one round is

1. **rollout**: the round's prompts × G in ``reflect`` mode through the backends file, with the
   current reason-policy version (a text/VLM LoRA of ``plan`` or, with Flow-GRPO, ``draw``:
   any :class:`~training.online.LoopPolicy`) and the current stop-policy version deployed;
2. **reason stage**: that run's rewards stored (R3's ``reason_text`` V·f + w_f·f for the plan,
   ``reason_image`` V for the first draw), the reason policy trained on its groups (one per
   prompt: G samples from the root) and the new version saved and registered;
3. **reflect-refine stage**: Tree-RL (:func:`training.tree.tree_iterations`) on the stop policy,
   its start states drawn from *this round's* run (the reason stage's results: the state before
   the first reflection, ``rounds=0``) as R3's released code draws them, G forks each on the
   run's own backends, trained on the correction C_j.

The next round deploys both new versions. Every run, version and reward is in the store, named
by the round (``config["r3"]``). Unlike :func:`training.online.online_iterations`, a killed
alternation is not resumable yet: start a new one from the newest versions (``--init``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent_graph.rollout import rollout
from policies.deployed import DeployedVersion
from training.online import LoopPolicy, LoopSpec, save_trained
from training.tree import tree_iterations

if TYPE_CHECKING:
    from storage.store import TrajectoryStore
    from training.decisions.trainer import GRPOTrainer


@dataclass
class R3Round:
    index: int
    run_id: str
    """The round's rollout: the reason stage's groups and the reflect-refine start states."""
    reason_behaviour: str
    reason_trained: str | None
    stop_behaviour: str
    stop_trained: str
    fork_runs: list[str] = field(default_factory=list)
    reason_metrics: dict[str, float] = field(default_factory=dict)
    stop_metrics: dict[str, float] = field(default_factory=dict)


async def r3_rounds(
    store: TrajectoryStore,
    spec: LoopSpec,
    reason: LoopPolicy,
    reason_initial: DeployedVersion | None,
    stop_trainer: GRPOTrainer,
    stop_initial: DeployedVersion,
    *,
    tree_iterations_per_round: int = 1,
    starts: int = 32,
    tree_group_size: int = 8,
    perfect_share: float = 0.15,
    weighting: str = "uniform",
    on_round: Callable[[R3Round], None] | None = None,
) -> list[R3Round]:
    """``spec.iterations`` rounds of R3's alternation (the module doc). ``reason`` is the
    reason-stage policy, starting from ``reason_initial`` (None: the base model); the stop
    policy trains with ``stop_trainer`` (a ``GRPOTrainer`` whose config is
    ``training.tree.stage_config``), starting from ``stop_initial`` (a saved version: the
    rollouts deploy it). Versions are saved under ``spec.save_dir``."""
    reason.start(reason_initial, None)
    reason_version, stop_version = reason_initial, stop_initial
    log: list[R3Round] = []
    for index in range(spec.iterations):
        deployed = {**reason.deployment(reason_version), "stop": stop_version.path}
        outcome = await rollout(
            store,
            spec.tasks_of(index),
            backends_config=spec.backends_config,
            mode="reflect",
            budget=spec.budget,
            name=f"{spec.name}/{index}",
            concurrency=spec.concurrency,
            extra_config={
                "r3": {
                    "name": spec.name,
                    "round": index,
                    "reason": reason_version.label if reason_version else "base",
                    "stop": stop_version.label,
                }
            },
            **deployed,
        )
        run_id = outcome.run_id
        # Reason stage: G samples per prompt from the root, R3's reason rewards.
        await reason.score(store, run_id)
        groups = reason.groups(store, run_id, reason_version)
        before = reason.version
        result = reason.train(groups)
        entry = R3Round(
            index,
            run_id,
            reason_version.label if reason_version else "base",
            None,
            stop_version.label,
            stop_version.label,
            reason_metrics=result.metrics,
        )
        if result.version != before:
            metadata = {"r3": spec.name, "r3_round": index, "run": run_id}
            reason_version = save_trained(
                store, spec, reason, result, groups, run_id, metadata, reason_version
            )
            entry.reason_trained = reason_version.label
        # Reflect-refine stage: forks from this round's reason-stage results (refreshed).
        policy, stage_log = await tree_iterations(
            store,
            stop_trainer,
            [run_id],
            iterations=tree_iterations_per_round,
            starts=starts,
            group_size=tree_group_size,
            perfect_share=perfect_share,
            weighting=weighting,
            rounds=0,
            seed=spec.seed + index,
            save_dir=spec.save_dir,
            series=f"r3-{spec.name}",  # the stop policy's versions: one series across rounds
        )
        if policy.version != stop_version.version:  # else no group carried a signal
            path = spec.save_dir / f"{policy.name}-{policy.version}"
            stop_version = DeployedVersion("stop", policy.name, policy.version, str(path.resolve()))
        entry.stop_trained = stop_version.label
        entry.fork_runs = [it.run_id for it in stage_log]
        entry.stop_metrics = stage_log[-1].metrics if stage_log else {}
        log.append(entry)
        if on_round is not None:
            on_round(entry)
    return log
