"""Time-ordered identifiers for trajectories (UUID version 7, RFC 9562).

Trajectory ids are primary-key prefixes of the store's hot tables (steps, generations, step
images). Random ids (UUID4) scatter the steps of the trajectories in flight over the whole
B-tree, so every group commit rewrites one index page per trajectory; ids that start with the
creation time keep the trajectories in flight next to each other at the end of the tree, and a
commit touches a handful of pages. The rest of the id is random: ids stay unguessable enough to
be unique across processes and machines.

The leading 12 hex digits are the creation millisecond, shared by the trajectories of a batch,
so a short form of an id is its *tail* (:func:`short_id`); the store resolves a unique prefix or
suffix (``TrajectoryStore.resolve_trajectory``).
"""

from __future__ import annotations

import os
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0b10 << 62


def time_ordered_id() -> str:
    """A UUID7 as 32 hex digits (the same shape as ``uuid.uuid4().hex``): 48 bits of Unix
    milliseconds, then 74 random bits; ids made later sort later (within a millisecond the
    order is random)."""
    millis = time.time_ns() // 1_000_000
    random = int.from_bytes(os.urandom(10), "big")
    rand_a = random >> 68  # 12 bits
    rand_b = random & ((1 << 62) - 1)
    value = (millis & ((1 << 48) - 1)) << 80 | _VERSION_7 | rand_a << 64 | _VARIANT_RFC | rand_b
    return uuid.UUID(int=value).hex


SHORT_ID_LENGTH = 12


def short_id(identifier: str) -> str:
    """What the CLI shows of an id: the random tail of a UUID7 (its head is a timestamp that
    ids made together share), the head of any other id (UUID4 ids of older stores, users' own)."""
    if _is_uuid7_hex(identifier):
        return identifier[-SHORT_ID_LENGTH:]
    return identifier[:SHORT_ID_LENGTH]


def _is_uuid7_hex(identifier: str) -> bool:
    return (
        len(identifier) == 32
        and identifier[12] == "7"
        and identifier[16] in "89ab"
        and all(c in "0123456789abcdef" for c in identifier)
    )
