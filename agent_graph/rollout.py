"""Recorded runs: roll tasks out into the trajectory store, and resume runs that were killed.

A run's config (world, mode policy, budget) is stored with it, so ``resume`` rebuilds the same
context and continues each unfinished trajectory from its last recorded step. Trajectory seeds
make the continuation identical to what the uninterrupted run would have done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_graph.deploy import Ref, check_resume_options, deploy, redeploy
from agent_graph.runner import Runner, TrajectoryResult, _initial_state
from nodes.backends.clients.pool import pools_of, request_counters
from nodes.context import ReasonerContext
from nodes.state import Budget, ReasonerState, Task
from storage.recorder import SQLRecorder

if TYPE_CHECKING:
    from storage.store import TrajectoryStore

DEFAULT_DB = "sqlite:///atelier.db"


def database_url(value: str | None) -> str:
    """``--db`` / ``ATELIER_DB``: a SQLAlchemy URL, or a plain path meaning a SQLite file."""
    if not value:
        return DEFAULT_DB
    return value if "://" in value else f"sqlite:///{value}"


def run_config(
    mode: str | None, budget: Budget, backends_config: Path | None = None
) -> dict[str, Any]:
    """What ``resume`` needs to rebuild a run's context: world or backends file, the built-in
    mode (None: a trained router, recorded by :meth:`Deployment.record`), budget."""
    config: dict[str, Any] = {"budget": budget.model_dump()}
    if mode is not None:
        config = {"mode": mode, **config}
    if backends_config is None:
        config["world"] = "shapeworld"
    else:
        config["world"] = "config"
        config["backends_config"] = str(Path(backends_config).resolve())
    return config


@dataclass
class RolloutResult:
    """What :func:`rollout` and :func:`resume_run` return."""

    run_id: str
    results: list[TrajectoryResult]
    """One per trajectory run (for ``resume_run``: per trajectory continued)."""
    requests: dict[str, dict[str, int]] = field(default_factory=dict)
    """The HTTP backends' counts per server (attempts, retries, requests given up:
    :meth:`~nodes.backends.clients.pool.ServerPool.counters`); empty for ShapeWorld and
    in-process backends."""


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _state_type(graph: Any) -> type[ReasonerState]:
    """The state a compiled graph runs on (``StateGraph(state_schema)``)."""
    builder = getattr(graph, "builder", None)
    schema = getattr(builder, "state_schema", None)
    if not (isinstance(schema, type) and issubclass(schema, ReasonerState)):
        raise TypeError(
            "graph must be a compiled AtelierGraph (or StateGraph) over ReasonerState or a "
            f"subclass of it, not {type(graph).__name__}"
        )
    return schema


def _describe(graph: Any, context: ReasonerContext | None) -> dict[str, Any]:
    """The parts of a run given in code, named in its config (resume then needs them again)."""
    named: dict[str, Any] = {}
    if graph is not None:
        named["graph"] = getattr(graph, "name", None) or "LangGraph"
        named["state"] = _qualified(_state_type(graph))
    if context is not None:
        named["world"] = "context"
        for key, policy in (
            ("mode_policy", context.mode_policy),
            ("stop_policy", context.stop_policy),
        ):
            name, version = getattr(policy, "name", None), getattr(policy, "version", None)
            named[key] = f"{name}@{version}" if name and version else _qualified(type(policy))
    return named


async def rollout(
    store: TrajectoryStore,
    tasks: Sequence[Task],
    *,
    graph: Any = None,
    state_factory: Callable[[Task, Budget], ReasonerState] | None = None,
    context: ReasonerContext | None = None,
    mode: str | None = None,
    router: Ref | None = None,
    stop: Ref | None = None,
    adapters: dict[str, Ref] | None = None,
    backends_config: Path | None = None,
    world: str | None = None,
    budget: Budget | None = None,
    name: str | None = None,
    run_id: str | None = None,
    concurrency: int = 64,
    progress: bool = False,
    keep_steps: bool = False,
    keep_groups_together: bool = False,
    extra_config: dict[str, Any] | None = None,
    register_only: bool = False,
) -> RolloutResult:
    """Run ``tasks`` through a graph, recording every step of every trajectory in ``store``.

    What runs: ``graph`` (a compiled :class:`~agent_graph.graph.AtelierGraph`; default the
    adaptive reasoner) with the initial states ``state_factory(task, budget)`` makes (default a
    plain :class:`ReasonerState`), on ``context`` — or, without one, on ShapeWorld or the
    backends the ``backends_config`` file names, with the router ``router`` (a trained version:
    ``name@version`` registered in ``store``, or its directory), else the built-in one ``mode``
    picks, else the file's ``[policies] router``, else ``auto``; and the stop policy ``stop``,
    else the file's, else following the reflection (:mod:`agent_graph.deploy`). Adapter versions
    the file names (or ``adapters``, ``{role: version}``, names instead) are loaded on their
    servers before the run is created; a bad reference or
    file raises (``VersionError``, ``ConfigError``) before anything is recorded.
    ``store`` becomes the context's image store and its recorder, whatever ``context`` had.

    A run built from a config is resumed by ``resume_run(store, run)`` alone (the run's config
    names world, mode or versions, and budget). Parts given in code (``graph``, ``context``) are
    named in the run's config, and ``resume_run`` asks for them again rather than guess.
    ``world="shapeworld"`` says that ``context``'s backends are ShapeWorld's defaults
    (``agent_graph.presets.shapeworld_backends()``): the run then records that world, so that
    readers rebuild its backends (Tree-RL forks, the judge); its policies stay code.

    ``run_id`` fixes the new run's id (default: a fresh one), so that a caller interrupted
    mid-run (Ctrl-C) can name the run to resume without having seen the return value.
    ``keep_steps`` keeps the step records in the results too (they are in the store anyway);
    ``keep_groups_together`` admits a group's samples together (see :class:`Runner`).
    ``extra_config`` adds keys to the run's config (a training loop names itself there).
    ``register_only`` creates the run and registers its trajectories (``incomplete``) without
    running any (no results): rollout workers (:func:`agent_graph.workers.work_run`, ``atelier
    worker``) on one or many machines then sample it, or ``resume_run`` in this process.
    """
    budget = budget or Budget()
    if world is not None and (context is None or world != "shapeworld"):
        raise ValueError('world= takes "shapeworld", for a context= on ShapeWorld\'s backends')
    deployment = None
    if context is None:
        deployment = await deploy(
            store,
            backends_config=backends_config,
            mode=mode,
            router=router,
            stop=stop,
            adapters=adapters,
        )
        config = run_config(deployment.mode, budget, backends_config)
        config.update(deployment.record())
    elif router is not None or stop is not None or adapters:
        raise ValueError(
            "router=, stop= and adapters= build a context: give them or context=, not both"
        )
    else:  # its router and backends are named below instead
        config = run_config(None, budget)
    config.update(_describe(graph, context))
    if world is not None:
        config["world"] = world
    config.update(extra_config or {})
    try:
        run = store.create_run(name, config, run_id=run_id)
        if register_only:
            factory = state_factory or _initial_state
            store.register_trajectories(run.id, [factory(task, budget) for task in tasks])
            store.finish_run(run.id, "incomplete")  # until workers finish it
            return RolloutResult(run.id, [])
        async with SQLRecorder(store, run.id) as recorder:
            if deployment is not None:
                context = deployment.context(store, recorder)
            else:
                context = replace(context, images=store, recorder=recorder)
            runner = Runner(
                context,
                graph,
                concurrency=concurrency,
                budget=budget,
                keep_steps=keep_steps,
                state_factory=state_factory,
                keep_groups_together=keep_groups_together,
            )
            # Every trajectory is in the store before any starts: a run killed early resumes
            # all of them.
            states = [runner.state_factory(task, budget) for task in tasks]
            store.register_trajectories(run.id, states)
            starts = [(state, None) for state in states]
            try:
                description = name or "rollout"
                results = await runner.resume(starts, progress=progress, description=description)
            finally:
                requests = _request_counts(context)
    finally:
        if deployment is not None:  # the backends built here (a loop builds one set a run)
            await deployment.aclose()
    return RolloutResult(run.id, results, requests)


def resume_points(
    store: TrajectoryStore, run_id: str, state_type: type[ReasonerState] = ReasonerState
) -> list[tuple[ReasonerState, str | None]]:
    """(state after the last recorded step, that step's node) for each unfinished trajectory,
    as ``state_type`` (the state class of the graph that made the run)."""
    store.mark_incomplete(run_id)
    summaries = store.trajectories(run=run_id, status="incomplete")
    return [resume_point(store, summary.id, state_type) for summary in summaries]


def resume_point(
    store: TrajectoryStore, trajectory_id: str, state_type: type[ReasonerState] = ReasonerState
) -> tuple[ReasonerState, str | None]:
    """(state after the trajectory's last recorded step, that step's node; None: none yet, the
    initial state) — where ``Runner.resume`` continues it."""
    state = state_type.model_validate(store.last_state_dict(trajectory_id, state_type))
    return state, store.last_step_node(trajectory_id)


def resume_points_of(
    store: TrajectoryStore,
    trajectory_ids: Sequence[str],
    state_type: type[ReasonerState] = ReasonerState,
) -> list[tuple[ReasonerState, str | None]]:
    """:func:`resume_point` of each of ``trajectory_ids``, in order: the ones with no step
    recorded (a fresh claim, the common case) from one read of their initial states."""
    fresh = store.initial_states_if_unstarted(trajectory_ids)
    return [
        (state_type.model_validate(fresh[tid]), None)
        if tid in fresh
        else resume_point(store, tid, state_type)
        for tid in trajectory_ids
    ]


def _check_resumable(config: dict[str, Any], graph: Any, context: Any) -> None:
    """Refuse to resume a run without the parts it was given in code, or with another state."""
    missing, used = [], []
    if "graph" in config and graph is None:
        missing.append("graph=...")
        used.append(f"a graph on {config['state']}")
    in_code = config.get("world") == "context" or any(
        key in config
        for key in (
            "mode_policy",  # a context's policies (on a recorded world too)
            "stop_policy",  # ... and a Tree-RL fork's trained stop policy
            *("router", "stopper", "settings"),  # runs of older versions
        )
    )
    if in_code and context is None:
        missing.append("context=...")
        policies = ("mode_policy", "stop_policy", "router", "stopper")
        named = ", ".join(f"{k} {config[k]}" for k in policies if k in config)
        used.append(f"a context with {named}" if named else "a context")
    if missing:
        raise ValueError(
            f"this run was started in code ({' and '.join(used)}): resume it in code, "
            f"with resume_run(store, run, {', '.join(missing)})"
        )
    if graph is not None:
        recorded = config.get("state", _qualified(ReasonerState))
        if _qualified(_state_type(graph)) != recorded:
            raise ValueError(
                f"this run's states are {recorded}, but the graph given runs on "
                f"{_qualified(_state_type(graph))}"
            )


async def resume_run(
    store: TrajectoryStore,
    run_id: str,
    *,
    graph: Any = None,
    context: ReasonerContext | None = None,
    router: Ref | None = None,
    stop: Ref | None = None,
    concurrency: int = 64,
    progress: bool = False,
) -> RolloutResult:
    """Finish every incomplete trajectory of a run from where its recording stopped.

    A run started with ``graph=`` or ``context=`` needs them again (the same graph; a context
    with the same backends and policies), since code cannot be stored; anything else is
    rebuilt from the run's config: its world or backends file, and the router and stop policy
    it recorded (a trained version from its recorded directory). ``router=`` / ``stop=`` may
    name the recorded versions again; another version is refused (``VersionError``), and so is
    a backends file whose adapter versions changed since. ``store`` becomes the context's
    images and recorder."""

    run = store.run(run_id)
    _check_resumable(run.config, graph, context)
    if context is not None and (router is not None or stop is not None):
        raise ValueError("router= and stop= build a context: give them or context=, not both")
    run_name = f"run {run.id[:12]}" + (f" ({run.name})" if run.name else "")
    leased = store.claim_counts(run.id).leased
    if leased:
        raise ValueError(
            f"{run_name} is being sampled by rollout workers ({leased} trajectories under a "
            "live lease): start another `atelier worker` on it instead, or resume it once "
            "their leases have passed"
        )
    if context is None:
        check_resume_options(store, run.config, router=router, stop=stop, run_name=run_name)
    state_type = _state_type(graph) if graph is not None else ReasonerState
    points = resume_points(store, run.id, state_type)
    if not points:
        return RolloutResult(run.id, [])
    budget = Budget.model_validate(run.config.get("budget", {}))
    deployment = None
    if context is None:
        deployment = await redeploy(store, run.config, run_name=run_name)
    try:
        async with SQLRecorder(store, run.id) as recorder:
            if deployment is not None:
                context = deployment.context(store, recorder)
            else:
                context = replace(context, images=store, recorder=recorder)
            runner = Runner(
                context, graph, concurrency=concurrency, budget=budget, keep_steps=False
            )
            try:
                results = await runner.resume(points, progress=progress)
            finally:
                requests = _request_counts(context)
    finally:
        if deployment is not None:
            await deployment.aclose()
    return RolloutResult(run.id, results, requests)


def _request_counts(context: ReasonerContext) -> dict[str, dict[str, int]]:

    backends = [getattr(context.backends, f.name) for f in fields(context.backends)]
    return request_counters(pools_of(backends))
