"""``ModelService``: one loaded model served to concurrent callers in dynamic batches.

Every in-process model is this one service around a different engine: the text models
(:class:`~nodes.backends.engines.lm_inprocess.LMService`), the diffusers image models
(:class:`~nodes.backends.engines.image_inprocess.ImageService`) and the traced flow sampler
(:class:`~nodes.backends.engines.flow_image.FlowImageModel`); Atelier's ``lm`` and ``image``
servers are thin HTTP wrappers around the first two.

An engine is a synchronous object with

- ``name``: the served model's name;
- ``run_batch(jobs)``: one result (or exception) per job, run on the service's worker thread;

optionally ``batch_key(job)`` (jobs with different keys never share a ``run_batch`` call: the
engine would run them one after the other anyway, and a caller would wait for both); and, when
it serves LoRA adapters, ``adapters`` (name -> path), ``load_adapter(name, path, *,
inplace)`` and ``unload_adapter(name)``. The service runs every call into the engine on the
same worker thread (batches, adapter loads, :meth:`ModelService.call`), so the model never
sees two threads at once. torch is imported only when ``torch_threads`` is set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from nodes.backends.engines.batching import DynamicBatcher

J = TypeVar("J")
R = TypeVar("R")


class ModelService(Generic[J, R]):
    """``engine`` behind a :class:`DynamicBatcher`: concurrent :meth:`run` calls become batches.

    ``max_batch`` / ``max_wait_ms``: the batcher's limits (as the services and backends TOML
    spell them; None: the class's defaults); ``max_queue``: requests waiting or running beyond
    which :meth:`run` raises :class:`~nodes.backends.engines.batching.Overloaded` (None: no
    bound); ``torch_threads``: intra-op torch threads of the
    worker thread (None: torch's default); ``thread_name``: the worker thread's name (what a
    profiler shows). Subclasses set the defaults as class attributes.
    """

    MAX_BATCH = 8
    MAX_WAIT_MS = 5.0
    THREAD_NAME = "atelier-model"

    def __init__(
        self,
        engine: Any,
        *,
        max_batch: int | None = None,
        max_wait_ms: float | None = None,
        torch_threads: int | None = None,
        thread_name: str | None = None,
        max_queue: int | None = None,
    ) -> None:
        max_batch = self.MAX_BATCH if max_batch is None else max_batch
        max_wait_ms = self.MAX_WAIT_MS if max_wait_ms is None else max_wait_ms
        self.engine = engine
        self.batcher: DynamicBatcher[J, R] = DynamicBatcher(
            engine.run_batch,
            max_batch=max_batch,
            max_wait_s=max_wait_ms / 1000.0,
            name=thread_name or self.THREAD_NAME,
            initializer=torch_threads_initializer(torch_threads),
            max_queue=max_queue,
            batch_key=getattr(engine, "batch_key", None),
        )

    @property
    def name(self) -> str:
        return str(self.engine.name)

    async def run(self, job: J) -> R:
        """The engine's result for ``job``, run in a batch with whatever else is waiting."""
        return await self.batcher.submit(job)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the model's worker thread, between batches (work that is not a
        batch, e.g. tokenising a prompt)."""
        return await self.batcher.run_exclusive(fn, *args)

    async def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None:
        """Load a LoRA adapter between batches (the engine says what a failed load leaves)."""
        await self.call(functools.partial(self.engine.load_adapter, name, path, inplace=inplace))

    async def unload_adapter(self, name: str) -> None:
        await self.call(self.engine.unload_adapter, name)

    def stats(self) -> dict[str, Any]:
        """The model, its loaded adapters and the batch sizes run (the servers' ``/stats``)."""
        adapters = list(getattr(self.engine, "adapters", None) or {})
        return {"model": self.name, "adapters": adapters, **self.batcher.stats()}

    def close(self) -> None:
        self.batcher.close()


def torch_threads_initializer(threads: int | None) -> Callable[[], None] | None:
    """An initializer giving the worker thread ``threads`` intra-op torch threads (None: keep
    torch's default). Tiny models run fastest on one; a big model on a shared CPU may want
    fewer than all cores (OpenMP threads spinning on busy cores slow every op down)."""
    if threads is None:
        return None

    def initialize() -> None:
        import torch

        torch.set_num_threads(threads)

    return initialize
