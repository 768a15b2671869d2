"""Dynamic batching: concurrent requests to one model run as one batch on one worker thread.

A :class:`DynamicBatcher` collects submitted items for up to ``max_wait_s`` (or until
``max_batch`` are waiting), hands the list to a synchronous ``run_batch`` on its own worker
thread (so the event loop stays free), and resolves each caller's future with its result.
While a batch runs, new requests queue up and form the next batch. The sizes of the batches it
ran are kept in ``batch_sizes`` (the servers show them at ``/stats``).

Every call into the model goes through the same single worker thread (``run_exclusive`` for
non-batch work such as loading a LoRA adapter), so the model never sees two threads at once.
``initializer`` runs once on that thread (e.g. ``torch.set_num_threads``, which is per thread).
A model is served behind one through :class:`~nodes.backends.engines.service.ModelService`.

Bounded work: with ``max_queue`` set, a request arriving while that many are already waiting
or running is refused at once with :class:`Overloaded` (the servers answer 503 with
``Retry-After``) instead of queueing without end. A caller that stops waiting (its task is
cancelled: a deadline, a client that disconnected, a server shutting down) cancels its future;
a batch whose every caller has gone is abandoned between model steps: the engine's step loop
calls :func:`~nodes.backends.abandon.raise_if_abandoned`, which raises
:class:`~nodes.backends.abandon.Abandoned`.
A batch with one caller still waiting runs to the end, for that caller. With ``max_run_s``, a
batch that runs longer answers its callers :class:`DeadlineExceeded` and is abandoned the same
way.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from nodes.backends.abandon import Abandoned, running_batch

T = TypeVar("T")
R = TypeVar("R")


class DeadlineExceeded(Exception):
    """A request's batch ran longer than ``max_run_s``: its caller gets this, and the batch
    stops at its next step once no caller is left."""


class Overloaded(Exception):
    """The batcher already holds ``max_queue`` requests; try again in ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _Worker(Generic[T, R]):
    queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]
    task: asyncio.Task[None]


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch: int = 8,
        max_wait_s: float = 0.005,
        name: str = "atelier-batcher",
        history: int = 10_000,
        initializer: Callable[[], None] | None = None,
        max_queue: int | None = None,
        batch_key: Callable[[T], Any] | None = None,
        max_run_s: float | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_queue is not None and max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self.batch_sizes: deque[int] = deque(maxlen=history)
        self.requests = 0
        self.max_queue = max_queue
        self.batch_key = batch_key
        self.max_run_s = max_run_s
        """Seconds a batch may run before its callers get :class:`DeadlineExceeded` (None:
        no limit). Counted from the batch's start: time spent waiting in the queue is bounded
        by ``max_queue`` (and by the caller, who may give up)."""
        """Items with different keys never share a ``run_batch`` call (None: any may)."""
        self.pending = 0
        """Requests submitted and not yet answered (waiting or in the running batch)."""
        self.refused = 0
        self.abandoned = 0
        self._batch_seconds: deque[float] = deque(maxlen=32)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=initializer
        )
        self._lock = threading.Lock()
        self._workers: dict[asyncio.AbstractEventLoop, _Worker[T, R]] = {}

    def stats(self) -> dict[str, Any]:
        sizes = list(self.batch_sizes)
        return {
            "requests": self.requests,
            "batches": len(sizes),
            "batch_sizes": sizes,
            "max_batch_size": max(sizes, default=0),
            "mean_batch_size": sum(sizes) / len(sizes) if sizes else 0.0,
            "max_batch": self.max_batch,
            "pending": self.pending,
            "max_queue": self.max_queue,
            "refused": self.refused,
            "abandoned_batches": self.abandoned,
        }

    async def submit(self, item: T) -> R:
        """``item``'s result. Raises :class:`Overloaded` at once when ``max_queue`` requests
        are already pending; cancelling the caller cancels the request (see the module)."""
        if self.max_queue is not None and self.pending >= self.max_queue:
            self.refused += 1
            raise Overloaded(
                f"the server is busy: {self.pending} requests are already waiting or running "
                f"(limit {self.max_queue})",
                self.retry_after_s(),
            )
        queue = self._ensure_worker()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.requests += 1
        self.pending += 1
        try:
            await queue.put((item, future))
            return await future
        finally:
            self.pending -= 1

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has likely drained: the pending batches times the
        recent mean batch duration (at least 1)."""
        if not self._batch_seconds:
            return 1
        mean = sum(self._batch_seconds) / len(self._batch_seconds)
        return max(1, math.ceil(mean * math.ceil(self.pending / self.max_batch)))

    async def run_exclusive(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` on the model's worker thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        with self._lock:
            workers, self._workers = list(self._workers.items()), {}
        for loop, worker in workers:
            if not loop.is_closed():
                loop.call_soon_threadsafe(worker.task.cancel)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- internals -----------------------------------------------------------------------------

    @staticmethod
    def _expire(live: list[tuple[T, asyncio.Future[R]]], seconds: float) -> None:
        for _, future in live:
            if not future.done():
                future.set_exception(
                    DeadlineExceeded(
                        f"the request's model work ran past this server's deadline of "
                        f"{seconds:g} s and was cancelled"
                    )
                )

    def _run_tracked(self, live: list[tuple[T, asyncio.Future[R]]]) -> Sequence[R | BaseException]:
        """``run_batch`` on the worker thread, with the batch's futures where
        :func:`~nodes.backends.abandon.raise_if_abandoned` finds them."""
        with running_batch([future for _, future in live]):
            results = self.run_batch([item for item, _ in live])
        if any(isinstance(r, Abandoned) for r in results):
            raise Abandoned("every request of this batch was cancelled")
        return results

    def _ensure_worker(self) -> asyncio.Queue[tuple[T, asyncio.Future[R]]]:
        """The calling event loop's queue (one collecting worker per loop: a server's loop and
        a caller's own loop may share one model; batches still run one at a time)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            for old in [old for old in self._workers if old.is_closed()]:
                del self._workers[old]
            worker = self._workers.get(loop)
            if worker is None or worker.task.done():
                queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
                worker = _Worker(queue, loop.create_task(self._work(queue), name=self.name))
                self._workers[loop] = worker
            return worker.queue

    async def _work(self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except (asyncio.TimeoutError, TimeoutError):
                    break
            for part in self._partition(batch):
                await self._run_part(loop, part)

    def _partition(
        self, batch: list[tuple[T, asyncio.Future[R]]]
    ) -> list[list[tuple[T, asyncio.Future[R]]]]:
        """``batch`` split by ``batch_key`` (first arrival first): each part is one model call,
        so a small image never waits inside a long one's call, and a part is abandoned as soon
        as its own callers have gone."""
        if self.batch_key is None:
            return [batch]
        parts: dict[Any, list[tuple[T, asyncio.Future[R]]]] = {}
        for item, future in batch:
            parts.setdefault(self.batch_key(item), []).append((item, future))
        return list(parts.values())

    async def _run_part(
        self, loop: asyncio.AbstractEventLoop, part: list[tuple[T, asyncio.Future[R]]]
    ) -> None:
        live = [(item, fut) for item, fut in part if not fut.done()]
        if not live:
            return
        self.batch_sizes.append(len(live))
        started = time.monotonic()
        expiry = None
        if self.max_run_s is not None:
            expiry = loop.call_later(self.max_run_s, self._expire, live, self.max_run_s)
        try:
            results = await loop.run_in_executor(self._executor, self._run_tracked, live)
            if len(results) != len(live):
                raise RuntimeError(
                    f"{self.name}: run_batch returned {len(results)} results for {len(live)} items"
                )
        except Abandoned as error:
            self.abandoned += 1
            results = [error] * len(live)
        except Exception as error:  # the whole batch failed: every caller gets the error
            results = [error] * len(live)
        finally:
            if expiry is not None:
                expiry.cancel()
        self._batch_seconds.append(time.monotonic() - started)
        for (_, future), result in zip(live, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
