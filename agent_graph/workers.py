"""Rollout workers: many processes, on one machine or many, sample one recorded run together.

::

    atelier rollout --per-category 8 -G 8 --name big --register-only --db postgresql://h/atelier
    atelier worker big --db postgresql://h/atelier          # on every machine, as many as wanted

A worker claims a batch of the run's trajectories (:mod:`storage.claims`: PostgreSQL ``FOR
UPDATE SKIP LOCKED``, so two workers never hold one trajectory), runs each from its last
recorded step through the :class:`~agent_graph.runner.Runner` on the context the run's config
rebuilds (as :func:`~agent_graph.rollout.resume_run` does: ShapeWorld, or the backends file and
the versions it recorded), renews its leases while they run, and claims more as slots free up.
It returns once no trajectory of the run is left unfinished: while other workers hold leases it
waits, and takes over the trajectories of a worker that died once its leases pass — continuing
each from the steps that worker recorded, so (trajectories being seeded) the run ends exactly
as an uninterrupted one would. Its recorder is fenced by its claims: a worker that lost a
trajectory (its lease passed while it was alive but stalled) writes nothing more of it.

:func:`follow_loop` is the worker of an asynchronous training loop (:mod:`agent_graph.loops`,
``training.online_async``): it takes part in each run the loop's trainer registers, oldest
first, until the trainer ends the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from agent_graph.deploy import redeploy
from agent_graph.rollout import _check_resumable, _request_counts, _state_type, resume_points_of
from agent_graph.runner import Runner, TrajectoryResult
from nodes.context import ReasonerContext
from nodes.state import Budget, ReasonerState
from storage.recorder import SQLRecorder

if TYPE_CHECKING:
    from storage.store import TrajectoryStore


@dataclass
class WorkerResult:
    """What :func:`work_run` returns."""

    run_id: str
    worker: str
    results: list[TrajectoryResult]
    """One per trajectory this worker finished."""
    lost: int = 0
    """Trajectories it claimed but another worker took over (its lease passed mid-way)."""
    run_status: str = ""
    """The run's status once this worker left it: ``finished`` when nothing is left."""
    requests: dict[str, dict[str, int]] = field(default_factory=dict)
    """The HTTP backends' counts per server (see ``RolloutResult.requests``)."""


def worker_id() -> str:
    """A worker name unique across machines: host, process id and a random tail."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def work_run(
    store: TrajectoryStore,
    run_id: str,
    *,
    worker: str | None = None,
    batch: int = 8,
    lease_s: float = 60.0,
    concurrency: int = 64,
    graph: Any = None,
    context: ReasonerContext | None = None,
    poll_s: float | None = None,
    until_idle: bool = False,
) -> WorkerResult:
    """Sample run ``run_id`` alongside any other workers until none of its trajectories is left
    unfinished.

    Claims ``batch`` trajectories at a time, when a slot is free and none is waiting, under
    leases of ``lease_s`` seconds renewed every third of it; at most ``concurrency`` run at
    once, and claimed ones wait for the next free slots; a worker killed mid-way leaves
    its trajectories to the others after at most ``lease_s``. While nothing is free to claim it
    polls every ``poll_s`` (default: a quarter of the lease, at most 1 s). A run started in
    code needs its ``graph=`` / ``context=`` again, as ``resume_run`` does. The store's
    failure (:class:`~agent_graph.recording.RecordingFailed`) is raised; the worker's claims
    are released first when the store still answers, else they lapse with their leases.
    ``until_idle``: return as soon as nothing is left to claim *now* (other workers' live
    claims are theirs to finish), instead of waiting for the run to end — what a worker
    following a training loop (:func:`follow_loop`) does, to move on to the loop's next run."""
    if batch < 1 or concurrency < 1:
        raise ValueError("batch and concurrency must be at least 1")
    if lease_s <= 0:
        raise ValueError("lease_s must be positive")
    worker = worker or worker_id()
    run = store.run(run_id)
    _check_resumable(run.config, graph, context)
    run_name = f"run {run.id[:12]}" + (f" ({run.name})" if run.name else "")
    state_type = _state_type(graph) if graph is not None else ReasonerState
    budget = Budget.model_validate(run.config.get("budget", {}))
    deployment = await redeploy(store, run.config, run_name=run_name) if context is None else None
    sampler = _Sampler(
        store, run.id, worker, state_type, min(batch, concurrency), lease_s, concurrency
    )
    sampler.poll_s = poll_s if poll_s is not None else min(1.0, lease_s / 4)
    sampler.until_idle = until_idle
    requests: dict[str, dict[str, int]] = {}
    try:
        async with SQLRecorder(store, run.id, claimant=worker) as recorder:
            if deployment is not None:
                context = deployment.context(store, recorder)
            else:
                assert context is not None
                context = replace(context, images=store, recorder=recorder)
            runner = Runner(
                context, graph, concurrency=concurrency, budget=budget, keep_steps=False
            )
            try:
                await sampler.run(runner)
            finally:
                requests = _request_counts(context)
    finally:
        if deployment is not None:
            await deployment.aclose()
        with contextlib.suppress(Exception):  # the store is down: the leases lapse instead
            await asyncio.to_thread(store.release, worker, run.id)
            sampler.run_status = await asyncio.to_thread(store.settle_run, run.id)
    return WorkerResult(run.id, worker, sampler.results, sampler.lost, sampler.run_status, requests)


class _Sampler:
    """The claim / run / renew loop of one worker (see :func:`work_run`)."""

    def __init__(
        self,
        store: TrajectoryStore,
        run_id: str,
        worker: str,
        state_type: type[ReasonerState],
        batch: int,
        lease_s: float,
        concurrency: int,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.worker = worker
        self.state_type = state_type
        self.batch = batch
        self.lease_s = lease_s
        self.concurrency = concurrency
        self.poll_s = 1.0
        self.until_idle = False
        self.results: list[TrajectoryResult] = []
        self.lost = 0
        self.run_status = ""
        self.in_flight: dict[asyncio.Task[list[TrajectoryResult]], str] = {}
        self.queued: deque[tuple[str, tuple[ReasonerState, str | None]]] = deque()
        """Claimed, waiting for a slot: each with the point to continue it from."""

    async def run(self, runner: Runner) -> None:
        renewer = asyncio.create_task(self._renew_leases(), name="atelier-lease-renewal")
        try:
            while True:
                if not self.queued and len(self.in_flight) < self.concurrency:
                    # A slot is free and nothing is queued: claim a batch. What does not fit
                    # waits in the queue for the next free slots (claimed ahead, so a slot
                    # never waits for a claim).
                    self.queued.extend(await asyncio.to_thread(self._claim))
                while self.queued and len(self.in_flight) < self.concurrency:
                    trajectory_id, point = self.queued.popleft()
                    task = asyncio.create_task(runner.resume([point]))
                    self.in_flight[task] = trajectory_id
                if not self.in_flight:
                    if self.until_idle:
                        return
                    left = await asyncio.to_thread(self.store.claim_counts, self.run_id)
                    if left.unfinished == 0:
                        return
                    # Other workers hold the rest: wait for them to finish, or their leases
                    # to pass (a dead worker's trajectories are then ours to claim).
                    await asyncio.sleep(self.poll_s)
                    continue
                done, _ = await asyncio.wait(
                    [*self.in_flight, renewer],
                    timeout=self.poll_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if renewer in done:  # it only ends by failing (the store went away)
                    renewer.result()
                for task in done - {renewer}:
                    self._collect(task)
        finally:
            renewer.cancel()
            for task in self.in_flight:
                task.cancel()
            await asyncio.wait([renewer, *self.in_flight])

    def _claim(self) -> list[tuple[str, tuple[ReasonerState, str | None]]]:
        """Claim a batch; each trajectory with the point to continue it from (read after the
        claim committed: nobody else writes it from then on)."""
        ids = self.store.claim(self.run_id, self.worker, self.batch, self.lease_s)
        return list(zip(ids, resume_points_of(self.store, ids, self.state_type), strict=True))

    def _collect(self, task: asyncio.Task[list[TrajectoryResult]]) -> None:
        self.in_flight.pop(task)
        if task.cancelled():  # taken over by another worker (see _renew_leases)
            self.lost += 1
            return
        results = task.result()  # the store's failure is raised here
        if not results:  # the recorder found the claim lost
            self.lost += 1
        self.results.extend(results)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            running = dict(self.in_flight)
            ids = [*running.values(), *(tid for tid, _ in self.queued)]
            if not ids:
                continue
            kept = set(await asyncio.to_thread(self.store.renew, self.worker, ids, self.lease_s))
            for task, trajectory_id in running.items():
                if trajectory_id not in kept and not task.done():
                    task.cancel()  # another worker holds it now: stop working on it
            gone = set(ids) - kept  # (claimed meanwhile: not asked about, kept)
            waiting = len(self.queued)
            self.queued = deque(item for item in self.queued if item[0] not in gone)
            self.lost += waiting - len(self.queued)


@dataclass
class FollowResult:
    """What :func:`follow_loop` returns."""

    loop_id: str
    worker: str
    runs: list[WorkerResult] = field(default_factory=list)
    """One per time this worker took part in one of the loop's batch runs."""
    loop_status: str = ""
    """The loop's status when the worker left: ``finished`` once its trainer ended;
    ``running`` when it left after ``idle_timeout_s`` with nothing to sample."""

    @property
    def results(self) -> list[TrajectoryResult]:
        return [r for run in self.runs for r in run.results]

    @property
    def lost(self) -> int:
        return sum(run.lost for run in self.runs)


async def follow_loop(
    store: TrajectoryStore,
    loop_id: str,
    *,
    worker: str | None = None,
    batch: int = 8,
    lease_s: float = 60.0,
    concurrency: int = 64,
    poll_s: float = 0.5,
    idle_timeout_s: float | None = None,
) -> FollowResult:
    """Sample for a training loop (:mod:`agent_graph.loops`) until its trainer ends it.

    The loop's trainer registers a run per batch it wants sampled, each naming the policy
    version to sample with. This worker takes part in the oldest of them with anything left to
    claim (:func:`work_run`, ``until_idle``: it moves on when the rest is claimed by others),
    loading the version each run names when it starts on it — so versions saved by the
    trainer are sampled from its next batch on, without restarting anything. With nothing to
    claim it polls every ``poll_s``; it returns once the loop's run is no longer ``running``,
    or after ``idle_timeout_s`` seconds in a row with nothing to claim (a trainer killed with
    SIGKILL leaves its loop ``running`` for ever: this is how its workers leave).
    A dead worker's claims come back claimable when their leases pass, and the oldest-first
    scan finishes them before newer batches."""
    from agent_graph.loops import batch_runs, is_loop_run

    if poll_s <= 0:
        raise ValueError("poll_s must be positive")
    worker = worker or worker_id()
    loop = store.run(loop_id)
    if not is_loop_run(loop):
        raise ValueError(f"run {loop_id[:12]} ({loop.name}) is not a training loop's run")
    result = FollowResult(loop.id, worker)
    idle_since = time.monotonic()
    while True:
        loop = await asyncio.to_thread(store.run, loop.id)
        result.loop_status = loop.status
        if loop.status != "running":
            return result
        runs = await asyncio.to_thread(batch_runs, store, loop)
        runs = [run for run in runs if run.status != "finished"]
        counts = [await asyncio.to_thread(store.claim_counts, run.id) for run in runs]
        ready = [run for run, left in zip(runs, counts, strict=True) if left.free]
        if not ready:
            if idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                return result
            await asyncio.sleep(poll_s)
            continue
        result.runs.append(
            await work_run(
                store,
                ready[0].id,
                worker=worker,
                batch=batch,
                lease_s=lease_s,
                concurrency=concurrency,
                poll_s=poll_s,
                until_idle=True,
            )
        )
        idle_since = time.monotonic()
