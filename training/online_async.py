"""Asynchronous GRPO over any backends, sampled by rollout workers: the on-policy loop of
:mod:`training.online` with sampling and training overlapped, across processes.

The trainer's process samples nothing. It records the loop as a run of its own
(:mod:`agent_graph.loops`) and, for each iteration, *registers* a run of the iteration's tasks
(``rollout(..., register_only=True)``) deploying the newest version it has — the router or stop
version, or the role's adapter, exactly as :func:`training.online.online_iterations` deploys
it. ``atelier worker LOOP`` processes (any number, any machines sharing the store) follow the
loop: each takes part in the oldest registered run with work left, rebuilding that run's
deployment — which loads its adapter version on every server of the role's backend, so a new
version is hot-loaded on the servers as the first worker starts a run that names it — until the
trainer ends the loop.

Meanwhile the trainer takes *complete* runs (every trajectory finished), one per step, the
stalest first, and trains on one only if its staleness — versions trained since the one that
sampled it — is at most ``max_staleness`` (K); a staler run is skipped, listed in the next
version's metadata, never trained on. The dispatcher is throttled as AReaL's rollout controller
is: it registers iteration ``i`` only while ``i < steps + K + 1``, so with runs completing in
order no run is ever skipped; a run delayed (a worker killed mid-way: a lease to wait out) may
be. K = 0 is the synchronous loop with the sampling moved to workers.

Scoring, reading the groups, training, saving and registering (with what each member was
trained with), and the trainer checkpoints are those of the synchronous loop. Not supported
here: ``resume`` (a killed asynchronous loop is started again under another name: the versions
it registered stay, and ``--init`` continues from one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent_graph.loops import LOOP_KEY, open_loop
from training.online import (
    LoopError,
    LoopIteration,
    LoopPolicy,
    LoopSpec,
    _all_failed,
    _label,
    checkpoint_dir,
    iteration_run,
    loop_runs,
    save_trained,
)

if TYPE_CHECKING:
    from policies.deployed import DeployedVersion
    from storage.records import RunInfo
    from storage.store import TrajectoryStore


@dataclass
class AsyncLoopIteration(LoopIteration):
    staleness: int = 0
    """Versions trained between the one that sampled the run and the one this step updated."""
    skipped: list[tuple[str, str, int]] = field(default_factory=list)
    """Runs found staler than K before this step: (run id, behaviour, staleness)."""
    wall_s: float = 0.0
    """Seconds since the previous step ended (or the loop started)."""
    wait_s: float = 0.0
    """Of which the trainer waited for a complete run."""


@dataclass
class _Registered:
    run_id: str
    iteration: int
    behaviour: int
    """Index of the sampling version in the loop's list of versions (0: the initial one)."""


async def online_async(
    store: TrajectoryStore,
    spec: LoopSpec,
    policy: LoopPolicy,
    initial: DeployedVersion | None,
    *,
    max_staleness: int,
    poll_s: float = 0.5,
    on_loop: Callable[[RunInfo], None] | None = None,
    on_iteration: Callable[[AsyncLoopIteration], None] | None = None,
    extra_loop: dict[str, Any] | None = None,
) -> list[AsyncLoopIteration]:
    """Run the loop ``spec`` asynchronously from ``initial`` (None: the base model), sampled by
    rollout workers (see the module doc); one log entry per step. ``on_loop`` gets the loop's
    run once recorded (start the workers then); the loop's run ends ``finished``, ``failed`` or
    ``interrupted``, and the workers leave."""
    if max_staleness < 0 or poll_s <= 0:
        raise ValueError("max_staleness must be >= 0 and poll_s > 0")
    if loop_runs(store, spec.name):
        raise LoopError(
            f"a training loop named {spec.name!r} is in the store: an asynchronous loop does "
            "not resume; give another --loop (and --init to continue from one of its versions)"
        )
    policy.start(initial, None)
    loop_run = open_loop(
        store,
        spec.name,
        {
            "max_staleness": max_staleness,
            "iterations": spec.iterations,
            "group_size": spec.group_size,
            "policy": policy.name,
            "signature": spec.signature,
        },
    )
    if on_loop is not None:
        on_loop(loop_run)
    versions: list[DeployedVersion | None] = [initial]  # what each step made, in order
    registered: list[_Registered] = []
    changed = asyncio.Condition()
    state = {"steps": 0, "trainer_done": False, "dispatcher_done": False}
    log: list[AsyncLoopIteration] = []

    async def notify() -> None:
        async with changed:
            changed.notify_all()

    async def dispatch() -> None:
        try:
            for index in range(spec.iterations):
                async with changed:  # AReaL's throttle: at most K + 1 steps ahead
                    await changed.wait_for(
                        lambda i=index: (
                            state["trainer_done"] or i < state["steps"] + max_staleness + 1
                        )
                    )
                if state["trainer_done"]:
                    return
                behaviour = len(versions) - 1
                run_id = await _register(
                    store, spec, policy, index, versions[behaviour], loop_run, extra_loop or {}
                )
                registered.append(_Registered(run_id, index, behaviour))
        finally:
            state["dispatcher_done"] = True
            await notify()

    async def train() -> None:
        taken: set[str] = set()
        last = time.perf_counter()
        try:
            for step in range(spec.iterations):
                waited = time.perf_counter()
                skipped: list[tuple[str, str, int]] = []
                chosen = None
                while chosen is None:
                    dispatcher_done = state["dispatcher_done"]
                    current = len(versions) - 1
                    pending = [r for r in registered if r.run_id not in taken]
                    complete = await asyncio.to_thread(_complete, store, pending)
                    for item in sorted(complete, key=lambda r: (r.behaviour, r.iteration)):
                        staleness = current - item.behaviour
                        taken.add(item.run_id)
                        if staleness > max_staleness:
                            skipped.append(
                                (item.run_id, _label(versions[item.behaviour]), staleness)
                            )
                        else:
                            chosen = item
                            break
                    if chosen is None:
                        if dispatcher_done and not [r for r in registered if r.run_id not in taken]:
                            return  # every registered run used or skipped: nothing more comes
                        await asyncio.sleep(poll_s)
                wait_s = time.perf_counter() - waited
                behaviour = versions[chosen.behaviour]
                failed = _all_failed(store, chosen.run_id)
                if failed:
                    raise LoopError(
                        f"iteration {chosen.iteration} of loop {spec.name!r}: {failed} (run "
                        f"{chosen.run_id[:12]}; fix the cause and start the loop again)"
                    )
                await policy.score(store, chosen.run_id)
                groups = policy.groups(store, chosen.run_id, behaviour)
                before = policy.version
                result = await asyncio.to_thread(policy.train, groups)
                trained = None
                staleness = len(versions) - 1 - chosen.behaviour
                if result.version != before:
                    metadata = {
                        "loop": spec.name,
                        "loop_iteration": step,
                        "run": chosen.run_id,
                        "async_loop": spec.name,
                        "max_staleness": max_staleness,
                        "staleness": staleness,
                        "skipped_stale": [list(s) for s in skipped],
                    }
                    trained = save_trained(
                        store, spec, policy, result, groups, chosen.run_id, metadata, behaviour
                    )
                    policy.save_checkpoint(checkpoint_dir(spec, trained))
                    versions.append(trained)
                now = time.perf_counter()
                entry = AsyncLoopIteration(
                    step,
                    chosen.run_id,
                    _label(behaviour),
                    trained.label if trained is not None else None,
                    result.metrics,
                    staleness=staleness,
                    skipped=skipped,
                    wall_s=now - last,
                    wait_s=wait_s,
                )
                last = now
                log.append(entry)
                if on_iteration is not None:
                    on_iteration(entry)
                state["steps"] += 1
                await notify()
        finally:
            state["trainer_done"] = True
            await notify()

    status = "failed"
    tasks = [asyncio.create_task(dispatch()), asyncio.create_task(train())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # the first failure, as it was
        await asyncio.gather(*tasks)
        status = "finished"
    except asyncio.CancelledError:
        status = "interrupted"
        raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        store.finish_run(loop_run.id, status)  # the workers following the loop leave
    return log


def _complete(store: TrajectoryStore, pending: list[_Registered]) -> list[_Registered]:
    """Of ``pending``, the runs whose every trajectory has finished."""
    return [r for r in pending if store.claim_counts(r.run_id).unfinished == 0]


async def _register(
    store: TrajectoryStore,
    spec: LoopSpec,
    policy: LoopPolicy,
    index: int,
    behaviour: DeployedVersion | None,
    loop_run: RunInfo,
    extra_loop: dict[str, Any],
) -> str:
    """Register iteration ``index``'s run for the workers, deploying ``behaviour``."""
    follow = {"name": spec.name, "loop_run": loop_run.id, "behaviour": _label(behaviour)}
    return await iteration_run(
        store,
        spec,
        policy,
        index,
        behaviour,
        extra_loop,
        register_only=True,
        extra_config={LOOP_KEY: follow},
    )
