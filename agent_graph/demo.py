"""The ShapeWorld demo: a fixed, seeded prompt set run in every mode, summarised per category."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent_graph.deploy import Ref, deploy, resolve
from agent_graph.presets import shapeworld_tasks
from agent_graph.rollout import rollout
from agent_graph.runner import Runner, TrajectoryResult
from nodes.state import Budget
from storage.images import MemoryImageStore

DEMO_MODES: tuple[str, ...] = ("direct", "reflect", "decompose", "auto")


@dataclass(frozen=True)
class Cell:
    """One (category, mode) cell of the demo table."""

    n: int
    accuracy: float
    """Share of trajectories whose final image the checker judged fully correct."""
    mean_score: float
    """Mean checker score V in [0, 1]."""
    mean_images: float
    failed: int


@dataclass
class DemoReport:
    categories: list[str]
    modes: list[str]
    cells: dict[tuple[str, str], Cell]
    """Keyed by (category, mode); category ``"all"`` is the whole prompt set."""
    mode_mix: dict[str, dict[str, int]]
    """For each requested mode, how many trajectories ran in each actual mode (auto varies)."""

    def cell(self, category: str, mode: str) -> Cell:
        return self.cells[(category, mode)]


def summarise(results: Sequence[TrajectoryResult]) -> Cell:
    n = len(results)
    if n == 0:
        return Cell(0, 0.0, 0.0, 0.0, 0)
    return Cell(
        n=n,
        accuracy=sum(r.correct for r in results) / n,
        mean_score=sum(r.score or 0.0 for r in results) / n,
        mean_images=sum(r.image_count for r in results) / n,
        failed=sum(r.status == "failed" for r in results),
    )


async def run_demo(
    per_category: int = 24,
    seed: int = 0,
    modes: Sequence[str] = DEMO_MODES,
    *,
    concurrency: int = 64,
    budget: Budget | None = None,
    progress: bool = False,
    store: Any = None,
    router: Ref | None = None,
    stop: Ref | None = None,
) -> DemoReport:
    """Run the fixed prompt set in each mode; with a ``store``, each mode is a recorded run
    named ``demo-<mode>``. ``router``: a trained router version, run as one more column named
    by its version (``router@3``; run ``demo-router@3``); ``stop``: a trained stop policy
    version every column stops with (``name@version`` needs ``store``)."""
    tasks = shapeworld_tasks(per_category, 1, seed)
    categories = list(dict.fromkeys(task.category or "?" for task in tasks))
    cells: dict[tuple[str, str], Cell] = {}
    mode_mix: dict[str, dict[str, int]] = {}
    router = resolve(router, "router", store)
    stop = resolve(stop, "stop", store)
    modes = [*modes, router.label] if router is not None else list(modes)
    for mode in modes:
        chosen = {"router": router} if router is not None and mode == router.label else {}
        chosen = chosen or {"mode": mode}
        if store is None:
            deployment = await deploy(None, stop=stop, **chosen)
            runner = Runner(
                deployment.context(MemoryImageStore()),
                concurrency=concurrency,
                budget=budget,
                keep_steps=False,
            )
            results = await runner.run(tasks, progress=progress, description=f"demo · {mode}")
        else:
            results = (
                await rollout(
                    store,
                    tasks,
                    stop=stop,
                    budget=budget,
                    name=f"demo-{mode}",
                    concurrency=concurrency,
                    progress=progress,
                    **chosen,
                )
            ).results
        by_category: dict[str, list[TrajectoryResult]] = defaultdict(list)
        for result in results:
            by_category[result.task.category or "?"].append(result)
        for category in categories:
            cells[(category, mode)] = summarise(by_category[category])
        cells[("all", mode)] = summarise(results)
        mix: dict[str, int] = defaultdict(int)
        for result in results:
            mix[result.mode or "none"] += 1
        mode_mix[mode] = dict(mix)
    return DemoReport(categories, list(modes), cells, mode_mix)


def render_report(report: DemoReport) -> object:
    """A rich Table: accuracy and mean images per mode, one row per category."""
    from rich.table import Table

    table = Table(title="ShapeWorld demo — accuracy (mean images) per mode")
    table.add_column("category")
    table.add_column("n", justify="right")
    for mode in report.modes:
        table.add_column(mode, justify="right")
    for category in [*report.categories, "all"]:
        cells = [report.cell(category, mode) for mode in report.modes]
        best = max(c.accuracy for c in cells)
        row = [category if category != "all" else "[bold]all[/bold]", str(cells[0].n)]
        for c in cells:
            text = f"{c.accuracy:.2f} ({c.mean_images:.2f})"
            row.append(f"[bold green]{text}[/bold green]" if c.accuracy == best else text)
        table.add_row(*row, end_section=category == report.categories[-1])
    return table


def report_markdown(report: DemoReport) -> str:
    header = "| category | n | " + " | ".join(report.modes) + " |"
    lines = [header, "|" + "---|" * (2 + len(report.modes))]
    for category in [*report.categories, "all"]:
        cells = [report.cell(category, mode) for mode in report.modes]
        values = " | ".join(f"{c.accuracy:.2f} ({c.mean_images:.2f})" for c in cells)
        lines.append(f"| {category} | {cells[0].n} | {values} |")
    return "\n".join(lines)
