"""Keep CPython's cyclic garbage collector off the objects a long run never frees.

A full (generation 2) collection walks every tracked object in the process: after importing
LangGraph, pydantic, SQLAlchemy (and torch, for in-process models) that is hundreds of
thousands of module, class and function objects, ~50-90 ms per full collection on this machine.
A rollout allocates fast enough to trigger one every second or so, and recording a run
promotes more short-lived objects (steps waiting for their commit), so it triggers more of
them: without this, they were ~45 µs of each recorded step's cost (``benchmarks/overhead.py``).

``gc.freeze()`` moves everything alive now into a permanent generation that collections skip;
objects made later are collected as usual. It is what long-running CPython services do after
start-up. The price: a frozen object that later becomes cyclic garbage is never reclaimed, so
call this once, after start-up and before the long run, not in a loop. The ``atelier``
commands that run graphs call it; a program embedding Atelier decides for itself.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze every object alive; returns how many are frozen in all."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
