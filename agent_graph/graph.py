"""The adaptive reasoner: the whole topology in one place.

::

    START → plan ─┬─ decompose → draw
                  └────────────→ draw ─┬─ (direct) → stop
                                       ├─ reflect ─┬─ refine → (reflect | refine | stop)
                                       │           ├─ reflect  (unusable output, a round spent)
                                       │           └─ stop
                                       └─ refine (decompose, no correction budget left)

The three modes (seed 002) are paths through this one graph; which one a trajectory takes is
the router policy's decision in ``plan``, and when a loop ends is the stop policy's decision in
``reflect`` (bounded by the budget). Routers are small named functions of the state.

:class:`AtelierGraph` is a LangGraph ``StateGraph`` that records every node it is given; users
compose their own graphs with it from the same nodes (see ``examples/``).
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph

from agent_graph.context import ReasonerContext
from agent_graph.recording import recorded
from agent_graph.state import Mode, ReasonerState
from nodes.decompose import decompose
from nodes.draw import draw
from nodes.plan import plan
from nodes.refine import next_edit, refine
from nodes.reflect import reflect
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


# --- routers: plain functions of the state --------------------------------------------------


def route_after_plan(state: ReasonerState) -> str:
    if state.error is not None:
        return "stop"
    return "decompose" if state.mode == Mode.DECOMPOSE else "draw"


def route_after_decompose(state: ReasonerState) -> str:
    return "stop" if state.error is not None else "draw"


def route_after_image(state: ReasonerState) -> str:
    """After draw or refine: look at the new image if a correction could still follow."""
    if state.error is not None or state.mode == Mode.DIRECT:
        return "stop"
    if state.correction_budget_left:
        return "reflect"
    return "refine" if next_edit(state) is not None else "stop"


def route_after_reflect(state: ReasonerState) -> str:
    if state.error is not None:
        return "stop"
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
    graph.add_conditional_edges("reflect", route_after_reflect, ["refine", "reflect", "stop"])
    graph.add_edge("stop", END)
    return graph


def build_reasoner(checkpointer: Any = None) -> Any:
    """The compiled adaptive reasoner (a LangGraph ``CompiledStateGraph``)."""
    return reasoner_graph().compile(checkpointer=checkpointer)


def step_limit(state: ReasonerState) -> int:
    """An upper bound on node steps for this state's budget (LangGraph's recursion limit)."""
    budget = state.budget
    return 4 + 2 * budget.max_images + 2 * budget.max_rounds + 8
