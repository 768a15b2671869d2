"""Abandoned work: a served batch whose every caller stopped waiting stops between model steps.

A batcher's worker thread (:class:`~nodes.backends.engines.batching.DynamicBatcher`) sets the
futures of the batch it runs with :func:`running_batch`; an engine's step loop (denoising steps,
generated tokens) calls :func:`raise_if_abandoned`, which raises :class:`Abandoned` once every
one of those futures is done before its batch is (cancelled: the client disconnected, the
server is shutting down; or failed with the batcher's deadline). Outside a batch it does
nothing, so engines and samplers call it unconditionally. It lives here, beside the protocols,
because both the engines and the flow sampler (a layer below them) check it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

_batch = threading.local()


class Abandoned(Exception):
    """Every caller of the running batch stopped waiting: the engine stops the batch here."""


@contextmanager
def running_batch(futures: Sequence[Any]) -> Iterator[None]:
    """Mark ``futures`` (objects with ``done()``: asyncio futures) as the current thread's
    batch."""
    _batch.futures = list(futures)
    try:
        yield
    finally:
        _batch.futures = None


def batch_abandoned() -> bool:
    """True on a worker thread whose running batch has no caller left waiting."""
    futures = getattr(_batch, "futures", None)
    # A future is resolved only after its batch ends, so one that is done while the batch
    # runs was cancelled or timed out: nobody waits for it. Future.done() only reads the
    # future's state, which is safe from the worker thread.
    return bool(futures) and all(future.done() for future in futures)


def cancelled_items() -> list[bool]:
    """Per item of the running batch (in the order ``run_batch`` got them), whether its caller
    has gone; empty outside a batch. Lets an engine drop one row of a batch that goes on for
    the others (a generation loop marks that row finished)."""
    return [future.done() for future in getattr(_batch, "futures", None) or ()]


def raise_if_abandoned() -> None:
    """For step loops: stop a batch nobody waits for. One attribute read per step."""
    if batch_abandoned():
        raise Abandoned("every request of this batch was cancelled")
