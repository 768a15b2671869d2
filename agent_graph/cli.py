"""The ``atelier`` command line.

Only argparse is imported at start-up: each command imports what it needs when it runs, so
``atelier --help`` answers without loading LangGraph, torch or a model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

MODES = ("auto", "direct", "reflect", "decompose", "random")


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CliError as exc:
        print(f"atelier: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atelier: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atelier",
        description="Adaptive image generation by reasoning: plan, draw, reflect, refine, "
        "decompose — recorded, and retrainable from its own trajectories.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run one prompt and print its trajectory")
    run.add_argument("prompt", help='what to draw, e.g. "three red circles above a blue square"')
    run.add_argument(
        "--mode",
        choices=MODES,
        default="auto",
        help="auto = rule-based router; random = uniform router (default: auto)",
    )
    run.add_argument("--out", type=Path, help="save the final image here (.png)")
    run.add_argument("--seed", type=int, default=0, help="trajectory seed (default: 0)")
    run.add_argument(
        "--max-rounds",
        type=int,
        default=4,
        help="most reflect→refine correction rounds (default: 4)",
    )
    run.set_defaults(handler=cmd_run)

    demo = commands.add_parser(
        "demo", help="run a fixed, seeded ShapeWorld prompt set in every mode; print a table"
    )
    demo.add_argument(
        "--per-category",
        type=int,
        default=24,
        help="prompts per category (default: 24; 9 categories)",
    )
    demo.add_argument("--seed", type=int, default=0, help="prompt-set seed (default: 0)")
    demo.add_argument(
        "--concurrency", type=int, default=64, help="trajectories in flight (default: 64)"
    )
    demo.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    demo.set_defaults(handler=cmd_demo)

    graph = commands.add_parser("graph", help="print the reasoner graph as Mermaid")
    graph.set_defaults(handler=cmd_graph)
    return parser


def _check_output_path(path: Path) -> None:
    if path.suffix.lower() != ".png":
        raise CliError(f"--out must end in .png: {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CliError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CliError(f"cannot write {path}: permission denied")


def cmd_run(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise CliError("the prompt is empty")
    if args.max_rounds < 0:
        raise CliError("--max-rounds must be 0 or more")
    if args.out is not None:
        _check_output_path(args.out)

    from pydantic import ValidationError

    from agent_graph.presets import shapeworld_context
    from agent_graph.runner import Runner
    from agent_graph.state import Budget, Task

    try:
        task = Task(prompt=args.prompt, seed=args.seed)
        budget = Budget(max_rounds=args.max_rounds)
    except ValidationError as exc:
        raise CliError(exc.errors()[0]["msg"]) from None
    context = shapeworld_context(args.mode)
    result = asyncio.run(Runner(context, budget=budget).run_one(task))

    from agent_graph.show import print_trajectory

    print_trajectory(result)
    if result.status != "succeeded":
        return 1
    if args.out is not None and result.state and result.state.final_image:
        context.images.get(result.state.final_image).save(args.out)
        print(f"saved {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.per_category < 1:
        raise CliError("--per-category must be at least 1")
    if args.concurrency < 1:
        raise CliError("--concurrency must be at least 1")
    from rich.console import Console

    from agent_graph.demo import render_report, report_markdown, run_demo

    console = Console()
    report = asyncio.run(
        run_demo(
            args.per_category, args.seed, concurrency=args.concurrency, progress=console.is_terminal
        )
    )
    console.print(render_report(report))
    mix = ", ".join(f"{mode} {count}" for mode, count in sorted(report.mode_mix["auto"].items()))
    console.print(f"auto (rule-based router) chose: {mix}")
    if args.markdown:
        args.markdown.write_text(report_markdown(report) + "\n")
        console.print(f"wrote {args.markdown}")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from agent_graph.graph import build_reasoner

    print(build_reasoner().get_graph().draw_mermaid())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
