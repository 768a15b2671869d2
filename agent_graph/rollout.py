"""Recorded runs: roll tasks out into the trajectory store, and resume runs that were killed.

A run's config (world, mode policy, budget) is stored with it, so ``resume`` rebuilds the same
context and continues each unfinished trajectory from its last recorded step. Trajectory seeds
make the continuation identical to what the uninterrupted run would have done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from agent_graph.presets import config_context, shapeworld_context
from agent_graph.runner import Runner, TrajectoryResult
from nodes.context import GraphSettings
from nodes.state import Budget, ReasonerState, Task
from policies.base import ModePolicy, StopPolicy

DEFAULT_DB = "sqlite:///atelier.db"


def database_url(value: str | None) -> str:
    """``--db`` / ``ATELIER_DB``: a SQLAlchemy URL, or a plain path meaning a SQLite file."""
    if not value:
        return DEFAULT_DB
    return value if "://" in value else f"sqlite:///{value}"


def run_config(mode: str, budget: Budget, backends_config: Path | None = None) -> dict[str, Any]:
    """What ``resume`` needs to rebuild a run's context: world or backends file, mode, budget."""
    config: dict[str, Any] = {"mode": mode, "budget": budget.model_dump()}
    if backends_config is None:
        config["world"] = "shapeworld"
    else:
        config["world"] = "config"
        config["backends_config"] = str(Path(backends_config).resolve())
    return config


def _context(config: dict[str, Any], store: Any, recorder: Any, resuming: bool = True) -> Any:
    if resuming and ("router" in config or "stopper" in config or "settings" in config):
        named = ", ".join(f"{k}={config[k]}" for k in ("router", "stopper") if k in config)
        raise ValueError(
            f"this run used policies or settings given in code ({named or 'settings'}); "
            "resume it in code: Runner(context with them).resume(resume_points(store, run))"
        )
    world = config.get("world")
    if world == "shapeworld":
        return shapeworld_context(config["mode"], images=store, recorder=recorder)
    if world == "config":
        return config_context(
            config["backends_config"], config["mode"], images=store, recorder=recorder
        )
    raise ValueError(f"this run used world {world!r}, which this version cannot rebuild")


async def rollout(
    store: Any,
    tasks: Sequence[Task],
    *,
    mode: str = "auto",
    budget: Budget | None = None,
    name: str | None = None,
    concurrency: int = 64,
    progress: bool = False,
    keep_steps: bool = False,
    backends_config: Path | None = None,
    router: ModePolicy | None = None,
    stopper: StopPolicy | None = None,
    settings: GraphSettings | None = None,
    request_stats: dict[str, dict[str, int]] | None = None,
    keep_groups_together: bool = False,
    run_id: str | None = None,
) -> tuple[str, list[TrajectoryResult]]:
    """Run ``tasks`` (on ShapeWorld, or the backends a config file names), recording every
    step; returns (run id, results).

    ``router`` / ``stopper`` (e.g. a learned policy version being trained) replace the policies
    ``mode`` would pick; the run's config names them, and ``resume`` then refuses to guess them.
    ``request_stats``, when given, is filled with the HTTP backends' counts per server
    (attempts, retries, requests given up:
    :meth:`~nodes.backends.clients.pool.ServerPool.counters`).
    ``run_id`` fixes the new run's id (default: a fresh one), so that a caller interrupted
    mid-run (Ctrl-C) can name the run to resume without having seen the return value.
    """
    from storage.recorder import SQLRecorder

    budget = budget or Budget()
    config = run_config(mode, budget, backends_config)
    overrides: dict[str, Any] = {}
    for key, policy in (("router", router), ("stopper", stopper)):
        if policy is not None:
            config[key] = f"{policy.name}@{policy.version}"
            overrides[key] = policy
    if settings is not None:
        config["settings"] = {"width": settings.width, "height": settings.height}
        overrides["settings"] = settings
    run = store.create_run(name, config, run_id=run_id)
    async with SQLRecorder(store, run.id) as recorder:
        context = replace(_context(config, store, recorder, resuming=False), **overrides)
        runner = Runner(
            context,
            concurrency=concurrency,
            budget=budget,
            keep_steps=keep_steps,
            keep_groups_together=keep_groups_together,
        )
        # Every trajectory is in the store before any starts: a run killed early resumes all.
        states = [runner.state_factory(task, budget) for task in tasks]
        store.register_trajectories(run.id, states)
        starts = [(state, None) for state in states]
        try:
            results = await runner.resume(starts, progress=progress, description=name or "rollout")
        finally:
            _report_requests(context, request_stats)
    return run.id, results


def resume_points(store: Any, run_id: str) -> list[tuple[ReasonerState, str | None]]:
    """(state after the last recorded step, that step's node) for each unfinished trajectory."""
    store.mark_incomplete(run_id)
    points: list[tuple[ReasonerState, str | None]] = []
    for summary in store.trajectories(run=run_id, status="incomplete"):
        steps = store.steps(summary.id)
        if steps:
            points.append((store.last_state(summary.id, ReasonerState), steps[-1].node))
        else:
            detail = store.trajectory(summary.id)
            points.append((ReasonerState.model_validate(detail.initial_state), None))
    return points


async def resume_run(
    store: Any,
    run_id: str,
    *,
    concurrency: int = 64,
    progress: bool = False,
    request_stats: dict[str, dict[str, int]] | None = None,
) -> list[TrajectoryResult]:
    """Finish every incomplete trajectory of a run from where its recording stopped
    (``request_stats``: as for :func:`rollout`)."""
    from storage.recorder import SQLRecorder

    run = store.run(run_id)
    points = resume_points(store, run.id)
    if not points:
        return []
    budget = Budget.model_validate(run.config.get("budget", {}))
    async with SQLRecorder(store, run.id) as recorder:
        context = _context(run.config, store, recorder)
        runner = Runner(context, concurrency=concurrency, budget=budget, keep_steps=False)
        try:
            return await runner.resume(points, progress=progress)
        finally:
            _report_requests(context, request_stats)


def _report_requests(context: Any, into: dict[str, dict[str, int]] | None) -> None:
    if into is None:
        return
    from nodes.backends.clients.pool import pools_of, request_counters

    backends = [getattr(context.backends, f.name) for f in fields(context.backends)]
    into.update(request_counters(pools_of(backends)))
