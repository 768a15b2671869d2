"""Asynchronous GRPO on ShapeWorld through the store: a sampler and a trainer running at once.

Two asyncio tasks share nothing but the store:

- the **sampler** rolls out task batches one after another, each with the *newest* version the
  loop has registered (looked up in ``store.policy_versions`` and loaded from its directory:
  a new version is hot-loaded at the next batch, never mid-run); each batch is a recorded run
  whose config names the loop (``config["async_loop"]``);
- the **trainer** reads the loop's *complete* groups from the store (every one of the G members
  finished), trains on ``groups_per_step`` of them, saves and registers the next version, and
  repeats ``iterations`` times.

A group's staleness is ``trained − sampled``: the version number the trainer's update starts
from minus the version number its decisions record (``steps.update["decisions"][i]["version"]``,
written at sampling time). A group staler than ``max_staleness`` (K) is skipped — marked used,
counted and listed in the iteration's log, never trained on. The sampler is throttled as in
AReaL: it starts a batch only while the groups it has produced are fewer than
``(versions trained + K + 1) · groups_per_step``. With batches of ``groups_per_step`` groups and
the trainer taking groups oldest first, the bound then holds by construction, and skips come
only from groups recorded outside the loop's pace (runs of older versions already in the store,
batches that do not divide a step). K = 0 is the synchronous loop
(``training.decisions.loop.grpo_iterations``): every batch is sampled by the version the
trainer then updates. The trainer's optimisation runs in a thread (``asyncio.to_thread``) so
rollouts go on while it trains.

Every group is used at most once (the trainer remembers what it trained on or skipped), and
versions are registered in order through ``training.versions.save_version`` (never
overwritten). ``before_step`` is a hook awaited before each step reads the store: tests use it
to fix the interleaving with events, benchmarks to wait.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_graph.rollout import rollout
from nodes.context import GraphSettings
from nodes.state import Budget, Task
from policies.weights import load_policy
from storage.claims import UNFINISHED
from training.decisions.groups import DecisionGroup, read_groups
from training.decisions.rewards import FORMAT, store_member_rewards, store_trained_rewards
from training.decisions.sampling import shapeworld_policy_context
from training.decisions.trainer import GRPOTrainer
from training.versions import save_version

if TYPE_CHECKING:
    from storage.store import TrajectoryStore


@dataclass
class AsyncConfig:
    """The asynchronous loop's options (the trainer's own are ``GRPOConfig``)."""

    max_staleness: int = 0
    """K: a group is trained on only if sampled at most K versions before the version being
    updated (AReaL's staleness bound η, Fu et al. 2025; SkyRL's ``max_staleness_steps``).
    0 is synchronous on-policy GRPO; AReaL reports K of 4-8 losing little."""
    groups_per_step: int = 8
    """Groups (prompts × G samples) per trainer step; each step makes one version."""
    iterations: int = 4
    """Trainer steps, i.e. versions made."""
    name: str = "async"
    """The loop's name: its runs' ``config["async_loop"]["name"]`` and its versions'
    ``metadata["async_loop"]``."""
    rollout_concurrency: int = 64
    """Trajectories the sampler runs at once."""


@dataclass(frozen=True)
class GroupUse:
    run_id: str
    group_id: str
    sampled: str
    """The version whose decisions the group recorded."""
    staleness: int


@dataclass
class AsyncIteration:
    index: int
    start: str
    """name@version the update started from."""
    trained: str
    """name@version it produced."""
    used: list[GroupUse] = field(default_factory=list)
    skipped: list[GroupUse] = field(default_factory=list)
    """Groups found staler than K at this step: never trained on."""
    wall_s: float = 0.0
    """Seconds from the previous version's registration (or the loop's start) to this one's."""
    wait_s: float = 0.0
    """Of which the trainer waited for complete groups."""
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def staleness(self) -> dict[int, int]:
        """staleness -> groups trained on with it."""
        return dict(sorted(Counter(g.staleness for g in self.used).items()))


def version_number(version: str) -> int:
    """The trailing number of a version ("3", "v3" -> 3): what staleness subtracts."""
    match = re.search(r"(\d+)$", version)
    if match is None:
        raise ValueError(f"version {version!r} has no number: staleness needs numbered versions")
    return int(match[1])


async def record_batch(
    store: TrajectoryStore,
    tasks: Sequence[Task],
    policy: Any,
    *,
    loop: str,
    budget: Budget | None = None,
    settings: GraphSettings | None = None,
    concurrency: int = 64,
) -> str:
    """Roll ``tasks`` out on ShapeWorld with ``policy`` as the router, recorded as a run of the
    loop ``loop``; returns the run id."""
    outcome = await rollout(
        store,
        tasks,
        context=shapeworld_policy_context(policy, settings=settings),
        world="shapeworld",
        budget=budget,
        name=f"{loop}-{policy.name}-{policy.version}",
        concurrency=concurrency,
        extra_config={"async_loop": {"name": loop, "behaviour": f"{policy.name}@{policy.version}"}},
    )
    return outcome.run_id


def complete_groups(store: TrajectoryStore, run_id: str, group_size: int) -> set[str]:
    """Group ids of the run whose ``group_size`` members have all finished."""
    return {
        group_id
        for group_id, members in store.groups(run=run_id).items()
        if len(members) >= group_size and all(m.status not in UNFINISHED for m in members)
    }


def group_version(group: DecisionGroup) -> str:
    """The version that sampled the group: the oldest its decisions record (one, in a run)."""
    versions = {d.version for m in group.members for d in m.decisions}
    return min(versions, key=version_number)


class _Shared:
    """What the two tasks tell each other (the data itself goes through the store)."""

    def __init__(self) -> None:
        self.changed = asyncio.Condition()
        self.steps = 0
        self.sampled_groups = 0
        self.batches = 0
        self.sampler_done = False
        self.trainer_done = False

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


async def async_grpo(
    store: TrajectoryStore,
    trainer: GRPOTrainer,
    task_batches: Sequence[Sequence[Task]],
    save_dir: str | Path,
    config: AsyncConfig | None = None,
    *,
    group_size: int,
    budget: Budget | None = None,
    settings: GraphSettings | None = None,
    before_step: Callable[[int], Awaitable[None]] | None = None,
    on_iteration: Callable[[AsyncIteration], None] | None = None,
    on_batch: Callable[[str], None] | None = None,
) -> tuple[Any, list[AsyncIteration]]:
    """Sample ``task_batches`` (each: tasks of whole groups of ``group_size``) and train
    ``config.iterations`` versions at once; returns (the last version, per-iteration logs).

    The trainer's starting version is saved under ``save_dir`` and registered first (the
    sampler's first version); each trained version is saved as ``save_dir/<name>-<version>``
    and registered with the groups it used, their staleness and those skipped. The loop ends
    after ``config.iterations`` steps, or earlier when the batches run out and too few usable
    groups remain (the last step then trains on those left, if any).
    """
    cfg = config or AsyncConfig()
    if cfg.max_staleness < 0 or cfg.groups_per_step < 1:
        raise ValueError("max_staleness must be >= 0 and groups_per_step >= 1")
    save_dir = Path(save_dir)
    shared = _Shared()
    save_version(trainer, store, save_dir / f"{trainer.name}-{trainer.version}", _meta(cfg, -1))
    log: list[AsyncIteration] = []

    async def sampler() -> None:
        loaded: dict[str, Any] = {}

        def may_start() -> bool:  # AReaL's throttle: never more than K + 1 steps ahead
            bound = (shared.steps + cfg.max_staleness + 1) * cfg.groups_per_step
            return shared.trainer_done or shared.sampled_groups < bound

        try:
            for tasks in task_batches:
                async with shared.changed:
                    await shared.changed.wait_for(may_start)
                if shared.trainer_done:
                    return
                version = _newest(store, trainer.name, cfg.name)
                if version.version not in loaded:  # hot-load: the registered files
                    loaded[version.version] = load_policy(version.path)
                run_id = await record_batch(
                    store,
                    tasks,
                    loaded[version.version],
                    loop=cfg.name,
                    budget=budget,
                    settings=settings,
                    concurrency=cfg.rollout_concurrency,
                )
                shared.sampled_groups += len({t.group_id for t in tasks})
                shared.batches += 1
                if on_batch is not None:
                    on_batch(run_id)
                await shared.notify()
        finally:
            shared.sampler_done = True
            await shared.notify()

    async def train() -> None:
        seen: set[tuple[str, str]] = set()
        waiting: list[tuple[DecisionGroup, str]] = []  # usable groups not trained yet, FIFO
        policy = trainer.policy.clone()
        last = time.perf_counter()
        try:
            for index in range(cfg.iterations):
                if before_step is not None:
                    await before_step(index)
                current = version_number(trainer.version)
                skipped: list[GroupUse] = []
                waited = time.perf_counter()
                while True:
                    batches = shared.batches
                    finished = shared.sampler_done
                    for group, sampled in _new_groups(
                        store, trainer.name, cfg.name, group_size, seen
                    ):
                        waiting.append((group, sampled))
                    kept = []
                    for group, sampled in waiting:
                        use = GroupUse(
                            group.run_id, group.group_id, sampled, current - version_number(sampled)
                        )
                        if use.staleness > cfg.max_staleness:
                            skipped.append(use)
                        else:
                            kept.append((group, sampled))
                    waiting = kept
                    if len(waiting) >= cfg.groups_per_step or finished:
                        break
                    async with shared.changed:  # a batch recorded, or the sampler ended
                        await shared.changed.wait_for(
                            lambda b=batches: shared.batches > b or shared.sampler_done
                        )
                wait_s = time.perf_counter() - waited
                taken, waiting = waiting[: cfg.groups_per_step], waiting[cfg.groups_per_step :]
                if not taken:
                    break  # the batches ran out
                groups = [group for group, _ in taken]
                used = [
                    GroupUse(g.run_id, g.group_id, s, current - version_number(s)) for g, s in taken
                ]
                start = f"{trainer.name}@{trainer.version}"
                store_member_rewards(store, groups, (trainer.config.outcome_reward, FORMAT))
                result = await asyncio.to_thread(trainer.train, groups)
                store_trained_rewards(store, result, trainer.name, {"async_loop": cfg.name})
                if result.history:  # no optimizer step (all zero-variance): no new version
                    directory = save_dir / f"{trainer.name}-{trainer.version}"
                    meta = {**result.metrics, **_meta(cfg, index, used, skipped)}
                    save_version(trainer, store, directory, meta)
                policy = result.policy
                now = time.perf_counter()
                iteration = AsyncIteration(
                    index,
                    start,
                    f"{policy.name}@{policy.version}",
                    used,
                    skipped,
                    wall_s=now - last,
                    wait_s=wait_s,
                    metrics=result.metrics,
                )
                last = now
                log.append(iteration)
                if on_iteration is not None:
                    on_iteration(iteration)
                shared.steps += 1
                await shared.notify()
        finally:
            shared.trainer_done = True
            await shared.notify()

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(sampler())
        tasks.create_task(train())
    return trainer.policy.clone(), log


def _newest(store: TrajectoryStore, name: str, loop: str) -> Any:
    """The loop's newest registered version of ``name``."""
    mine = [v for v in store.policy_versions(name=name) if v.metadata.get("async_loop") == loop]
    return max(mine, key=lambda v: version_number(v.version))


def _new_groups(
    store: TrajectoryStore, name: str, loop: str, group_size: int, seen: set[tuple[str, str]]
) -> list[tuple[DecisionGroup, str]]:
    """The loop's complete groups not seen before (marked seen now), oldest run first, each
    with the version that sampled it."""
    found = []
    for run in store.runs():
        if (run.config.get("async_loop") or {}).get("name") != loop:
            continue
        complete = {
            g for g in complete_groups(store, run.id, group_size) if (run.id, g) not in seen
        }
        if not complete:
            continue
        for group in read_groups(store, run.id, "mode", policy=name):
            if group.group_id in complete:
                found.append((group, group_version(group)))
        seen.update((run.id, g) for g in complete)  # a group without decisions: nothing to train
    return found


def _meta(
    cfg: AsyncConfig,
    index: int,
    used: Sequence[GroupUse] = (),
    skipped: Sequence[GroupUse] = (),
) -> dict[str, Any]:
    return {
        "async_loop": cfg.name,
        "async_iteration": index,
        "max_staleness": cfg.max_staleness,
        "trained_groups": [[g.run_id, g.group_id, g.sampled, g.staleness] for g in used],
        "skipped_stale": [[g.run_id, g.group_id, g.sampled, g.staleness] for g in skipped],
    }
