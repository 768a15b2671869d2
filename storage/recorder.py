"""``SQLRecorder``: records every node step in the trajectory store, with group commit.

Each ``record_step`` (and ``start_trajectory`` / ``finish_trajectory``) puts its record on a
queue and waits. One writer task drains the queue: it takes everything waiting (up to
``max_batch``), writes it in one transaction on a dedicated thread, and after the commit wakes
every caller of that batch together. While one batch commits, the next one gathers, so with
hundreds of trajectories in flight a commit carries many steps, and each ``record_step`` still
returns only once its step is durable.

Failures are never silent: when a batch's transaction fails, its records are written again one
per transaction, and each caller whose own record cannot be written gets that exception (the
others are unaffected). If the writer itself dies, every waiting and later caller gets the error.

Images: while attached, the store buffers ``put`` images in memory; each batch writes all
buffered images first, in the same transaction as its steps. A step whose image is neither
buffered nor stored is refused (its caller gets :class:`~storage.images.ImageNotFound`), unless
``images=`` names another image store to copy it from (e.g. the graph's ``MemoryImageStore``).

Claims (many rollout workers on one run, :mod:`storage.claims`): with ``claimant=`` (the
worker's id), every batch first locks the rows of the trajectories it writes and writes only
those the worker still holds; the callers of the others get :class:`~storage.claims.ClaimLost`
and nothing of them is written (a worker whose lease passed cannot add a step to, or finish, a
trajectory another worker took over). Closing then releases what the worker left unfinished
and leaves the run's status to the worker (other workers may still be sampling it).

::

    async with SQLRecorder(store, run_id) as recorder:
        context = ReasonerContext(..., images=store, recorder=recorder)
        await Runner(context).run(tasks)
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from storage.claims import ClaimLost, held
from storage.engine import DatabaseLocked
from storage.images import ImageNotFound, ImageStore, check_ref
from storage.rows import (
    finish_values,
    image_row,
    now,
    replayable,
    state_json,
    step_rows,
    trajectory_row,
    utc,
)
from storage.schema import TRAJECTORY_STATUSES
from storage.store import TrajectoryStore
from storage.writes import BatchRows, existing_images, write_batch

FINISH_STATUSES = tuple(s for s in TRAJECTORY_STATUSES if s != "running")


class RecorderClosed(RuntimeError):
    pass


class RecorderBroken(RuntimeError):
    """The writer task died; nothing more can be recorded by this recorder."""


@dataclass
class RecorderStats:
    commits: int = 0
    records: int = 0
    steps: int = 0
    largest_batch: int = 0
    failed_batches: int = 0
    commit_seconds: float = 0.0

    @property
    def mean_batch(self) -> float:
        return self.records / self.commits if self.commits else 0.0


@dataclass(slots=True)
class _Item:
    kind: str  # start | step | finish | flush | close
    payload: Any
    future: asyncio.Future[None]
    trajectory_id: str = ""
    rows: Any = None
    state: dict[str, Any] | None = None
    """A step's state as stored: in full (a snapshot), or None (a delta)."""


@dataclass
class _Staged:
    """Changes to the recorder's open-trajectory bookkeeping, applied once a batch commits."""

    opened: dict[str, float] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)


class SQLRecorder:
    """A :class:`agent_graph.recording.Recorder` writing to a :class:`TrajectoryStore`."""

    def __init__(
        self,
        store: TrajectoryStore,
        run_id: str,
        *,
        images: ImageStore | None = None,
        max_batch: int = 512,
        state_snapshot_every: int = 16,
        run_name: str | None = None,
        run_config: dict[str, Any] | None = None,
        claimant: str | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if state_snapshot_every < 1:
            raise ValueError("state_snapshot_every must be at least 1")
        self.state_snapshot_every = state_snapshot_every
        """Steps whose number is a multiple of this carry the full state; the others only their
        update, which the store replays (1: every step a snapshot). Deltas halve the bytes and
        most of the per-step recording cost; ``initial_state`` is always stored. The recorder
        alone decides (see :meth:`stored_state`)."""
        self.store = store
        self.run_id = run_id
        self.claimant = claimant
        """The worker whose claims fence every write (see the module doc); None: no fence."""
        self.images = images
        self.max_batch = max_batch
        self.stats = RecorderStats()
        self._run_row = {
            "id": run_id,
            "name": run_name or run_id,
            "created_at": now(),
            "config": dict(run_config or {}),
            "status": "running",
        }
        self._run_ready = False
        self._open: dict[str, float] = {}
        """Trajectories started (or first seen) here and not finished: id -> start perf time."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._broken: BaseException | None = None

    # --- the Recorder protocol -------------------------------------------------------------------

    async def start_trajectory(self, state: Any) -> None:
        snapshot = state_json(state)
        trajectory_id = _trajectory_id(snapshot.get("trajectory_id") if snapshot else None)
        row = trajectory_row(snapshot or {}, self.run_id, now())
        await self._submit(_Item("start", row, self._future(), trajectory_id))

    async def record_step(self, record: Any) -> None:
        _trajectory_id(record.trajectory_id)
        for ref in (*record.trace.images_in, *record.trace.images_out):
            check_ref(ref)
        item = _Item("step", record, self._future(), record.trajectory_id)
        item.state = self.stored_state(record)
        await self._submit(item)

    def stored_state(self, record: Any) -> dict[str, Any] | None:
        """The state a step is stored with: the full state the node saw (a snapshot), or None
        (a delta: the store rebuilds it from the last snapshot, or the trajectory's
        ``initial_state``, and the updates after it).

        The one place that decides: a step whose number is a multiple of
        :attr:`state_snapshot_every` is a snapshot, and so is every step of a state type the
        store cannot replay exactly (:func:`~storage.rows.replayable`) or given only as JSON
        (its type unknown); a step that comes with no state is a delta. Dumping the whole state
        at every step was the largest part of the recording's per-step cost (and bytes)."""
        state = record.state_before
        if state is None or isinstance(state, dict):
            return state
        every = self.state_snapshot_every
        if every > 1 and record.seq % every != 0 and replayable(type(state)):
            return None
        return state_json(state)

    async def finish_trajectory(
        self, trajectory_id: str, status: str, state: Any, error: str | None
    ) -> None:
        _trajectory_id(trajectory_id)
        if status not in FINISH_STATUSES:
            raise ValueError(f"status must be one of {FINISH_STATUSES}, not {status!r}")
        snapshot = state_json(state)
        await self._submit(
            _Item(
                "finish",
                (status, snapshot, error, now(), time.perf_counter()),
                self._future(),
                trajectory_id,
            )
        )

    # --- lifecycle -----------------------------------------------------------------------------

    async def flush(self) -> None:
        """Return once everything submitted before this call (and buffered images) is durable."""
        if self._task is None or self._closed:
            return
        await self._submit(_Item("flush", None, self._future()))

    async def aclose(self) -> None:
        """Write everything pending, mark trajectories this recorder left unfinished
        ``incomplete``, end the run (``finished``, or ``incomplete`` if any were left), and
        stop the writer. Idempotent."""
        if self._closed:
            return
        if self._task is None:
            self._closed = True
            return
        if self._broken is not None:
            self._closed = True
            self._shutdown()
            raise RecorderBroken(f"the recorder's writer died: {self._broken!r}")
        close = _Item("close", None, self._future())
        error: BaseException | None = None
        try:
            await self._submit(close)
        except Exception as exc:  # still stop the writer and release the store; then raise
            error = exc
        self._closed = True
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task])  # it returns after the batch holding the close
        self._shutdown()
        if error is not None:
            raise error

    async def __aenter__(self) -> SQLRecorder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- the writer ----------------------------------------------------------------------------

    def _future(self) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, item: _Item) -> None:
        if self._closed:
            raise RecorderClosed("the recorder is closed")
        if self._broken is not None:
            raise RecorderBroken(f"the recorder's writer died: {self._broken!r}") from self._broken
        self._ensure_writer()
        assert self._queue is not None
        self._queue.put_nowait(item)
        # A caller cancelled while waiting cancels only its wait: the item is queued, the writer
        # still writes it and skips resolving a future that is already done. (No shield: one
        # more future and callback per step, for nothing.)
        await item.future

    def _ensure_writer(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="atelier-recorder")
            self.store._attach_writer()
            self._task = loop.create_task(self._writer(), name="atelier-recorder")
        elif self._loop is not loop:
            raise RuntimeError("an SQLRecorder serves one event loop; create one per loop")

    async def _writer(self) -> None:
        assert self._queue is not None and self._loop is not None
        queue = self._queue
        batch: list[_Item] = []
        try:
            while True:
                batch = [await queue.get()]
                while len(batch) < self.max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
                outcomes = await self._loop.run_in_executor(self._executor, self._commit, batch)
                for item, outcome in zip(batch, outcomes, strict=True):
                    if item.future.done():
                        continue
                    if outcome is None:
                        item.future.set_result(None)
                    else:
                        item.future.set_exception(outcome)
                if any(item.kind == "close" for item in batch):
                    return
        except BaseException as exc:
            self._broken = exc
            error = RecorderBroken(f"the recorder's writer died: {exc!r}")
            for item in [*batch, *_drain(queue)]:
                if not item.future.done():
                    item.future.set_exception(error)
            raise

    # Everything below runs on the writer thread.

    def _commit(self, items: list[_Item]) -> list[BaseException | None]:
        """Write ``items`` in one transaction, or, if that fails, one transaction each."""
        started = time.perf_counter()
        outcomes: list[BaseException | None] = [None] * len(items)
        try:
            self._write(items, outcomes)
        except Exception as exc:
            if len(items) == 1 or isinstance(exc, DatabaseLocked):
                # Writing the records one by one cannot help when the database itself is
                # unavailable: every caller gets the error.
                outcomes = [exc] * len(items)
            else:
                self.stats.failed_batches += 1
                for index, item in enumerate(items):
                    single: list[BaseException | None] = [None]
                    try:
                        self._write([item], single)
                    except Exception as item_exc:  # handed to that item's caller
                        single[0] = item_exc
                    outcomes[index] = single[0]
        self.stats.commit_seconds += time.perf_counter() - started
        self.stats.largest_batch = max(self.stats.largest_batch, len(items))
        return outcomes

    def _write(self, items: list[_Item], outcomes: list[BaseException | None]) -> None:
        images = self.store._pending_images()
        batch = BatchRows(
            run=None if self._run_ready else self._run_row,
            images=list(images),
            claimant=self.claimant,
        )
        buffered = {row["sha256"] for row in images}
        staged = _Staged()
        owners: list[tuple[int, _Item]] = []
        for index, item in enumerate(items):
            try:
                self._prepare(item, batch, staged)
                owners.append((index, item))
            except Exception as exc:  # a bad record: only its caller fails
                outcomes[index] = exc
        refused: dict[int, BaseException] = {}
        lost: set[str] = set()

        def work(conn: Any) -> None:
            refused.clear()
            lost.clear()
            rows = batch
            if self.claimant is not None:
                lost.update(self._lost_claims(conn, owners, refused))
                rows = _without(batch, lost)
            steps = [(n, i) for n, i in owners if i.kind == "step" and n not in refused]
            wanted = {ref for _, i in steps for ref in i.rows.refs} - buffered
            wanted = {ref for ref in wanted if not self.store._is_known(ref)}
            missing = wanted - existing_images(conn, wanted) if wanted else set()
            copied = self._copy_images(missing)
            missing -= copied.keys()
            for index, item in steps:
                lacking = item.rows.refs & missing
                if lacking:
                    refused[index] = ImageNotFound(
                        f"step {item.rows.step['seq']} of trajectory {item.trajectory_id} "
                        f"references images not in the store: {sorted(lacking)}; use the store "
                        "as the graph's image store, or give SQLRecorder images="
                    )
            write_batch(
                conn,
                replace(
                    rows,
                    images=[*rows.images, *copied.values()],
                    steps=[i.rows for n, i in steps if n not in refused],
                ),
            )

        self.store.db.write(work)
        # Committed: only now does the recorder's own bookkeeping change.
        self._run_ready = True
        self.store._images_committed(images)
        self._open.update(staged.opened)
        for trajectory_id in staged.finished | lost:
            self._open.pop(trajectory_id, None)
        if batch.close is not None:
            self._open.clear()
        for index, exc in refused.items():
            outcomes[index] = exc
        self.stats.commits += 1
        self.stats.records += len(items)
        self.stats.steps += sum(1 for n, i in owners if i.kind == "step" and n not in refused)

    def _lost_claims(
        self, conn: Any, owners: list[tuple[int, _Item]], refused: dict[int, BaseException]
    ) -> set[str]:
        """The trajectories of this batch the claimant no longer holds (the rows of those it
        holds stay locked until the commit); their items are refused with :class:`ClaimLost`."""
        assert self.claimant is not None
        kinds = ("start", "step", "finish")
        wanted = {i.trajectory_id for _, i in owners if i.kind in kinds}
        lost = wanted - held(conn, self.claimant, wanted) if wanted else set()
        for index, item in owners:
            if item.kind in kinds and item.trajectory_id in lost:
                refused[index] = ClaimLost(
                    f"worker {self.claimant} no longer holds trajectory {item.trajectory_id} "
                    f"(its lease passed and another worker took it over, or it was released): "
                    f"its {item.kind} was not written"
                )
        return lost

    def _prepare(self, item: _Item, batch: BatchRows, staged: _Staged) -> None:
        tid = item.trajectory_id
        is_open = (tid in self._open or tid in staged.opened) and tid not in staged.finished
        if item.kind == "start":
            batch.starts.append(item.payload)
            staged.finished.discard(tid)
            staged.opened[tid] = time.perf_counter()
        elif item.kind == "step":
            record = item.payload
            if item.rows is None:
                item.rows = step_rows(record, item.state)
            if not is_open:
                # Never started through this recorder: create it from the state it had.
                if record.state_before is None:
                    raise ValueError(
                        f"step {record.seq} of trajectory {tid} carries no state and the "
                        "trajectory was never started: call start_trajectory first"
                    )
                state = dict(item.state or state_json(record.state_before))
                state.setdefault("trajectory_id", tid)
                batch.implicit.append(trajectory_row(state, self.run_id, utc(record.started_at)))
                staged.opened[tid] = time.perf_counter()
        elif item.kind == "finish":
            status, snapshot, error, finished_at, finished_perf = item.payload
            opened = staged.opened.get(tid, self._open.get(tid))
            duration = finished_perf - opened if opened is not None else None
            batch.finishes.append(
                (tid, finish_values(status, snapshot, error, finished_at, duration))
            )
            staged.finished.add(tid)
        elif item.kind == "close":
            still_open = (set(self._open) | set(staged.opened)) - staged.finished
            batch.close = (self.run_id, sorted(still_open))

    def _copy_images(self, refs: set[str]) -> dict[str, dict[str, Any]]:
        copied: dict[str, dict[str, Any]] = {}
        if self.images is None:
            return copied
        for ref in sorted(refs):
            try:
                data = self.images.get_bytes(ref)
            except (ImageNotFound, KeyError):
                continue
            if self.store.files is not None:
                self.store.files.put_bytes(data)
            copied[ref] = image_row(ref, data, keep_bytes=self.store.files is None)
        return copied

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.store._detach_writer()


def _trajectory_id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("a recorded trajectory needs a non-empty trajectory_id")
    return value


def _without(batch: BatchRows, lost: set[str]) -> BatchRows:
    """``batch`` less every record of the trajectories in ``lost``."""
    if not lost:
        return batch
    return replace(
        batch,
        starts=[row for row in batch.starts if row["id"] not in lost],
        implicit=[row for row in batch.implicit if row["id"] not in lost],
        finishes=[(tid, values) for tid, values in batch.finishes if tid not in lost],
    )


def _drain(queue: asyncio.Queue[_Item]) -> list[_Item]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items
