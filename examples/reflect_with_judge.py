"""A graph of your own from Atelier's nodes: a reflect-only loop with a custom judge node.

No planner and no router: draw the prompt, let a judge score the image, and only when the judge
is unhappy ask the reflector for an edit. The judge node is an ordinary function; ``AtelierGraph``
records it like every built-in node. The state is extended by subclassing ``ReasonerState``.

Run:  python examples/reflect_with_judge.py "three red circles above two blue squares"
"""

from __future__ import annotations

import asyncio
import operator
import sys
from typing import Annotated

from langgraph.graph import END, START
from langgraph.runtime import Runtime
from pydantic import Field

from agent_graph.graph import AtelierGraph
from agent_graph.presets import shapeworld_context
from agent_graph.runner import Runner
from nodes.context import ReasonerContext
from nodes.draw import draw
from nodes.refine import next_edit, refine
from nodes.reflect import reflect
from nodes.state import Budget, Mode, ReasonerState, StopReason, Task
from nodes.stop import stop

PASS_SCORE = 1.0


class JudgedState(ReasonerState):
    judge_scores: Annotated[list[float], operator.add] = Field(default_factory=list)


async def judge(state: JudgedState, runtime: Runtime[ReasonerContext]) -> dict:
    """Score the newest image against the prompt with the context's judge."""
    ctx = runtime.context
    image = ctx.images.get(state.images[-1].ref)
    verdict = await ctx.backends.judge.judge(image, state.task.prompt)
    update: dict = {"judge_scores": [verdict.score]}
    if verdict.score >= PASS_SCORE:
        # Accepted without a reflection: say so, and the built-in stop node keeps the reason.
        update["stop_reason"] = StopReason.ACCEPTED
    return update


def after_judge(state: JudgedState) -> str:
    if state.stop_reason == StopReason.ACCEPTED or not state.correction_budget_left:
        return "stop"
    return "reflect"


def after_reflect(state: JudgedState) -> str:
    return "refine" if next_edit(state) is not None else "stop"


def build_graph():
    graph = AtelierGraph(JudgedState, context_schema=ReasonerContext)
    for node in (draw, judge, reflect, refine, stop):
        graph.add_node(node)
    graph.add_edge(START, "draw")
    graph.add_edge("draw", "judge")
    graph.add_conditional_edges("judge", after_judge, ["reflect", "stop"])
    graph.add_conditional_edges("reflect", after_reflect, ["refine", "stop"])
    graph.add_edge("refine", "judge")
    graph.add_edge("stop", END)
    return graph.compile()


def initial_state(task: Task, budget: Budget) -> JudgedState:
    import uuid

    # No plan node: the mode is fixed up front, and draw uses the prompt itself.
    return JudgedState(trajectory_id=uuid.uuid4().hex, task=task, budget=budget, mode=Mode.REFLECT)


async def run(prompts: list[str], seed: int = 0):
    # The judge's score drives this graph's routing, so image scoring in the nodes is redundant.
    from nodes.context import GraphSettings

    context = shapeworld_context("reflect", settings=GraphSettings(score_images=False))
    runner = Runner(context, build_graph(), state_factory=initial_state)
    tasks = [Task(prompt=p, seed=seed + i) for i, p in enumerate(prompts)]
    return await runner.run(tasks)


if __name__ == "__main__":
    from agent_graph.show import print_trajectory

    for result in asyncio.run(run(sys.argv[1:] or ["four blue squares"])):
        print_trajectory(result)
