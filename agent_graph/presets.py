"""Ready-made contexts: ShapeWorld (the embedded default) with a chosen mode policy."""

from __future__ import annotations

from typing import Any

from agent_graph.runner import make_group_tasks
from nodes.context import Backends, GraphSettings, ReasonerContext
from nodes.state import Task
from policies.base import ModePolicy, StopPolicy
from policies.simple import (
    FixedModePolicy,
    FollowReflectionStopPolicy,
    RuleBasedModePolicy,
    UniformModePolicy,
)
from storage.images import ImageStore, MemoryImageStore


def builtin_mode_policy(mode: str) -> ModePolicy:
    """``auto`` = the rule-based router, ``random`` = uniform, else that fixed mode (one of
    direct, reflect, decompose, or escalate: the three in turn, as one trajectory)."""
    if mode == "auto":
        return RuleBasedModePolicy()
    if mode == "random":
        return UniformModePolicy()
    return FixedModePolicy(mode)


def shapeworld_backends(config: Any = None) -> Backends:
    """Every role played by one ShapeWorld (``config``: a ``ShapeWorldConfig``)."""
    from nodes.backends.shapeworld import make_shapeworld

    world = make_shapeworld(config)
    return Backends(
        planner=world.planner,
        reflector=world.reflector,
        decomposer=world.decomposer,
        generator=world.generator,
        editor=world.editor,
        judge=world.judge,
    )


def shapeworld_context(
    mode: str = "auto",
    *,
    mode_policy: ModePolicy | None = None,
    stop_policy: StopPolicy | None = None,
    images: ImageStore | None = None,
    config: Any = None,
    settings: GraphSettings | None = None,
    recorder: Any = None,
) -> ReasonerContext:
    """ShapeWorld with the built-in router ``mode`` picks (or ``mode_policy``, e.g. a trained
    version: ``policies.deployed.load_decision_policy``)."""
    return ReasonerContext(
        backends=shapeworld_backends(config),
        mode_policy=mode_policy or builtin_mode_policy(mode),
        stop_policy=stop_policy or FollowReflectionStopPolicy(),
        images=images if images is not None else MemoryImageStore(),
        settings=settings or GraphSettings(),
        recorder=recorder,
    )


def config_context(
    path: Any,
    mode: str | None = None,
    *,
    mode_policy: ModePolicy | None = None,
    stop_policy: StopPolicy | None = None,
    store: Any = None,
    images: ImageStore | None = None,
    settings: GraphSettings | None = None,
    recorder: Any = None,
) -> ReasonerContext:
    """A context whose backends come from a config file (``examples/configs/*.toml``).

    The router: ``mode_policy``, else the built-in ``mode``, else the file's ``[policies]
    router``, else ``auto``; the stop policy: ``stop_policy``, else the file's ``[policies]
    stop``, else ``FollowReflectionStopPolicy``. ``store`` resolves ``name@version``. Adapter
    versions are requested, not loaded: ``await agent_graph.deploy.deploy(...)`` also loads them
    on the servers (what ``rollout`` does)."""
    from nodes.backends.config import configure_backends
    from policies.deployed import load_decision_policy

    configured = configure_backends(path, store)
    versions = configured.versions
    if mode_policy is None and mode is None and versions.router is not None:
        mode_policy = load_decision_policy(versions.router)
    if stop_policy is None and versions.stop is not None:
        stop_policy = load_decision_policy(versions.stop)
    return ReasonerContext(
        backends=Backends(**configured.roles),
        mode_policy=mode_policy or builtin_mode_policy(mode or "auto"),
        stop_policy=stop_policy or FollowReflectionStopPolicy(),
        images=images if images is not None else MemoryImageStore(),
        settings=settings or GraphSettings(),
        recorder=recorder,
    )


def shapeworld_tasks(
    per_category: int, group_size: int = 1, seed: int = 0, *, prompt_seed: int | None = None
) -> list[Task]:
    """G tasks for each of ShapeWorld's fixed prompts (``per_category`` of every category),
    with their categories: ``make_group_tasks`` over ``fixed_prompt_set``. ``prompt_seed``
    (default ``seed``) picks the prompts, ``seed`` the groups' and samples' seeds."""
    from nodes.backends.shapeworld import fixed_prompt_set

    items = fixed_prompt_set(per_category, seed=seed if prompt_seed is None else prompt_seed)
    return make_group_tasks(
        [item.text for item in items], group_size, seed, [item.category for item in items]
    )
