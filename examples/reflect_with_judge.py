"""A graph of your own from Atelier's nodes: a reflect-only loop with a custom judge node.

No planner and no router: draw the prompt, let a judge score the image, and only when the judge
is unhappy ask the reflector for an edit. The judge node is an ordinary function; ``AtelierGraph``
records it like every built-in node. The state is extended by subclassing ``ReasonerState``.
Everything comes from ``import atelier`` (and LangGraph's own ``START``/``END``/``Runtime``).

Run:     python examples/reflect_with_judge.py "three red circles above two blue squares"
Record:  python examples/reflect_with_judge.py --db judge.db "four blue squares" ...
Resume:  python examples/reflect_with_judge.py --db judge.db --resume RUN   (after a Ctrl-C)
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import uuid
from typing import Annotated

from langgraph.graph import END, START
from langgraph.runtime import Runtime
from pydantic import Field

import atelier
from atelier import ReasonerContext, ReasonerState, StopReason

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
    return "refine" if atelier.next_edit(state) is not None else "stop"


def build_graph():
    graph = atelier.AtelierGraph(JudgedState, context_schema=ReasonerContext)
    for node in (atelier.draw, judge, atelier.reflect, atelier.refine, atelier.stop):
        graph.add_node(node)
    graph.add_edge(START, "draw")
    graph.add_edge("draw", "judge")
    graph.add_conditional_edges("judge", after_judge, ["reflect", "stop"])
    graph.add_conditional_edges("reflect", after_reflect, ["refine", "stop"])
    graph.add_edge("refine", "judge")
    graph.add_edge("stop", END)
    return graph.compile()


def initial_state(task: atelier.Task, budget: atelier.Budget) -> JudgedState:
    # No plan node: the mode is fixed up front, and draw uses the prompt itself.
    return JudgedState(
        trajectory_id=uuid.uuid4().hex, task=task, budget=budget, mode=atelier.Mode.REFLECT
    )


def make_context() -> ReasonerContext:
    # The judge's score drives this graph's routing, so image scoring in the nodes is redundant.
    settings = atelier.GraphSettings(score_images=False)
    return atelier.shapeworld_context("reflect", settings=settings)


def make_tasks(prompts: list[str], seed: int = 0) -> list[atelier.Task]:
    return [atelier.Task(prompt=p, seed=seed + i) for i, p in enumerate(prompts)]


async def run(prompts: list[str], seed: int = 0) -> list[atelier.TrajectoryResult]:
    """Run without recording (the results keep their steps)."""
    runner = atelier.Runner(make_context(), build_graph(), state_factory=initial_state)
    return await runner.run(make_tasks(prompts, seed))


async def record(store: atelier.TrajectoryStore, prompts: list[str], seed: int = 0):
    """Run and record every step in ``store``; returns an :class:`atelier.RolloutResult`."""
    return await atelier.rollout(
        store,
        make_tasks(prompts, seed),
        graph=build_graph(),
        state_factory=initial_state,
        context=make_context(),
        name="reflect-with-judge",
        keep_steps=True,
    )


async def resume(store: atelier.TrajectoryStore, run: str):
    """Finish a recorded run that was interrupted (``run``: its id, an id prefix or its name):
    the same graph and context, given again."""
    run_id = store.resolve_run(run).id
    return await atelier.resume_run(store, run_id, graph=build_graph(), context=make_context())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="*", default=["four blue squares"])
    parser.add_argument("--db", help="record into this SQLite file (or SQLAlchemy URL)")
    parser.add_argument("--resume", metavar="RUN", help="finish this recorded run (with --db)")
    args = parser.parse_args()
    if args.resume and not args.db:
        parser.error("--resume needs --db")
    if args.db is None:
        results = asyncio.run(run(args.prompts))
    else:
        url = args.db if "://" in args.db else f"sqlite:///{args.db}"
        store = atelier.TrajectoryStore(url)
        work = resume(store, args.resume) if args.resume else record(store, args.prompts)
        try:
            outcome = asyncio.run(work)
        except (KeyError, ValueError) as exc:  # an unknown run, a run of another graph
            message = exc.args[0] if exc.args else exc
            raise SystemExit(f"reflect_with_judge: error: {message}") from None
        results = outcome.results
        done = "resumed" if args.resume else "recorded"
        print(f"run {outcome.run_id}: {len(results)} trajectories {done} in {store.url}")
    for result in results:
        atelier.print_trajectory(result)


if __name__ == "__main__":
    main()
