"""Ready-made contexts: ShapeWorld (the embedded default) with a chosen mode policy."""

from __future__ import annotations

from typing import Any

from nodes.context import Backends, GraphSettings, ReasonerContext
from policies.base import ModePolicy, StopPolicy
from policies.simple import (
    FixedModePolicy,
    FollowReflectionStopPolicy,
    RuleBasedModePolicy,
    UniformModePolicy,
)
from storage.images import ImageStore, MemoryImageStore


def mode_policy(mode: str) -> ModePolicy:
    """``auto`` = the rule-based router, ``random`` = uniform, else that fixed mode."""
    if mode == "auto":
        return RuleBasedModePolicy()
    if mode == "random":
        return UniformModePolicy()
    return FixedModePolicy(mode)


def shapeworld_context(
    mode: str = "auto",
    *,
    stopper: StopPolicy | None = None,
    images: ImageStore | None = None,
    config: Any = None,
    settings: GraphSettings | None = None,
    recorder: Any = None,
) -> ReasonerContext:
    from nodes.backends.shapeworld import make_shapeworld

    world = make_shapeworld(config)
    backends = Backends(
        planner=world.planner,
        reflector=world.reflector,
        decomposer=world.decomposer,
        generator=world.generator,
        editor=world.editor,
        judge=world.judge,
    )
    return ReasonerContext(
        backends=backends,
        router=mode_policy(mode),
        stopper=stopper or FollowReflectionStopPolicy(),
        images=images if images is not None else MemoryImageStore(),
        settings=settings or GraphSettings(),
        recorder=recorder,
    )


def config_context(
    path: Any,
    mode: str = "auto",
    *,
    stopper: StopPolicy | None = None,
    images: ImageStore | None = None,
    settings: GraphSettings | None = None,
    recorder: Any = None,
) -> ReasonerContext:
    """A context whose backends come from a config file (``examples/configs/*.toml``)."""
    from nodes.backends.config import load_backends

    return ReasonerContext(
        backends=Backends(**load_backends(path)),
        router=mode_policy(mode),
        stopper=stopper or FollowReflectionStopPolicy(),
        images=images if images is not None else MemoryImageStore(),
        settings=settings or GraphSettings(),
        recorder=recorder,
    )
