"""Start-up cost of the light paths: `atelier --help`, and importing ShapeWorld.

    python benchmarks/startup.py [--repeats 15]

Prints the median wall time of each command over fresh interpreter processes, beside a bare
`python -c pass` in the same run (the interpreter's own floor).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "atelier --help": [sys.executable, "-m", "atelier.cli", "--help"],
    "import nodes.backends.shapeworld": [sys.executable, "-c", "import nodes.backends.shapeworld"],
    "import agent_graph.graph (LangGraph)": [sys.executable, "-c", "import agent_graph.graph"],
}


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"| command | median s ({args.repeats} runs) |")
    print("|---|---|")
    for name, command in COMMANDS.items():
        print(f"| {name} | {median_seconds(command, args.repeats):.3f} |")


if __name__ == "__main__":
    main()
