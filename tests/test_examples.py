"""The examples run, and do what they say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def test_reflect_loop_with_custom_judge_node():
    example = load("reflect_with_judge")
    from nodes.backends.shapeworld import fixed_prompt_set

    prompts = [item.text for item in fixed_prompt_set(4, seed=3)]
    results = await example.run(prompts)
    assert all(r.status == "succeeded" for r in results)
    edited = 0
    for result in results:
        state = result.state
        nodes = [step.node for step in result.steps]
        # The user's node is recorded like the built-in ones, once per image.
        assert nodes.count("judge") == len(state.images) == len(state.judge_scores)
        assert nodes[0] == "draw" and nodes[-1] == "stop" and "plan" not in nodes
        # The loop stops at the first passing score and never edits a passing image.
        scores = state.judge_scores
        assert all(s < example.PASS_SCORE for s in scores[:-1])
        if scores[-1] < example.PASS_SCORE:
            assert state.rounds == state.budget.max_rounds or nodes[-2] == "reflect"
        # The judge node and the stop node's judge agree on the final image.
        assert scores[-1] == state.judgement.score
        edited += len(state.images) > 1
    assert edited > 0  # the sample includes prompts the first draw got wrong
