"""Trajectory ids are UUID7: valid RFC 9562 UUIDs whose leading bits are the creation time."""

from __future__ import annotations

import time
import uuid

import agent_graph.ids as ids
from agent_graph.ids import time_ordered_id


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
