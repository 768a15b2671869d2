"""``atelier worker``: one of many rollout workers sampling a run (``agent_graph.workers``), and
``atelier rollout --register-only``, which creates such a run without sampling it::

    export ATELIER_DB=postgresql://atelier@db-host/atelier
    atelier rollout --per-category 8 -G 8 --mode random --name big --register-only
    atelier worker big --concurrency 64            # on every machine, as many as wanted

Each trajectory is claimed by one worker at a time (PostgreSQL ``FOR UPDATE SKIP LOCKED``); a
worker killed mid-run leaves its trajectories to the others once its leases (``--lease``)
pass. Workers exit 0 once nothing of the run is left. Given a training loop's name (``atelier
train --config FILE --max-staleness K --workers``), a worker follows the loop instead: it
samples each run the trainer registers, with the version that run names, until the trainer ends
the loop (or ``--idle-timeout`` passes with nothing to sample). On SQLite, workers on one
machine share the file (its single writer serialises the claims). argparse only at import.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from atelier.cli.errors import CliError


def add_worker_parser(commands: Any, add_db: Any) -> argparse.ArgumentParser:
    worker = commands.add_parser(
        "worker",
        help="sample a run together with other workers (one or many machines; a run made "
        "with `rollout --register-only`, or one killed mid-way)",
    )
    worker.add_argument(
        "run",
        help="run id, id prefix or name; a training loop's name (`atelier train "
        "--max-staleness K --workers`): sample each batch it registers until it ends",
    )
    worker.add_argument(
        "--batch", type=int, default=8, help="trajectories claimed at a time (default: 8)"
    )
    worker.add_argument(
        "--lease",
        type=float,
        default=60.0,
        help="seconds a claim lasts unless renewed (every third of it): a killed worker's "
        "trajectories go to the others after this (default: 60)",
    )
    worker.add_argument(
        "--concurrency", type=int, default=64, help="trajectories in flight (default: 64)"
    )
    worker.add_argument(
        "--worker-id", help="this worker's name in the store (default: host-pid-random)"
    )
    worker.add_argument(
        "--idle-timeout",
        type=float,
        metavar="S",
        help="following a training loop: leave after S seconds in a row with nothing to "
        "sample (default: stay until the loop ends; a trainer killed with SIGKILL never ends it)",
    )
    add_db(worker)
    worker.set_defaults(handler=cmd_worker)
    _add_register_only(commands.choices["rollout"])
    return worker


def _add_register_only(rollout: argparse.ArgumentParser) -> None:
    """``rollout --register-only``: the rollout command's own options, then no sampling."""
    rollout.add_argument(
        "--register-only",
        action="store_true",
        help="create the run and register its trajectories without sampling any: "
        "`atelier worker RUN` processes (one or many machines) sample it, with their own "
        "--batch and --concurrency",
    )
    sample = rollout.get_default("handler")

    def handler(args: argparse.Namespace) -> int:
        return cmd_register(args) if args.register_only else sample(args)

    rollout.set_defaults(handler=handler)


def cmd_register(args: argparse.Namespace) -> int:
    from agent_graph.rollout import rollout
    from atelier.cli.app import rollout_plan
    from atelier.cli.common import safe_url

    if args.keep_groups_together:
        raise CliError(
            "--keep-groups-together paces sampling in this process; with --register-only the "
            "workers claim trajectories in registration order (a group's samples are adjacent)"
        )
    tasks, budget, store, router, stop, mode = rollout_plan(args)
    work = rollout(
        store,
        tasks,
        mode=mode,
        router=router,
        stop=stop,
        budget=budget,
        name=args.name,
        backends_config=args.config,
        register_only=True,
    )
    outcome = _run(store, None, work)
    if outcome is None:
        print("atelier: interrupted", file=sys.stderr)
        return 130
    print(
        f"run {outcome.run_id}: registered {len(tasks)} trajectories; sample it with "
        f"`atelier worker {outcome.run_id} --db {safe_url(store.url)}` on each machine"
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from agent_graph.heap import freeze_startup_heap
    from agent_graph.workers import work_run
    from atelier.cli.app import _exit_status, _outcome, _print_requests
    from atelier.cli.common import open_store, resolve_run

    if args.batch < 1 or args.concurrency < 1:
        raise CliError("--batch and --concurrency must be at least 1")
    if not args.lease > 0:
        raise CliError("--lease must be a positive number of seconds")
    if args.idle_timeout is not None and not args.idle_timeout > 0:
        raise CliError("--idle-timeout must be a positive number of seconds")
    if args.worker_id is not None and not 0 < len(args.worker_id.strip()) <= 200:
        raise CliError("--worker-id must be 1 to 200 characters")
    store = open_store(args)
    run = resolve_run(store, args.run)
    from agent_graph.loops import is_loop_run

    if is_loop_run(run):
        return _follow(args, store, run)
    if args.idle_timeout is not None:
        raise CliError("--idle-timeout applies to following a training loop, not a run")
    left = store.claim_counts(run.id)
    if left.unfinished == 0:
        total = store.count_trajectories(run=run.id)
        running = store.count_trajectories(run=run.id, status="running")
        why = f"its {total} trajectories are all finished" if total else "it has no trajectories"
        if running:  # a single-process rollout's: its own process runs them, or resume does
            why = (
                f"its {running} unfinished trajectories belong to a `rollout` or `resume` "
                f"process (if that was killed: `atelier resume {run.id[:12]}`)"
            )
        raise CliError(f"run {run.id[:12]} ({run.name}) has nothing for a worker: {why}")
    freeze_startup_heap()
    work = work_run(
        store,
        run.id,
        worker=args.worker_id,
        batch=args.batch,
        lease_s=args.lease,
        concurrency=args.concurrency,
    )
    result = _run(store, run.id, work)
    if result is None:
        print(
            "atelier: interrupted — this worker's claims were released; the other workers, "
            f"or `atelier worker {run.id[:12]}`, finish the run",
            file=sys.stderr,
        )
        return 130
    results = result.results
    lost = f", {result.lost} taken over by another worker" if result.lost else ""
    print(
        f"worker {result.worker}: run {run.id}: {len(results)} trajectories, "
        f"{_outcome(results)}{lost}; the run is {result.run_status or 'unknown'}"
    )
    _print_requests(result.requests)
    return _exit_status(results, run.id)


def _follow(args: argparse.Namespace, store: Any, loop: Any) -> int:
    """``atelier worker LOOP``: sample for a training loop until its trainer ends it."""
    from agent_graph.heap import freeze_startup_heap
    from agent_graph.workers import follow_loop
    from atelier.cli.app import _exit_status, _outcome, _print_requests

    if loop.status != "running":
        raise CliError(
            f"training loop {loop.name} ({loop.id[:12]}) is {loop.status}: nothing to sample for it"
        )
    freeze_startup_heap()
    work = follow_loop(
        store,
        loop.id,
        worker=args.worker_id,
        batch=args.batch,
        lease_s=args.lease,
        concurrency=args.concurrency,
        idle_timeout_s=args.idle_timeout,
    )
    result = _run(store, None, work)
    if result is None:
        print(
            "atelier: interrupted — this worker's claims were released; the other workers "
            f"following {loop.name} sample the rest",
            file=sys.stderr,
        )
        return 130
    results = result.results
    lost = f", {result.lost} taken over by another worker" if result.lost else ""
    left = (
        f"left after {args.idle_timeout:g} s with nothing to sample"
        if result.loop_status == "running"
        else f"the loop is {result.loop_status}"
    )
    print(
        f"worker {result.worker}: training loop {loop.name}: {len(results)} trajectories in "
        f"{len({r.run_id for r in result.runs})} runs, {_outcome(results)}{lost}; {left}"
    )
    for run in result.runs:
        _print_requests(run.requests)
    return _exit_status(results, result.runs[-1].run_id) if result.runs else 0


def _run(store: Any, run_id: str | None, work: Any) -> Any:
    """``work`` to completion, or None when interrupted (Ctrl-C or SIGTERM: the worker's
    claims are released on the way out); a store failure or a bad run config is one line."""
    from atelier.cli.app import _check_backend_build_failure, _check_store_failure

    async def main() -> Any:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await work

    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return None
    except ValueError as exc:  # a run started in code, a world this version cannot rebuild
        raise CliError(str(exc)) from None
    except Exception as exc:
        if run_id is not None:
            _check_store_failure(store, exc, run_id, run_id)
        _check_backend_build_failure(exc)
        raise
