"""freeze_startup_heap: start-up objects leave the collector's view; later garbage is still
collected; the commands that run graphs freeze before they run."""

from __future__ import annotations

import gc
import weakref

import pytest

from agent_graph.heap import freeze_startup_heap
from atelier.cli import main


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_objects_alive_before_are_frozen_and_later_cycles_still_collected(unfrozen):
    before = cycle()  # cyclic garbage at freeze time: collected first, not frozen forever
    kept = Node()
    pinned_a, pinned_b = Node(), Node()  # a cycle alive at freeze time, dropped afterwards
    pinned_a.other, pinned_b.other = pinned_b, pinned_a
    pinned = weakref.ref(pinned_a)
    frozen = freeze_startup_heap()
    assert before() is None
    # Behaviour, not exact counts: the count moves as frozen objects die or threads allocate.
    assert frozen > 0 and gc.get_freeze_count() > 0
    assert all(obj is not kept for obj in gc.get_objects())  # out of every generation
    del pinned_a, pinned_b
    gc.collect()
    assert pinned() is not None  # frozen: full collections skip it
    after = cycle()
    assert after() is not None
    gc.collect()
    assert after() is None  # made after the freeze: collected as usual
    gc.unfreeze()
    gc.collect()
    assert pinned() is None  # back in the collector's view, it is garbage again


def test_atelier_rollout_freezes_the_heap_before_running(unfrozen, tmp_path, capsys):
    assert gc.get_freeze_count() == 0
    db = f"sqlite:///{tmp_path / 'a.db'}"
    args = ["rollout", "--per-category", "1", "-G", "1", "--mode", "direct", "--db", db]
    assert main(args) == 0
    assert "succeeded" in capsys.readouterr().out
    assert gc.get_freeze_count() > 10_000
