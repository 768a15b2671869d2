"""Readable terminal rendering of one trajectory (used by ``atelier run``)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from agent_graph.ids import short_id
from agent_graph.recording import StepRecord
from agent_graph.runner import TrajectoryResult


def _short(text: Any, limit: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_INDENT = "\n      "


def _text(text: Any, limit: int, full: bool) -> str:
    """A text from the trajectory (prompt, model output) as markup-safe console text: clipped to
    one line of ``limit`` characters, or whole with its line breaks kept (``--full``)."""
    if full:
        return escape(str(text).strip()).replace("\n", _INDENT + "  ")
    return escape(_short(text, limit))


def _brief(value: Any) -> str:
    """A custom field's value, short: numbers to two decimals, the last few list items."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, list):
        items = ", ".join(_brief(item) for item in value[-3:])
        return f"[{'…, ' if len(value) > 3 else ''}{items}]"
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}" if len(value) > 3 else str(value)
    return str(value)


def describe_step(step: StepRecord, *, full: bool = False) -> str:
    """What a step did, read from its recorded update (works for any node): one line per
    part, texts clipped unless ``full``. Console markup; every recorded text is escaped."""
    update = step.update
    if step.error:
        return f"[red]failed[/red]: {_text(step.error, 110, full)}"
    parts: list[str] = []
    for decision in update.get("decisions", []):
        parts.append(
            f"{escape(str(decision['kind']))} → [bold]{escape(str(decision['action']))}[/bold] "
            f"(log p {decision['log_prob']:.2f}, {escape(str(decision['policy']))})"
        )
    if "blueprint" in update:
        parts.append(f"blueprint: {_text(update['blueprint'], 80, full)}")
    if "subtasks" in update:
        parts.append(_describe_subtasks(update, full))
    for image in update.get("images", []):
        score = "" if image["score"] is None else f"  V={image['score']:.2f}"
        parts.append(f"image {image['ref'][:10]} ← {_text(image['instruction'], 70, full)}{score}")
    for reflection in update.get("reflections", []):
        flag = "" if reflection["well_formed"] else " [yellow](malformed)[/yellow]"
        parts.append(f"reflection{flag}: {_text(reflection['text'], 120, full)}")
    if "stop_reason" in update:
        parts.append(f"stop: {escape(str(update['stop_reason']))}")
    if update.get("judgement"):
        judgement = update["judgement"]
        parts.append(f"final V={judgement['score']:.2f} correct={judgement['correct']}")
    # Fields of a user's own state (a custom node's update): their values, briefly.
    for key in sorted(set(update) - _KNOWN):
        value = str(update[key]) if full else _short(_brief(update[key]), 80)
        parts.append(f"{escape(key)}: {escape(value)}")
    return _INDENT.join(parts) or "(no change)"


def _describe_subtasks(update: dict[str, Any], full: bool) -> str:
    flag = "" if update.get("subtasks_well_formed") else " [yellow](malformed)[/yellow]"
    head = f"{len(update['subtasks'])} sub-tasks{flag}"
    if not full:
        steps = "; ".join(s["instruction"] for s in update["subtasks"])
        return f"{head}: {_text(steps, 90, False)}"
    lines = [
        f"{i + 1}. {_text(s['instruction'], 0, True)}"
        + (f" (expect: {_text(s['expect'], 0, True)})" if s.get("expect") else "")
        for i, s in enumerate(update["subtasks"])
    ]
    return _INDENT.join([f"{head}:", *lines])


_KNOWN = {
    "decisions",
    "blueprint",
    "subtasks",
    "subtasks_well_formed",
    "images",
    "reflections",
    "stop_reason",
    "judgement",
    "step_count",
    "mode",
    "rounds",
    "subtasks_done",
    "final_image",
    "error",
}


def print_trajectory(result: TrajectoryResult, console: Any = None) -> None:
    from rich.console import Console

    console = console or Console(highlight=False)
    state = result.state
    console.print(f"[bold]{escape(result.task.prompt)}[/bold]")
    mode = result.mode or "?"
    console.print(
        f"trajectory {short_id(result.trajectory_id)}  mode [bold]{mode}[/bold]  "
        f"seed {result.task.seed}"
    )
    for step in result.steps:
        console.print(
            f"  {step.seq:>2} {escape(step.node):<10} {step.latency_s * 1000:7.1f} ms  "
            f"{describe_step(step)}"
        )
    if result.status != "succeeded":
        console.print(f"[red]failed:[/red] {escape(str(result.error))}")
        return
    assert state is not None
    score = f"{result.score:.2f}" if result.score is not None else "n/a"
    console.print(
        f"[bold]final[/bold]: {len(state.images)} image(s), {state.rounds} correction "
        f"round(s), stop={state.stop_reason.value if state.stop_reason else '?'}, "
        f"score V={score}, correct={result.correct}"
    )


def print_stored_trajectory(trajectory: Any, console: Any = None, *, full: bool = False) -> None:
    """Render a trajectory read back from the store (``atelier show``); ``full`` prints every
    text whole (reflections, blueprints, instructions, the models' raw generations) instead
    of one clipped line each, and never wraps lines (they stay greppable)."""
    from rich.console import Console

    console = console or Console(highlight=False, soft_wrap=full)
    console.print(f"[bold]{escape(trajectory.prompt)}[/bold]")
    console.print(
        f"trajectory {trajectory.id}  run {trajectory.run_id[:12]}  "
        f"group {escape(trajectory.group_id)} #{trajectory.sample_index}  seed {trajectory.seed}"
    )
    console.print(f"mode [bold]{trajectory.mode or '?'}[/bold]  status {trajectory.status}")
    for step in trajectory.steps:
        console.print(
            f"  {step.seq:>2} {escape(step.node):<10} {step.latency_s * 1000:7.1f} ms  "
            f"{describe_step(step, full=full)}"
        )
        shown = _texts_shown(step.update) if full else set()
        for generation in step.generations:
            _print_generation(console, generation, full and generation.text.strip() not in shown)
    score = "n/a" if trajectory.score is None else f"{trajectory.score:.2f}"
    error = f", error: {_text(trajectory.error, 200, full)}" if trajectory.error else ""
    console.print(
        f"[bold]final[/bold]: {trajectory.image_count} image(s), score V={score}, "
        f"correct={trajectory.correct}{error}"
    )
    if trajectory.rewards:
        rewards = ", ".join(f"{k}={v:.3f}" for k, v in sorted(trajectory.rewards.items()))
        console.print(f"rewards: {escape(rewards)}")


def _texts_shown(update: dict[str, Any]) -> set[str]:
    """The texts :func:`describe_step` prints whole: a model output that is one of them (a
    blueprint, a reflection) is not printed a second time as the raw generation."""
    texts = [update.get("blueprint")]
    texts += [r.get("text") for r in update.get("reflections", [])]
    return {text.strip() for text in texts if isinstance(text, str)}


def _print_generation(console: Any, generation: Any, with_text: bool) -> None:
    """A step's model call: its token count and log-prob, and its raw text if asked."""
    if generation.token_ids:
        console.print(
            f"      [dim]{escape(generation.role)}: {len(generation.token_ids)} tokens "
            f"from {escape(generation.model)}, sum log p {sum(generation.logprobs):.2f}[/dim]"
        )
    if with_text and generation.text:
        console.print(
            f"      [dim]{escape(generation.role)} said:[/dim]{_INDENT}  "
            f"{_text(generation.text, 0, True)}"
        )
