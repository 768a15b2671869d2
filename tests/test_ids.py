"""Trajectory ids are UUID7: valid RFC 9562 UUIDs whose leading bits are the creation time."""

from __future__ import annotations

import time
import uuid

import pytest

import agent_graph.ids as ids
from agent_graph.ids import short_id, time_ordered_id


def test_ids_are_version_7_uuids_with_the_rfc_variant():
    for _ in range(200):
        text = time_ordered_id()
        assert len(text) == 32 and text == text.lower()
        parsed = uuid.UUID(text)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122


def test_the_leading_48_bits_are_the_unix_milliseconds(monkeypatch):
    instant_ns = 1_795_000_000_123_456_789  # 2026-11-18, an arbitrary fixed clock
    monkeypatch.setattr(ids.time, "time_ns", lambda: instant_ns)
    parsed = uuid.UUID(time_ordered_id())
    assert parsed.int >> 80 == instant_ns // 1_000_000


def test_ids_made_later_sort_later_and_never_repeat():
    earlier = [time_ordered_id() for _ in range(2000)]
    time.sleep(0.003)
    later = [time_ordered_id() for _ in range(2000)]
    assert max(earlier) < min(later)
    assert len(set(earlier + later)) == 4000


def test_the_random_tail_differs_within_one_millisecond(monkeypatch):
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_795_000_000_000_000_000)
    tails = {uuid.UUID(time_ordered_id()).int & ((1 << 80) - 1) for _ in range(1000)}
    assert len(tails) == 1000


def test_short_ids_are_the_random_tail_of_uuid7_and_the_head_of_others():
    made_together = [time_ordered_id() for _ in range(500)]
    shorts = {short_id(i) for i in made_together}
    assert len(shorts) == 500  # the heads are timestamps: only the tails tell them apart
    assert all(i.endswith(short_id(i)) and len(short_id(i)) == 12 for i in made_together)
    old = uuid.uuid4().hex
    assert short_id(old) == old[:12]
    assert short_id("my-own-id") == "my-own-id"


def test_the_store_resolves_a_unique_prefix_or_suffix(store):
    from nodes.state import ReasonerState, Task
    from storage.recorder import SQLRecorder
    from storage.store import TrajectoryNotFound

    ids = [time_ordered_id() for _ in range(3)]

    async def record() -> None:
        async with SQLRecorder(store, "r") as recorder:
            for tid in ids:
                await recorder.start_trajectory(
                    ReasonerState(trajectory_id=tid, task=Task(prompt="p", group_id="g"))
                )

    import asyncio

    asyncio.run(record())
    for tid in ids:
        assert store.resolve_trajectory(tid) == tid
        assert store.resolve_trajectory(short_id(tid)) == tid
    shared_head = ids[0][:8]  # the same second: a prefix every id has
    with pytest.raises(TrajectoryNotFound, match="ambiguous"):
        store.resolve_trajectory(shared_head)
    with pytest.raises(TrajectoryNotFound, match="no trajectory"):
        store.resolve_trajectory("f" * 40)
