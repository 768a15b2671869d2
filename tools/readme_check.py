"""Run every ```bash and ```python block of README.md, in order, as a reader would.

Run it from the root of a fresh clone after `make install-dev` (it takes several minutes: the
blocks run the demo, train, start the model servers):

    .venv/bin/python tools/readme_check.py README.md [--skip 'make demo']

Each bash block runs as one script (`bash -e`) with `.venv/bin` first on PATH; servers it starts
in the background keep running for the later blocks and are stopped at the end. Each python
block runs on its own with the venv's python (README's python blocks are self-contained).
Prints one line per block (status, seconds, first line) and exits 1 if any block failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    language: str
    line: int
    text: str


def code_blocks(markdown: str, languages: tuple[str, ...] = ("bash", "python")) -> list[Block]:
    """The fenced blocks in the given languages, with the line each starts on."""
    blocks, language, start, body = [], None, 0, []
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = _FENCE.match(line)
        if language is None and fence:
            language, start, body = fence.group(1), number, []
        elif language is not None and line.strip() == "```":
            if language in languages:
                blocks.append(Block(language, start, "\n".join(body) + "\n"))
            language = None
        elif language is not None:
            body.append(line)
    return blocks


def run_block(block: Block, env: dict[str, str], sessions: list[int], timeout_s: float) -> int:
    if block.language == "bash":
        command = ["bash", "-e", "-c", block.text]
    else:
        # absolute(), not resolve(): resolving the venv's python symlink leaves the venv
        command = [str(Path(".venv/bin/python").absolute()), "-c", block.text]
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    sessions.append(proc.pid)  # its background children (servers) share this session
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return 124


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readme", type=Path)
    parser.add_argument(
        "--skip", action="append", default=[], help="skip blocks containing this text"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per block")
    args = parser.parse_args(argv)
    env = {**os.environ, "PATH": f"{Path('.venv/bin').absolute()}:{os.environ['PATH']}"}
    sessions: list[int] = []
    failed = 0
    try:
        for block in code_blocks(args.readme.read_text()):
            first = block.text.strip().splitlines()[0][:70]
            if any(text in block.text for text in args.skip):
                print(f"skip  line {block.line:4d}: {first}", flush=True)
                continue
            started = time.monotonic()
            code = run_block(block, env, sessions, args.timeout)
            took = time.monotonic() - started
            failed += code != 0
            status = "ok  " if code == 0 else f"FAIL {code}"
            print(f"{status} line {block.line:4d} ({took:5.1f} s): {first}", flush=True)
    finally:
        for session in sessions:  # servers started in the background by a block
            with contextlib.suppress(ProcessLookupError):
                os.killpg(session, signal.SIGTERM)
    print(f"{failed} block(s) failed" if failed else "every block ran")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
