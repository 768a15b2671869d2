"""A store filled the way users fill one, fast: the trace UI's tests (and the analysis tests) read
it.

:func:`build_ui_store` records, on ShapeWorld,

- a demo-like run per mode (``demo-direct``, ``demo-reflect``, ``demo-decompose``,
  ``demo-auto``), one prompt of every category each; ``demo-reflect`` also holds the hostile
  prompt :data:`XSS_PROMPT` (no category);
- the on-policy router GRPO of ``atelier train --world shapeworld`` (the library, not the CLI):
  2 iterations of groups of 4, runs ``grpo-0`` and ``grpo-1``, each version saved under
  ``save_dir`` and registered; so the rewards (``checker``, ``format``, ``composite``,
  ``penalised``, ``advantage``) and the versions' metadata are stored;
- ``tiny-lm-reflect``: reflect-mode trajectories whose planner and reflector are a real (tiny,
  random-weight) transformers LM in this process, so their generations hold real token ids and
  log-probs, and its tokenizer folder (:attr:`UIStoreIds.tokenizer_dir`) decodes them.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path

XSS_PROMPT = '<script>alert(1)</script> <b>two red circles</b> & "quotes"'
"""A prompt a page must show as text, never as markup."""

DEMO_MODES = ("direct", "reflect", "decompose", "auto")

STEP_WORDS = ("wanted", "remove")
"""Preferred :attr:`UIStoreIds.step_word`: ShapeWorld's reflections say "... where three blue
stars are wanted" and "Remove ..."; no prompt does, and neither is a word a page's own chrome
is likely to show."""


@dataclass(frozen=True)
class UIStoreIds:
    demo_runs: dict[str, str]
    """Mode -> the id of its run ``demo-<mode>``."""
    trained_runs: list[str]
    """The ids of ``grpo-0`` and ``grpo-1``, in order."""
    trained_run: str
    """The run of :attr:`trained_group` (one of :attr:`trained_runs`)."""
    trained_group: str
    """A group of ``trained_run`` whose members hold stored advantages."""
    xss_trajectory: str
    """The trajectory of :data:`XSS_PROMPT` (in ``demo-reflect``)."""
    step_word: str
    """A word in some reflection's step text and in no prompt (for text search)."""
    versions: list[str]
    """The router versions trained, ``name@version`` in order."""
    model_run: str | None
    """``tiny-lm-reflect``: plans and reflections sampled from a tiny transformers LM (None
    when built ``with_model=False``)."""
    tokenizer_dir: Path | None
    """That LM's folder (its tokenizer decodes the stored token ids)."""

    @property
    def run_ids(self) -> list[str]:
        model = [self.model_run] if self.model_run else []
        return [*self.demo_runs.values(), *self.trained_runs, *model]


def build_ui_store(url: str, save_dir: Path, *, with_model: bool = True) -> UIStoreIds:
    """Fill the store at ``url`` (new or empty) as the module docstring says; policy versions
    go under ``save_dir``. Takes a few seconds."""
    from storage.store import TrajectoryStore

    store = TrajectoryStore(url)
    try:
        demo_runs, xss = asyncio.run(_demo(store))
        trained_runs, versions = asyncio.run(_train(store, save_dir))
        trained_run, group = _advantage_group(store, trained_runs)
        word = _step_word(store, [*demo_runs.values(), *trained_runs])
        lm_dir = save_dir / "tiny-lm" if with_model else None
        model_run = asyncio.run(_model_run(store, lm_dir)) if lm_dir else None
    finally:
        store.close()
    return UIStoreIds(
        demo_runs, trained_runs, trained_run, group, xss, word, versions, model_run, lm_dir
    )


async def _model_run(store, lm_dir: Path) -> str:
    """Reflect-mode trajectories on ShapeWorld whose planner and reflector are a tiny
    random-weight LM (the plan always runs; a reflection only where the image is judged)."""
    from dataclasses import replace

    from agent_graph.presets import shapeworld_context
    from agent_graph.rollout import rollout
    from nodes.backends.base import SamplingParams
    from nodes.backends.engines.lm_inprocess import InProcessChatModel
    from nodes.backends.engines.tiny_models import build_lm
    from nodes.context import GraphSettings
    from nodes.state import Budget, Task

    lm_dir.mkdir(parents=True, exist_ok=True)
    build_lm(lm_dir)
    chat = InProcessChatModel.from_pretrained(lm_dir, name="tiny-lm")
    try:
        context = shapeworld_context(
            "reflect", settings=GraphSettings(sampling=SamplingParams(max_tokens=12))
        )
        context = replace(context, backends=replace(context.backends, planner=chat, reflector=chat))
        tasks = [
            Task(prompt="two red circles", group_id="tiny-0", seed=3),
            Task(prompt="a blue square", group_id="tiny-1", seed=4),
        ]
        outcome = await rollout(
            store, tasks, context=context, budget=Budget(max_rounds=1), name="tiny-lm-reflect"
        )
    finally:
        chat.service.close()
    return outcome.run_id


async def _demo(store) -> tuple[dict[str, str], str]:
    from agent_graph.presets import shapeworld_tasks
    from agent_graph.rollout import rollout
    from nodes.state import Budget, Task

    runs = {}
    xss = ""
    for mode in DEMO_MODES:
        tasks = shapeworld_tasks(1, 1, seed=11)
        if mode == "reflect":
            tasks.append(Task(prompt=XSS_PROMPT, group_id="xss", seed=5))
        outcome = await rollout(
            store, tasks, mode=mode, budget=Budget(max_rounds=2), name=f"demo-{mode}"
        )
        runs[mode] = outcome.run_id
        if mode == "reflect":
            (xss,) = [t.id for t in store.trajectories(run=outcome.run_id, group="xss")]
    return runs, xss


async def _train(store, save_dir: Path) -> tuple[list[str], list[str]]:
    from agent_graph.runner import make_group_tasks
    from nodes.backends.shapeworld import fixed_prompt_set
    from nodes.state import Budget
    from policies.mode import LearnedModePolicy
    from policies.simple import UniformModePolicy
    from training.decisions.loop import grpo_iterations
    from training.decisions.trainer import GRPOConfig, GRPOTrainer

    batches = []
    for iteration in range(2):
        items = fixed_prompt_set(1, seed=iteration)
        prompts, categories = [i.text for i in items], [i.category for i in items]
        batches.append(make_group_tasks(prompts, 4, seed=iteration, categories=categories))
    trainer = GRPOTrainer(LearnedModePolicy(seed=0), GRPOConfig(seed=0))
    _, log = await grpo_iterations(
        store,
        trainer,
        batches,
        kind="mode",
        first_behaviour=UniformModePolicy(),
        budget=Budget(max_rounds=2),
        save_dir=save_dir,
    )
    return [it.run_id for it in log], [it.trained for it in log]


def _advantage_group(store, runs: list[str]) -> tuple[str, str]:
    """(run, group) of the first trained group whose advantages are not all 0."""
    advantages: dict[str, list[float]] = {}
    for reward in store.rewards(name="advantage"):
        advantages.setdefault(reward.trajectory_id, []).append(reward.value)
    for run_id in runs:
        for group_id, members in store.groups(run=run_id).items():
            values = [advantages.get(m.id, [0.0])[-1] for m in members]
            if all(m.id in advantages for m in members) and any(values):
                return run_id, group_id
    raise AssertionError("no trained group with a learning signal: change the seeds")


def _step_word(store, runs: list[str]) -> str:
    """A word of some reflection's text that no prompt contains (case-insensitive)."""
    in_prompts: set[str] = set()
    counts: dict[str, int] = {}
    ids = [t.id for run_id in runs for t in store.trajectories(run=run_id)]
    for t in store.trajectories():
        in_prompts.update(_words(t.prompt))
    for steps in store.steps_many(ids).values():
        words = {w for s in steps if s.node == "reflect" and s.text for w in _words(s.text)}
        for word in words:
            counts[word] = counts.get(word, 0) + 1
    candidates = sorted(
        (w for w in counts if w not in in_prompts and len(w) >= 5 and 0 < counts[w] < len(ids)),
        key=lambda w: (w not in STEP_WORDS, -counts[w], w),
    )
    if not candidates:
        raise AssertionError("no reflection word outside the prompts: change the seeds")
    return candidates[0]


def _words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z]+", text)}
