"""Readable terminal rendering of one trajectory (used by ``atelier run``)."""

from __future__ import annotations

from typing import Any

from agent_graph.ids import short_id
from agent_graph.recording import StepRecord
from agent_graph.runner import TrajectoryResult


def _short(text: Any, limit: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_step(step: StepRecord) -> str:
    """One line saying what a step did, read from its recorded update (works for any node)."""
    update = step.update
    if step.error:
        return f"[red]failed[/red]: {_short(step.error)}"
    parts: list[str] = []
    for decision in update.get("decisions", []):
        parts.append(
            f"{decision['kind']} → [bold]{decision['action']}[/bold] "
            f"(log p {decision['log_prob']:.2f}, {decision['policy']})"
        )
    if "blueprint" in update:
        parts.append(f"blueprint: {_short(update['blueprint'], 80)}")
    if "subtasks" in update:
        steps = "; ".join(s["instruction"] for s in update["subtasks"])
        flag = "" if update.get("subtasks_well_formed") else " [yellow](malformed)[/yellow]"
        parts.append(f"{len(update['subtasks'])} sub-tasks{flag}: {_short(steps, 90)}")
    for image in update.get("images", []):
        score = "" if image["score"] is None else f"  V={image['score']:.2f}"
        parts.append(f"image {image['ref'][:10]} ← {_short(image['instruction'], 70)}{score}")
    for reflection in update.get("reflections", []):
        flag = "" if reflection["well_formed"] else " [yellow](malformed)[/yellow]"
        parts.append(f"reflection{flag}: {_short(reflection['text'], 120)}")
    if "stop_reason" in update:
        parts.append(f"stop: {update['stop_reason']}")
    if update.get("judgement"):
        judgement = update["judgement"]
        parts.append(f"final V={judgement['score']:.2f} correct={judgement['correct']}")
    other = sorted(set(update) - _KNOWN)
    if other and not parts:
        parts.append("updated " + ", ".join(other))
    return "\n      ".join(parts) or "(no change)"


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
    console.print(f"[bold]{result.task.prompt}[/bold]")
    mode = result.mode or "?"
    console.print(
        f"trajectory {short_id(result.trajectory_id)}  mode [bold]{mode}[/bold]  "
        f"seed {result.task.seed}"
    )
    for step in result.steps:
        console.print(
            f"  {step.seq:>2} {step.node:<10} {step.latency_s * 1000:7.1f} ms  "
            f"{describe_step(step)}"
        )
    if result.status != "succeeded":
        console.print(f"[red]failed:[/red] {result.error}")
        return
    assert state is not None
    score = f"{result.score:.2f}" if result.score is not None else "n/a"
    console.print(
        f"[bold]final[/bold]: {len(state.images)} image(s), {state.rounds} correction "
        f"round(s), stop={state.stop_reason.value if state.stop_reason else '?'}, "
        f"score V={score}, correct={result.correct}"
    )


def print_stored_trajectory(trajectory: Any, console: Any = None) -> None:
    """Render a trajectory read back from the store (``atelier show``)."""
    from rich.console import Console

    console = console or Console(highlight=False)
    console.print(f"[bold]{trajectory.prompt}[/bold]")
    console.print(
        f"trajectory {trajectory.id}  run {trajectory.run_id[:12]}  group {trajectory.group_id} "
        f"#{trajectory.sample_index}  seed {trajectory.seed}"
    )
    console.print(f"mode [bold]{trajectory.mode or '?'}[/bold]  status {trajectory.status}")
    for step in trajectory.steps:
        console.print(
            f"  {step.seq:>2} {step.node:<10} {step.latency_s * 1000:7.1f} ms  "
            f"{describe_step(step)}"
        )
        for generation in step.generations:
            if generation.token_ids:
                console.print(
                    f"      [dim]{generation.role}: {len(generation.token_ids)} tokens "
                    f"from {generation.model}, sum log p {sum(generation.logprobs):.2f}[/dim]"
                )
    score = "n/a" if trajectory.score is None else f"{trajectory.score:.2f}"
    console.print(
        f"[bold]final[/bold]: {trajectory.image_count} image(s), score V={score}, "
        f"correct={trajectory.correct}"
        + (f", error: {trajectory.error}" if trajectory.error else "")
    )
    if trajectory.rewards:
        rewards = ", ".join(f"{k}={v:.3f}" for k, v in sorted(trajectory.rewards.items()))
        console.print(f"rewards: {rewards}")
