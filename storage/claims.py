"""Trajectory claims: many rollout workers sampling one run, each trajectory held by one worker.

A run's trajectories are registered up front (``store.register_trajectories``, status
``incomplete``). A worker claims a few at a time, runs them, renews its leases while they run,
and the recorder finishes them; a worker that dies stops renewing, and once its leases pass
another worker claims the trajectories and continues each from its last recorded step::

    ids = store.claim(run_id, "host-1", n=8, lease_s=60)   # [] when nothing is free now
    held = store.renew("host-1", ids, lease_s=60)          # the ids still held
    store.release("host-1", run_id)                        # give back what is unfinished

Claiming is PostgreSQL's row locking, not a protocol of our own: one transaction selects free
rows ``FOR UPDATE SKIP LOCKED`` (rows another claimer is taking are skipped, not waited for)
and marks them with the worker and its lease. On SQLite every write transaction is ``BEGIN
IMMEDIATE`` (:mod:`storage.engine`): one writer at a time, so select-then-update is atomic there
without row locks (one machine only: a SQLite file is not shared across machines).

Exactly once: a worker whose lease passed may still be alive (paused, partitioned). Its
recorder is fenced (``SQLRecorder(claimant=...)``): each batch locks the rows of the
trajectories it writes and drops the records of those the worker no longer holds, whose callers
get :class:`ClaimLost` — so the stale worker can neither add a step after another worker took
the trajectory over nor finish it a second time. A step's ``(trajectory_id, seq)`` primary key
backs this up.

Lease times are the database server's clock on PostgreSQL (workers on several machines need not
agree on the time), this machine's on SQLite.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update

from storage.rows import now
from storage.schema import RunRow, TrajectoryRow

UNFINISHED = ("incomplete", "running")
"""Statuses a claim may hold: registered or started, not finished."""

_CHUNK = 500


class ClaimLost(RuntimeError):
    """This worker no longer holds the trajectory (its lease passed and another worker took it,
    or it was released): nothing of it was written. The trajectory is the other worker's now."""


@dataclass(frozen=True)
class ClaimCounts:
    """Where a run's sampling stands, for a worker deciding whether to wait."""

    unfinished: int
    """Trajectories not finished that a worker may yet claim (now, or once a lease passes)."""
    free: int
    """Of those, claimable now."""
    leased: int
    """Of those, held by a live lease (some worker is on them)."""


def _clock(conn: Connection) -> Any:
    """Now, as the claims compare it: the server's ``now()`` on PostgreSQL (the transaction's
    start), this machine's time elsewhere."""
    return func.now() if conn.dialect.name == "postgresql" else now()


def _claimable(conn: Connection) -> Any:
    """A trajectory a worker may claim now: registered and never claimed or released
    (``incomplete``, no lease), or claimed under a lease that has passed (its worker is
    presumed dead; ``running`` or not). A ``running`` trajectory without a lease belongs to a
    single-process ``rollout`` or ``resume``: never taken."""
    expired = and_(TrajectoryRow.lease_until.is_not(None), TrajectoryRow.lease_until < _clock(conn))
    return and_(
        TrajectoryRow.status.in_(UNFINISHED),
        or_(
            and_(TrajectoryRow.status == "incomplete", TrajectoryRow.lease_until.is_(None)), expired
        ),
    )


def _until(conn: Connection, lease_s: float) -> Any:
    return _clock(conn) + timedelta(seconds=lease_s)


def claim(conn: Connection, run_id: str, worker: str, n: int, lease_s: float) -> list[str]:
    """Claim up to ``n`` claimable trajectories of ``run_id`` for ``worker`` (oldest ids first,
    i.e. registration order) under a lease of ``lease_s`` seconds; their ids. Each comes back
    ``incomplete`` (a stale ``running`` one too), ready for the recorder to start again."""
    if n < 1 or lease_s <= 0:
        raise ValueError("claim needs n >= 1 and lease_s > 0")
    free = (
        select(TrajectoryRow.id)
        .where(TrajectoryRow.run_id == run_id, _claimable(conn))
        .order_by(TrajectoryRow.id)
        .limit(n)
        .with_for_update(skip_locked=True)
    )
    ids = list(conn.scalars(free))
    if ids:
        conn.execute(
            update(TrajectoryRow)
            .where(TrajectoryRow.id.in_(ids))
            .values(claimed_by=worker, lease_until=_until(conn, lease_s), status="incomplete")
        )
    return ids


def held(conn: Connection, worker: str, ids: Iterable[str]) -> set[str]:
    """Of ``ids``, those ``worker`` holds (claimed and unfinished), their rows locked until the
    transaction ends (in id order: concurrent lockers never deadlock), so no claim can take
    them meanwhile. Whether the lease has passed does not matter: until another worker claims
    the trajectory, nobody else writes it."""
    wanted = sorted(set(ids))
    found: set[str] = set()
    for start in range(0, len(wanted), _CHUNK):
        query = (
            select(TrajectoryRow.id)
            .where(
                TrajectoryRow.id.in_(wanted[start : start + _CHUNK]),
                TrajectoryRow.claimed_by == worker,
                TrajectoryRow.status.in_(UNFINISHED),
            )
            .order_by(TrajectoryRow.id)
            .with_for_update()
        )
        found.update(conn.scalars(query))
    return found


def renew(conn: Connection, worker: str, ids: Sequence[str], lease_s: float) -> list[str]:
    """Extend ``worker``'s leases on ``ids`` by ``lease_s`` from now. The ids that are still
    this worker's: held (lease extended) or finished by it; the others were taken over by
    another worker (or released): stop working on them."""
    kept = sorted(held(conn, worker, ids))
    for start in range(0, len(kept), _CHUNK):
        conn.execute(
            update(TrajectoryRow)
            .where(TrajectoryRow.id.in_(kept[start : start + _CHUNK]))
            .values(lease_until=_until(conn, lease_s))
        )
    rest = sorted(set(ids) - set(kept))
    for start in range(0, len(rest), _CHUNK):  # finished by this worker meanwhile: still ours
        kept += conn.scalars(
            select(TrajectoryRow.id).where(
                TrajectoryRow.id.in_(rest[start : start + _CHUNK]),
                TrajectoryRow.claimed_by == worker,
            )
        )
    return sorted(kept)


def release(
    conn: Connection, worker: str, *, run_id: str | None = None, ids: Sequence[str] | None = None
) -> int:
    """Give back ``worker``'s unfinished claims (of ``run_id``, or ``ids``): ``incomplete``,
    no lease, free for any worker at once. How many."""
    if (run_id is None) == (ids is None):
        raise ValueError("release takes run_id or ids")
    query = update(TrajectoryRow).where(
        TrajectoryRow.claimed_by == worker, TrajectoryRow.status.in_(UNFINISHED)
    )
    values = {"status": "incomplete", "claimed_by": None, "lease_until": None}
    if run_id is not None:
        return int(
            conn.execute(query.where(TrajectoryRow.run_id == run_id).values(values)).rowcount
        )
    count = 0
    for start in range(0, len(ids or ()), _CHUNK):
        chunk = list(ids or ())[start : start + _CHUNK]
        count += int(conn.execute(query.where(TrajectoryRow.id.in_(chunk)).values(values)).rowcount)
    return count


def counts(conn: Connection, run_id: str) -> ClaimCounts:
    """:class:`ClaimCounts` of ``run_id``."""
    in_reach = or_(TrajectoryRow.status == "incomplete", TrajectoryRow.lease_until.is_not(None))
    live = and_(TrajectoryRow.lease_until.is_not(None), TrajectoryRow.lease_until >= _clock(conn))
    query = select(
        func.count(),
        func.count().filter(_claimable(conn)),
        func.count().filter(live),
    ).where(TrajectoryRow.run_id == run_id, TrajectoryRow.status.in_(UNFINISHED), in_reach)
    unfinished, free, leased = conn.execute(query).one()
    return ClaimCounts(int(unfinished), int(free), int(leased))


def settle_run(conn: Connection, run_id: str) -> str:
    """Set the run's status from its trajectories once a worker is done with it: ``finished``
    when none is left unfinished, ``running`` while another worker holds a live lease, else
    ``incomplete`` (``atelier worker`` or ``resume`` finishes it). The status set."""
    state = counts(conn, run_id)
    left = conn.scalar(
        select(func.count()).where(
            TrajectoryRow.run_id == run_id, TrajectoryRow.status.in_(UNFINISHED)
        )
    )
    status = "finished" if not left else "running" if state.leased else "incomplete"
    conn.execute(update(RunRow).where(RunRow.id == run_id).values(status=status))
    return status
