"""The adaptive reasoner: the whole topology in one place.

::

    START → plan ─┬─ decompose → draw
                  └────────────→ draw ─┬─ (direct) → stop
                                       ├─ reflect ─┬─ refine → (reflect | refine | stop)
                                       │           ├─ reflect  (unusable output, a round spent)
                                       │           ├─ decompose (escalate: still rejected)
                                       │           └─ stop
                                       └─ refine (decompose, no correction budget left)

The three modes of the Self-Adaptive Interleaved Reasoner are paths through this one graph;
which one a trajectory takes is the router policy's decision in ``plan``, and when a loop ends
is the stop policy's decision in ``reflect`` (bounded by the budget). Edge routers are small
named functions of the state.

Escalate mode (SAIR's data pipeline) walks the three paths in one trajectory, as stages
(``ReasonerState.stage``): direct (plan → draw → reflect), then reflect (refine → reflect, at
most ``min(max_rounds, escalate_rounds)`` rounds) while the reflector rejects the image, then
decompose (decompose → draw on a fresh canvas → the decompose path) if it still does. Every
image of the first two stages gets a verdict, since the verdict decides the escalation; the
reflection that gives it records the switch (``nodes.reflect.escalation``).

:class:`AtelierGraph` is a LangGraph ``StateGraph`` that records every node it is given; users
compose their own graphs with it from the same nodes (see ``examples/``).
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from langgraph.graph import END, START, StateGraph

from agent_graph.recording import recorded
from nodes.context import ReasonerContext
from nodes.decompose import decompose
from nodes.draw import draw
from nodes.plan import plan
from nodes.refine import next_edit, refine
from nodes.reflect import reflect
from nodes.state import Mode, ReasonerState
from nodes.stop import stop


class AtelierGraph(StateGraph):
    """A ``StateGraph`` whose every node is wrapped by :func:`agent_graph.recording.recorded`."""

    def add_node(self, node: Any, action: Any = None, **kwargs: Any) -> AtelierGraph:  # type: ignore[override]
        if action is None:
            if isinstance(node, str):
                raise TypeError("add_node(name) needs an action")
            name, action = node.__name__, node
        else:
            name = node
        super().add_node(name, recorded(name, action), **kwargs)
        return self

    def add_conditional_edges(  # type: ignore[override]
        self, source: str, path: Any, path_map: Any = None
    ) -> AtelierGraph:
        super().add_conditional_edges(source, _awaitable_router(path), path_map)
        return self


def _awaitable_router(path: Any) -> Any:
    """A plain sync router ``f(state)`` as a coroutine function.

    LangGraph runs a sync router of an async graph in a thread pool (a thread hop, and a GIL
    hand-off, for every routing decision: ~3 per trajectory). Routers are tiny pure functions
    of the state, so they run inline instead. Annotations are kept (LangGraph reads a
    ``Literal`` return type as the path map); anything else (Runnables, async functions,
    routers taking ``config`` or the runtime) is passed through unchanged.
    """
    if not inspect.isfunction(path) or inspect.iscoroutinefunction(path):
        return path
    if len(inspect.signature(path).parameters) != 1:
        return path

    async def route(state: Any) -> Any:
        return path(state)

    route.__name__ = path.__name__
    route.__qualname__ = path.__qualname__
    route.__doc__ = path.__doc__
    try:  # resolved here, in the router's own module (the wrapper lives in this one)
        route.__annotations__ = typing.get_type_hints(path)
    except Exception:
        route.__annotations__ = dict(getattr(path, "__annotations__", {}))
    route.__module__ = path.__module__
    return route


# --- routers: plain functions of the state --------------------------------------------------


def route_after_plan(state: ReasonerState) -> str:
    if state.error is not None:
        return "stop"
    return "decompose" if state.path == Mode.DECOMPOSE else "draw"


def route_after_decompose(state: ReasonerState) -> str:
    return "stop" if state.error is not None else "draw"


def route_after_image(state: ReasonerState) -> str:
    """After draw or refine: look at the new image if a correction could still follow (in
    escalate mode before its decompose stage, always: the verdict decides the escalation)."""
    if state.error is not None or state.mode == Mode.DIRECT:
        return "stop"
    if state.mode == Mode.ESCALATE and state.stage != Mode.DECOMPOSE:
        return "reflect"
    if state.correction_budget_left:
        return "reflect"
    return "refine" if next_edit(state) is not None else "stop"


def route_after_reflect(state: ReasonerState) -> str:
    if state.error is not None:
        return "stop"
    if state.mode == Mode.ESCALATE and state.stage == Mode.DECOMPOSE and not state.subtasks:
        return "decompose"  # this verdict escalated: the decompose stage starts
    if next_edit(state) is not None:
        return "refine"
    last = state.reflections[-1]
    if not last.accept and not last.instruction and state.correction_budget_left:
        return "reflect"  # the reflection was unusable; try again (it spent a round)
    return "stop"


def reasoner_graph(state_schema: type[ReasonerState] = ReasonerState) -> AtelierGraph:
    """The adaptive reasoner, uncompiled, so users can extend it before compiling."""
    graph = AtelierGraph(state_schema, context_schema=ReasonerContext)
    for node in (plan, decompose, draw, reflect, refine, stop):
        graph.add_node(node)
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", route_after_plan, ["decompose", "draw", "stop"])
    graph.add_conditional_edges("decompose", route_after_decompose, ["draw", "stop"])
    graph.add_conditional_edges("draw", route_after_image, ["reflect", "refine", "stop"])
    graph.add_conditional_edges("refine", route_after_image, ["reflect", "refine", "stop"])
    graph.add_conditional_edges(
        "reflect", route_after_reflect, ["refine", "reflect", "decompose", "stop"]
    )
    graph.add_edge("stop", END)
    return graph


def build_reasoner(checkpointer: Any = None) -> Any:
    """The compiled adaptive reasoner (a LangGraph ``CompiledStateGraph``)."""
    return reasoner_graph().compile(checkpointer=checkpointer)


def step_limit(state: ReasonerState) -> int:
    """An upper bound on node steps for this state's budget (LangGraph's recursion limit).

    Every mode fits it, escalate included: a trajectory takes plan, decompose and stop once,
    one step per image, and one reflection per image plus one per round spent on a retry;
    escalate spends at most ``escalate_rounds`` + ``max_rounds`` <= 2 * ``max_rounds``."""
    budget = state.budget
    return 4 + 2 * budget.max_images + 2 * budget.max_rounds + 8
