"""On-policy GRPO over any backends: roll out through the configured servers → store →
rewards → train → save a new version → deploy it on every replica → the next iteration samples
from it (issue 15's loop; ``atelier train --config FILE --prompts FILE``).

The loop is a sequence of iterations, each a recorded run whose config names the loop
(``config["loop"]``: name, iteration, the behaviour version, the options that define the loop)
and each trained version registered with ``metadata["loop"]`` and ``["loop_iteration"]``. The
store is the loop's whole state, so a loop killed at any point (SIGKILL included) continues
with :func:`online_iterations` ``(resume=True)`` without duplicating anything:

- a run killed mid-way is finished by ``resume_run`` (only its unfinished trajectories run, on
  the versions it recorded);
- rewards are stored only where the trajectory does not hold that value yet;
- a version is registered together with what each member was trained with (one transaction,
  ``save_version(..., rewards=...)``): an iteration whose version is registered is done, one
  without is trained again from the same stored groups — the same update, since the trainer's
  state after the previous iteration (optimizer moments, KL reference) is checkpointed next to
  the versions (``<save_dir>/.loop-<name>/<name>-<version>``). A version directory left by a
  process killed between writing the files and registering them is moved aside, not reused.

What is trained is a :class:`LoopPolicy`: a decision policy (router, stop) or a text/VLM LoRA
(``atelier.cli.train_loop`` builds both). Nothing here knows ShapeWorld: the backends file names
the world, and ShapeWorld is one such file.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent_graph.rollout import resume_run, rollout
from agent_graph.runner import make_group_tasks
from nodes.state import Budget
from policies.deployed import DeployedVersion

if TYPE_CHECKING:
    from storage.records import RunInfo
    from storage.store import RewardInput, TrajectoryStore
    from training.result import TrainResult


class LoopError(ValueError):
    """The loop cannot start or continue; the message is one line naming why."""


class LoopPolicy(Protocol):
    """What the loop trains (one policy, one trainer kept across iterations)."""

    name: str
    """The policy's name in the registry (``router``, ``decompose``, ...)."""

    def deployment(self, version: DeployedVersion | None) -> dict[str, Any]:
        """``rollout`` keywords serving ``version`` (``router=``, ``stop=`` or ``adapters=``);
        None: the behaviour before any training (the base model)."""
        ...

    def start(self, version: DeployedVersion | None, checkpoint: Path | None) -> None:
        """Build the trainer on ``version``'s weights (None: fresh), with the trainer state
        checkpointed after it was trained (``checkpoint``; None: a fresh optimizer)."""
        ...

    @property
    def version(self) -> str:
        """The version the trainer holds now (trained versions follow it)."""
        ...

    async def score(self, store: TrajectoryStore, run_id: str) -> None:
        """Compute and store every reward the groups read (idempotent)."""
        ...

    def groups(
        self, store: TrajectoryStore, run_id: str, behaviour: DeployedVersion | None
    ) -> list:
        """The run's GRPO groups of this policy, read back from the store."""
        ...

    def train(self, groups: Sequence[Any]) -> TrainResult: ...

    def trained_rows(self, result: TrainResult, groups: Sequence[Any], run_id: str) -> list:
        """What each member was trained with (``RewardInput`` rows, stored with the version)."""
        ...

    def save(
        self,
        store: TrajectoryStore,
        directory: Path,
        metadata: dict[str, Any],
        rows: Sequence[RewardInput],
    ) -> Path:
        """Save and register the trainer's current version with ``rows`` (one transaction)."""
        ...

    def save_checkpoint(self, directory: Path) -> None:
        """The trainer state :meth:`start` continues from (optimizer moments, reference)."""
        ...


@dataclass
class LoopSpec:
    """One training loop: where it samples, from which prompts, how often."""

    name: str
    """Names the loop in the store (its runs and versions): ``--resume`` finds it by this."""
    backends_config: Path
    prompts: Sequence[str]
    iterations: int
    group_size: int = 8
    prompts_per_iteration: int | None = None
    """Prompts per iteration, taken in order and cycling (None: all of them every iteration)."""
    seed: int = 0
    budget: Budget = field(default_factory=Budget)
    concurrency: int = 64
    mode: str | None = None
    """A built-in router for the rollouts (None: the file's ``[policies]``, else ``auto``);
    not with a policy that deploys its own router."""
    save_dir: Path = Path("atelier-policies")
    signature: dict[str, Any] = field(default_factory=dict)
    """The options that define the loop (JSON): a resume with others is refused."""

    def prompts_of(self, iteration: int) -> list[str]:
        count = self.prompts_per_iteration or len(self.prompts)
        start = iteration * count
        return [self.prompts[(start + k) % len(self.prompts)] for k in range(count)]

    def tasks_of(self, iteration: int) -> list[Any]:
        return make_group_tasks(self.prompts_of(iteration), self.group_size, self.seed + iteration)


@dataclass
class LoopIteration:
    index: int
    run_id: str
    behaviour: str
    """The version that rolled out (``name@version``, or ``base``)."""
    trained: str | None
    """The version this iteration produced (None: no group carried a learning signal)."""
    metrics: dict[str, float] = field(default_factory=dict)
    resumed: bool = False
    """Whether any of it was done by an earlier, interrupted process."""


def loop_runs(store: TrajectoryStore, name: str) -> dict[int, RunInfo]:
    """The loop's recorded runs by iteration (the newest, where an iteration whose every
    trajectory failed was rolled out again)."""
    runs: dict[int, RunInfo] = {}
    for run in store.runs():  # oldest first
        loop = run.config.get("loop")
        if isinstance(loop, dict) and loop.get("name") == name:
            runs[int(loop["iteration"])] = run
    return runs


def _all_failed(store: TrajectoryStore, run_id: str) -> str | None:
    """The first error when every trajectory of the run failed (a server down, a bad config:
    nothing to learn from), else None."""
    summaries = store.trajectories(run=run_id, limit=None)
    if not summaries or any(t.status != "failed" for t in summaries):
        return None
    first = next((t.error for t in summaries if t.error), None) or "unknown error"
    return f"all {len(summaries)} trajectories failed; the first: {' '.join(first.split())[:300]}"


def loop_versions(store: TrajectoryStore, policy: str, name: str) -> dict[int, DeployedVersion]:
    """The versions the loop registered, by the iteration that trained them (-1: the initial,
    untrained version a fresh decision policy is saved as)."""
    versions = {}
    for info in store.policy_versions(name=policy):
        meta = info.metadata or {}
        if meta.get("loop") == name and info.path:
            kind = str(meta.get("loop_kind", "adapter"))
            version = DeployedVersion(kind, info.name, info.version, info.path)
            versions[int(meta["loop_iteration"])] = version
    return versions


def start_version(
    store: TrajectoryStore, name: str, loop: str, save_dir: Path, iterations: int
) -> str:
    """The version a fresh adapter (no ``--init``) has before the loop's first update: the one
    the loop's first run recorded (``--resume``), else the first whose ``iterations`` successors
    are all free in the store and under ``save_dir`` (nothing is ever overwritten)."""
    from training.versions import produced_versions, taken_versions

    runs = loop_runs(store, loop)
    if runs:
        return str(runs[min(runs)].config["loop"].get("start_version", "0"))
    taken = taken_versions(store, name, save_dir)
    version = "0"
    while any(v in taken for v in produced_versions(version, iterations)):
        version = str(int(version) + 1) if version.isdigit() else version + "1"
    return version


def checkpoint_dir(spec: LoopSpec, version: DeployedVersion) -> Path:
    return spec.save_dir / f".loop-{spec.name}" / f"{version.name}-{version.version}"


def check_signature(spec: LoopSpec, runs: dict[int, RunInfo], resume: bool) -> None:
    """Refuse a second loop of the same name, or a resume with other options."""
    if not runs:
        return
    if not resume:
        raise LoopError(
            f"a training loop named {spec.name!r} is in the store ({len(runs)} iteration(s) "
            "recorded): continue it with --resume, or give another --loop"
        )
    recorded = runs[min(runs)].config["loop"].get("signature", {})
    for key in sorted(set(recorded) | set(spec.signature)):
        if recorded.get(key) != spec.signature.get(key):
            raise LoopError(
                f"--resume {spec.name}: the loop was started with {key} = {recorded.get(key)!r}, "
                f"not {spec.signature.get(key)!r}; resume it with the options it was started "
                "with, or start another loop (--loop)"
            )


def _label(version: DeployedVersion | None) -> str:
    return version.label if version is not None else "base"


def _set_aside(path: Path) -> Path:
    """Move an unregistered version directory (a killed save) out of the way, kept."""
    target = path.with_name(f".{path.name}.unregistered-{int(time.time())}")
    shutil.move(str(path), str(target))
    return target


async def online_iterations(
    store: TrajectoryStore,
    spec: LoopSpec,
    policy: LoopPolicy,
    initial: DeployedVersion | None,
    *,
    resume: bool = False,
    on_iteration: Callable[[LoopIteration], None] | None = None,
    say: Callable[[str], None] = lambda _: None,
    extra_loop: dict[str, Any] | None = None,
) -> list[LoopIteration]:
    """Run (or, with ``resume``, continue) the loop ``spec`` from ``initial`` (the version
    iteration 0 rolls out; None: the base model). Returns one log entry per iteration.
    ``on_iteration`` is called as each ends; ``say`` gets one-line notices; ``extra_loop`` adds
    keys to each run's ``config["loop"]``."""
    runs = loop_runs(store, spec.name)
    check_signature(spec, runs, resume)
    if resume and not runs:
        say(f"no loop named {spec.name!r} is recorded in this store: starting it")
    produced = loop_versions(store, policy.name, spec.name)
    behaviour = initial
    done = [i for i in produced if i >= 0]
    if done:  # continue from the newest version the loop trained, with its trainer state
        behaviour = produced[max(done)]
        checkpoint = checkpoint_dir(spec, behaviour)
        if not checkpoint.is_dir():
            say(
                f"no trainer state for {behaviour.label} ({checkpoint}): continuing with fresh "
                "optimizer moments"
            )
        policy.start(behaviour, checkpoint if checkpoint.is_dir() else None)
    else:
        policy.start(initial, None)
    log: list[LoopIteration] = []
    for index in range(spec.iterations):
        if index in produced:  # trained and registered by an earlier process
            run = runs.get(index)
            behaviour_then = (run.config["loop"].get("behaviour") if run else None) or "?"
            entry = LoopIteration(
                index, run.id if run else "?", behaviour_then, produced[index].label, resumed=True
            )
            log.append(entry)
            if on_iteration is not None:
                on_iteration(entry)
            continue
        run = runs.get(index)
        if run is not None and _all_failed(store, run.id):
            run = None  # kept, as recorded; the iteration is rolled out again
        run_id, resumed = await _rollout(
            store, spec, policy, index, run, behaviour, extra_loop or {}
        )
        failed = _all_failed(store, run_id)
        if failed:
            raise LoopError(
                f"iteration {index} of loop {spec.name!r}: {failed} (run {run_id[:12]}; fix the "
                "cause and --resume: the iteration is rolled out again)"
            )
        await policy.score(store, run_id)
        groups = policy.groups(store, run_id, behaviour)
        before = policy.version
        result = policy.train(groups)
        trained = None
        if result.version != before:
            metadata = {"loop": spec.name, "loop_iteration": index, "run": run_id}
            trained = save_trained(
                store, spec, policy, result, groups, run_id, metadata, behaviour, say
            )
            trained_state = checkpoint_dir(spec, trained)
            if trained_state.exists():
                _set_aside(trained_state)
            policy.save_checkpoint(trained_state)
        entry = LoopIteration(
            index,
            run_id,
            _label(behaviour),
            trained.label if trained is not None else None,
            result.metrics,
            resumed,
        )
        log.append(entry)
        if on_iteration is not None:
            on_iteration(entry)
        if trained is not None:
            behaviour = trained
    return log


def save_trained(
    store: TrajectoryStore,
    spec: LoopSpec,
    policy: LoopPolicy,
    result: TrainResult,
    groups: Sequence[Any],
    run_id: str,
    metadata: dict[str, Any],
    behaviour: DeployedVersion | None,
    say: Callable[[str], None] = lambda _: None,
) -> DeployedVersion:
    """Save and register the version ``result`` made, with what each member was trained with
    (one transaction), under ``spec.save_dir``; returns it, ready to deploy. A directory of that
    name left by a save that was killed before registering is moved aside first."""
    kind = behaviour.kind if behaviour is not None else "adapter"
    directory = spec.save_dir / f"{policy.name}-{result.version}"
    if directory.exists():  # files without a registration: a save that was killed
        say(f"{directory} was never registered (a killed save): moved aside")
        _set_aside(directory)
    metadata = {
        **result.metrics,
        **metadata,
        "loop_kind": kind,
        "behaviour": _label(behaviour),
    }
    rows = policy.trained_rows(result, groups, run_id)
    path = policy.save(store, directory, metadata, rows)
    return DeployedVersion(kind, policy.name, result.version, str(path.resolve()))


async def _rollout(
    store: TrajectoryStore,
    spec: LoopSpec,
    policy: LoopPolicy,
    index: int,
    run: RunInfo | None,
    behaviour: DeployedVersion | None,
    extra_loop: dict[str, Any],
) -> tuple[str, bool]:
    """The iteration's run, recorded with ``behaviour`` deployed: a new one, or the one an
    interrupted process left, finished. Returns (run id, whether it existed)."""
    if run is not None:
        recorded = run.config["loop"].get("behaviour")
        if recorded != _label(behaviour):
            raise LoopError(
                f"iteration {index} of loop {spec.name!r} was recorded with {recorded}, but the "
                f"loop's versions say {_label(behaviour)} comes before it; the store's history "
                "of this loop was changed (start another loop with --loop)"
            )
        if run.trajectory_count == 0:  # killed between creating the run and its trajectories
            from agent_graph.runner import _initial_state

            states = [_initial_state(task, spec.budget) for task in spec.tasks_of(index)]
            store.register_trajectories(run.id, states)
        await resume_run(store, run.id, concurrency=spec.concurrency)
        return run.id, True
    return await iteration_run(store, spec, policy, index, behaviour, extra_loop), False


async def iteration_run(
    store: TrajectoryStore,
    spec: LoopSpec,
    policy: LoopPolicy,
    index: int,
    behaviour: DeployedVersion | None,
    extra_loop: dict[str, Any],
    *,
    register_only: bool = False,
    extra_config: dict[str, Any] | None = None,
) -> str:
    """A new run of iteration ``index`` with ``behaviour`` deployed, its config naming the loop
    (``config["loop"]``); its id. ``register_only``: registered for rollout workers, not
    sampled here (an asynchronous loop's)."""
    loop = {
        "name": spec.name,
        "iteration": index,
        "behaviour": _label(behaviour),
        "signature": spec.signature,
        **extra_loop,
    }
    outcome = await rollout(
        store,
        spec.tasks_of(index),
        backends_config=spec.backends_config,
        budget=spec.budget,
        name=f"{spec.name}/{index}",
        concurrency=spec.concurrency,
        extra_config={"loop": loop, **(extra_config or {})},
        mode=spec.mode,
        register_only=register_only,
        **policy.deployment(behaviour),
    )
    return outcome.run_id
