"""Fail when the installed packages differ from a lock file (requirements/*.txt).

`make demo` and `make test` install exactly the locked versions, then run this check, so a venv
that drifted (a package upgraded by hand, an old venv after the lock changed) is caught before
the tests run on versions nobody tested. Standard library only: it runs in the demo's venv too.

    python tools/check_lock.py requirements/dev.txt
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical_name(name: str) -> str:
    """PEP 503 name normalisation: `Foo_Bar.baz` and `foo-bar-baz` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(lines: Iterable[str]) -> dict[str, str]:
    """The `name==version` pins of a pip-compile output (comments and options skipped)."""
    pins: dict[str, str] = {}
    for line in lines:
        match = _PIN.match(line.strip())
        if match:
            pins[canonical_name(match.group(1))] = match.group(2)
    return pins


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def lock_mismatches(
    pins: dict[str, str], installed: Callable[[str], str | None] = installed_version
) -> list[str]:
    """One line per locked package that is missing or installed at another version."""
    problems = []
    for name, locked in sorted(pins.items()):
        have = installed(name)
        if have is None:
            problems.append(f"{name}: locked {locked}, not installed")
        elif have.lower() != locked.lower():
            problems.append(f"{name}: locked {locked}, installed {have}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python tools/check_lock.py LOCK_FILE", file=sys.stderr)
        return 2
    lock = Path(args[0])
    try:
        pins = read_lock(lock.read_text().splitlines())
    except OSError as exc:
        print(f"atelier: error: cannot read lock file {lock}: {exc.strerror}", file=sys.stderr)
        return 2
    if not pins:
        print(f"atelier: error: {lock} pins no packages", file=sys.stderr)
        return 2
    problems = lock_mismatches(pins)
    if problems:
        print(
            f"atelier: error: the installed packages differ from {lock} "
            f"({len(problems)} of {len(pins)}); run `make clean` then the make target again:",
            file=sys.stderr,
        )
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"atelier: {len(pins)} installed packages match {lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
