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
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


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
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self.batch_sizes: deque[int] = deque(maxlen=history)
        self.requests = 0
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
        }

    async def submit(self, item: T) -> R:
        queue = self._ensure_worker()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.requests += 1
        await queue.put((item, future))
        return await future

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
            live = [(item, fut) for item, fut in batch if not fut.done()]
            if not live:
                continue
            self.batch_sizes.append(len(live))
            try:
                results = await loop.run_in_executor(
                    self._executor, self.run_batch, [item for item, _ in live]
                )
                if len(results) != len(live):
                    raise RuntimeError(
                        f"{self.name}: run_batch returned {len(results)} results "
                        f"for {len(live)} items"
                    )
            except Exception as error:  # the whole batch failed: every caller gets the error
                results = [error] * len(live)
            for (_, future), result in zip(live, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
