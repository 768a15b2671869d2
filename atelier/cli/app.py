"""The ``atelier`` command line: the parser, ``main`` and the run/store subcommands.

Only argparse is imported at start-up: each command imports what it needs when it runs, so
``atelier --help`` answers without loading LangGraph, torch or a model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent_graph.heap import freeze_startup_heap
from agent_graph.ids import short_id
from agent_graph.logs import install_cli_logging
from atelier.cli.common import (
    add_db,
    close_stores,
    is_read_only,
    open_store,
    resolve_run,
    store_url,
    when,
)
from atelier.cli.errors import CliError, Interrupted, StoreUnavailable
from atelier.cli.serve import add_serve_parser  # argparse only: models load when serving
from atelier.cli.train import add_train_parser  # argparse only: torch loads when training
from atelier.cli.ui import add_ui_parser  # argparse only: the web app loads when it serves
from atelier.cli.worker import add_worker_parser  # argparse only: the graph loads when it runs

MODES = ("auto", "direct", "reflect", "decompose", "escalate", "random")


OPTIONAL_MODULES = {
    **dict.fromkeys(("transformers", "diffusers", "peft", "safetensors", "accelerate"), "models"),
    **dict.fromkeys(("fastapi", "multipart"), "serve"),
    "starlette": "ui",
    "uvicorn": "ui",
    "psycopg": "postgres",
    "pyarrow": "export",
    "tensorboard": "tensorboard",
    "vllm": "vllm",
}
"""Top-level modules of the optional extras (pyproject.toml), by extra: a command that needs
one the install lacks says which extra to install, in one line."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    install_cli_logging()
    try:
        status = int(args.handler(args) or 0)
        # Every store the command opened, closed before exiting: SQLite's WAL is checkpointed,
        # so the .db file alone holds the data (a copy of it is a complete store).
        close_stores()
        return status
    except StoreUnavailable as exc:
        print(f"atelier: error: {exc}", file=sys.stderr)
        return 1
    except CliError as exc:
        print(f"atelier: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(_interrupted_message(exc.run_id), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("atelier: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        module = (exc.name or "").split(".")[0]
        extra = OPTIONAL_MODULES.get(module)
        if extra is None:  # not an optional dependency: a broken install, not ours to word
            raise
        print(
            f"atelier: error: this command needs {module}, from the optional extra "
            f"'{extra}': install it with `make install-dev` (every extra) or "
            f"pip install -e '.[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:
        if exc.filename is None:  # not a path problem (a socket, a driver): not ours to word
            raise
        # A file the command reads or writes (a name too long, a full disk, a folder that is
        # not one): one line naming the path, never a traceback.
        print(f"atelier: error: {_path_problem(exc)}", file=sys.stderr)
        return 2
    finally:
        close_stores(quietly=True)  # after an error: connections released, nothing raised


def _path_problem(exc: OSError) -> str:
    """``cannot access PATH: File name too long``, from an ``OSError`` naming a file (read or
    written: the error does not say which)."""
    reason = exc.strerror or type(exc).__name__
    return f"cannot access {exc.filename}: {reason}"


def _interrupted_message(run_id: str | None) -> str:
    if run_id is None:  # interrupted before the run was created: nothing to finish
        return "atelier: interrupted"
    return (
        f"atelier: interrupted — every recorded step is kept; finish with: atelier resume {run_id}"
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atelier")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atelier",
        description="Adaptive image generation by reasoning: plan, draw, reflect, refine, "
        "decompose — recorded, and retrainable from its own trajectories.",
    )
    parser.add_argument("--version", action="version", version=f"atelier {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run one prompt and print its trajectory")
    run.add_argument("prompt", help='what to draw, e.g. "three red circles above a blue square"')
    run.add_argument(
        "--mode",
        choices=MODES,
        help="auto = rule-based router; random = uniform router; escalate = direct, then up "
        "to 3 reflect rounds (capped by --max-rounds), then decompose if the reflector still "
        "rejects the image, as one trajectory (default: the --config file's [policies] router "
        "if it names one, else auto)",
    )
    run.add_argument("--out", type=Path, help="save the final image here (.png)")
    run.add_argument("--seed", type=int, default=0, help="trajectory seed (default: 0)")
    run.add_argument(
        "--max-rounds",
        type=int,
        default=4,
        help="most reflect→refine correction rounds (default: 4)",
    )
    _add_config(run)
    _add_versions(run)
    add_db(run)
    run.add_argument("--no-record", action="store_true", help="do not write to the store")
    run.set_defaults(handler=cmd_run)

    demo = commands.add_parser(
        "demo", help="run a fixed, seeded ShapeWorld prompt set in every mode; print a table"
    )
    demo.add_argument(
        "--per-category",
        type=int,
        default=24,
        help="prompts per category (default: 24; 9 categories)",
    )
    demo.add_argument("--seed", type=int, default=0, help="prompt-set seed (default: 0)")
    demo.add_argument(
        "--concurrency", type=int, default=64, help="trajectories in flight (default: 64)"
    )
    demo.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    _add_versions(demo, demo=True)
    add_db(demo)
    demo.add_argument("--no-record", action="store_true", help="do not write to the store")
    demo.set_defaults(handler=cmd_demo)

    rollout = commands.add_parser(
        "rollout", help="record G samples per prompt into the store (ShapeWorld prompts or a file)"
    )
    rollout.add_argument(
        "--prompts",
        type=Path,
        help="a text file, one prompt per line (default: ShapeWorld's fixed prompt set)",
    )
    rollout.add_argument(
        "--per-category", type=int, default=8, help="ShapeWorld prompts per category (default: 8)"
    )
    rollout.add_argument(
        "--group-size", "-G", type=int, default=4, help="samples per prompt (default: 4)"
    )
    rollout.add_argument(
        "--mode",
        choices=MODES,
        help="mode policy (default: the --config file's [policies] router if it names one, "
        "else random, for exploration); escalate = SAIR's SFT data pipeline: direct, then up "
        "to 3 reflect rounds, then decompose while still rejected",
    )
    rollout.add_argument("--seed", type=int, default=0)
    rollout.add_argument("--max-rounds", type=int, default=4)
    rollout.add_argument("--concurrency", type=int, default=64)
    rollout.add_argument(
        "--keep-groups-together",
        action="store_true",
        help="admit the G samples of a prompt together, once G slots are free",
    )
    rollout.add_argument("--name", help="run name (must be new: `resume NAME` then finds this run)")
    _add_config(rollout)
    _add_versions(rollout)
    add_db(rollout)
    rollout.set_defaults(handler=cmd_rollout)

    runs = commands.add_parser("runs", help="list recorded runs")
    runs.add_argument(
        "--curves",
        action="store_true",
        help="also print every training series' curves (reward, accuracy, images, loss, kl, "
        "clip fraction per iteration)",
    )
    add_db(runs)
    runs.set_defaults(handler=cmd_runs)

    ls = commands.add_parser("ls", help="list recorded trajectories")
    ls.add_argument("--run", help="run id, id prefix or name")
    ls.add_argument("--status", choices=("running", "succeeded", "failed", "incomplete"))
    ls.add_argument("--mode", choices=("direct", "reflect", "decompose", "escalate"))
    ls.add_argument("--min-reward", type=float, help="only trajectories scoring at least this")
    ls.add_argument("--limit", type=int, default=30, help="rows to show (default: 30)")
    ls.add_argument(
        "--ids",
        action="store_true",
        help="print only the full trajectory ids, one per line (for scripts)",
    )
    add_db(ls)
    ls.set_defaults(handler=cmd_ls)

    show = commands.add_parser("show", help="show one recorded trajectory, step by step")
    show.add_argument("id", help="trajectory id, or a unique prefix or suffix (as `ls` shows)")
    show.add_argument(
        "--full",
        action="store_true",
        help="print every text whole (reflections, plans, model outputs), not one clipped line",
    )
    add_db(show)
    show.set_defaults(handler=cmd_show)

    view = commands.add_parser(
        "view", help="write a self-contained HTML page of a run or trajectory"
    )
    view.add_argument("ref", help="run id/prefix/name, or trajectory id/prefix/suffix")
    view.add_argument("--out", type=Path, help="HTML file (default: atelier-<ref>.html)")
    view.add_argument("--limit", type=int, default=500, help="most trajectories on the page")
    add_db(view)
    view.set_defaults(handler=cmd_view)

    export = commands.add_parser("export", help="export trajectories to JSONL or Parquet")
    export.add_argument("--run", help="run id, id prefix or name (default: every run)")
    export.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    export.add_argument("--images", choices=("files", "base64", "none"), default="files")
    export.add_argument("--out", type=Path, required=True, help="output file")
    add_db(export)
    export.set_defaults(handler=cmd_export)

    resume = commands.add_parser("resume", help="finish a killed run's unfinished trajectories")
    resume.add_argument("run", help="run id, id prefix or name")
    resume.add_argument("--concurrency", type=int, default=64)
    _add_versions(resume, resume=True)
    add_db(resume)
    resume.set_defaults(handler=cmd_resume)

    add_serve_parser(commands)

    add_train_parser(commands, add_db)

    add_ui_parser(commands, add_db)

    add_worker_parser(commands, add_db)  # also adds rollout's --register-only

    graph = commands.add_parser("graph", help="print the reasoner graph as Mermaid")
    graph.set_defaults(handler=cmd_graph)
    return parser


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="backends per role from a TOML/JSON file (examples/configs/); default: ShapeWorld",
    )


def _add_versions(
    parser: argparse.ArgumentParser, *, resume: bool = False, demo: bool = False
) -> None:
    """``--router`` and ``--stop``: trained decision-policy versions."""
    ref = "name@version (registered in the store by `atelier train`, e.g. {}) or a saved version's "
    if resume:
        parser.add_argument(
            "--router",
            metavar="REF",
            help="the router version the run was recorded with (optional: resume always "
            "continues with the recorded policies; another version is refused)",
        )
        parser.add_argument(
            "--stop",
            metavar="REF",
            help="the stop policy version the run was recorded with (optional, as --router)",
        )
        return
    if demo:
        router_help = "also run this trained router version, as one more column named by it"
        stop_help = "every column stops with this trained stop policy version"
    else:
        config = "default: the --config file's [policies] {}, if any"
        router_help = (
            "route with this trained router (mode policy) version instead of a built-in "
            f"--mode (not both; {config.format('router')})"
        )
        stop_help = (
            "stop with this trained stop policy version instead of following the "
            f"reflection's verdict ({config.format('stop')})"
        )
    for flag, text, example in (
        ("--router", router_help, "router@3"),
        ("--stop", stop_help, "stop@2"),
    ):
        parser.add_argument(flag, metavar="REF", help=f"{text}: {ref.format(example)}directory")


def _check_versions(args: argparse.Namespace, store) -> tuple:
    """``--router`` and ``--stop`` resolved (``store``: where ``name@version`` is looked up;
    None: none exists); a bad reference is one ``CliError`` line, before anything runs."""
    from policies.deployed import VersionError, resolve_version

    if args.router is not None and getattr(args, "mode", None) is not None:
        raise CliError(
            f"--mode {args.mode} and --router {args.router} both choose the router: give one "
            "(--router replaces the built-in mode policy)"
        )
    try:
        return tuple(
            None if ref is None else resolve_version(ref, kind, store)
            for kind, ref in (("router", args.router), ("stop", args.stop))
        )
    except VersionError as exc:
        raise CliError(str(exc)) from None


def _lookup_store(args: argparse.Namespace):  # -> TrajectoryStore | None
    """For a command that records nothing: the store to look versions up in, if it exists."""
    url = store_url(args)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    return open_store(args)


def _check_config(path: Path | None, mode: str | None = None):  # -> BackendsConfig | None
    """The config at ``path``, validated (None without one); a note when ``--mode`` replaces
    the router its ``[policies]`` names."""
    if path is None:
        return None
    from pydantic import ValidationError

    from nodes.backends.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:  # already names the file and the bad key
        raise CliError(str(exc)) from None
    except (OSError, ValueError, ValidationError) as exc:
        raise CliError(f"bad config {path}: {exc}") from None
    if mode is not None and config.policies is not None and config.policies.router is not None:
        print(
            f"atelier: note: --mode {mode} replaces {path}'s [policies] router "
            f"({config.policies.router})",
            file=sys.stderr,
        )
    return config


def _check_store_failure(
    store, exc: BaseException, run_ref: str | None, run_id: str | None = None
) -> None:
    """Raise :class:`StoreUnavailable` naming the store if ``exc`` is the store failing; a
    store that cannot be written at all (read-only) is a :class:`CliError`. ``run_id``: the
    run being recorded, so that nobody is told to resume a run that was never created."""
    cause = _store_cause(exc)
    if cause is None:
        return
    reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    created = True if run_id is None else _run_state(store, run_id)
    resume = f"atelier resume {run_ref}" if run_ref else "atelier resume RUN"
    if is_read_only(cause):
        kept = (
            f" — every step recorded before is kept; once it can be written, `{resume}` "
            "finishes the run"
            if created
            else " — nothing was recorded"
        )
        raise CliError(f"the store {store.url} is read-only (cannot be written): {reason}{kept}")
    if created is False:  # it failed before the run row was written: nothing to resume
        raise StoreUnavailable(
            f"the store {store.url} became unavailable: {reason} — the run was not created, "
            "nothing was recorded; run the command again once the store is back"
        ) from None
    raise StoreUnavailable(
        f"the store {store.url} became unavailable: {reason} — every step recorded before "
        f"it went away is kept; once it is back, `{resume}` finishes the run"
    ) from None


def _check_read_only_store(store, exc: BaseException) -> None:
    """A :class:`CliError` if ``exc`` is the store refusing every write (``demo``: its runs are
    created as it starts, so a read-only store fails before anything is recorded)."""
    cause = _store_cause(exc)
    if cause is not None and is_read_only(cause):
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise CliError(
            f"the store {store.url} is read-only (cannot be written): {reason} — nothing was "
            "recorded; pass --no-record, or a --db that can be written"
        )


def _store_cause(exc: BaseException) -> BaseException | None:
    """The driver's error if ``exc`` is the store failing (else None)."""
    from sqlalchemy.exc import DBAPIError

    from agent_graph.recording import RecordingFailed
    from storage.engine import DatabaseLocked
    from storage.recorder import RecorderBroken

    if isinstance(exc, RecordingFailed) and exc.__cause__ is not None:
        exc = exc.__cause__
    if not isinstance(exc, (DBAPIError, DatabaseLocked, RecorderBroken)):
        return None
    return exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc


def _run_state(store, run_id: str) -> bool | None:
    """Whether run ``run_id`` exists in the store; None when the store cannot say (down)."""
    try:
        store.run(run_id)
    except KeyError:
        return False
    except Exception:  # the store itself is gone: the run may well exist
        return None
    return True


def _check_run_name_free(store, name: str | None) -> None:
    """Refuse a ``--name`` that an existing run already answers to (its name, or the start of
    its id): ``resume NAME``, ``ls --run NAME`` would otherwise silently mean one of them."""
    if name is None:
        return
    if not name.strip():
        raise CliError("--name is empty: give the run a name, or leave --name out")
    try:
        match = store.match_run(name)
    except KeyError:  # no run answers to it (or only an ambiguous id prefix, which a name beats)
        return
    taken = match.run
    if match.by == "name":
        created = when(taken.created_at)
        reason = f"a run named {name!r} already exists ({taken.id[:12]}, created {created})"
    else:
        reason = f"{name!r} is the start of run id {taken.id[:12]}, so it cannot name a run"
    raise CliError(f"{reason}; choose another --name, e.g. {_free_name(store, name)!r}")


def _free_name(store, name: str) -> str:
    """``name-2``, ``name-3``, … : the first that no run answers to."""
    for n in range(2, 1000):
        candidate = f"{name}-{n}"
        try:
            store.match_run(candidate)
        except KeyError:
            return candidate
    return f"{name}-{short_id(uuid.uuid4().hex)}"


def _run_recording(store, run_id: str, work, run_ref: str | None = None):
    """``asyncio.run(work)`` (its result) for a command that records run ``run_id``: a store
    failure is one line naming the store and the run to resume (``run_ref``, the name the
    user gave, else the id); Ctrl-C names the run by id, once the run exists."""
    try:
        return asyncio.run(work)
    except KeyboardInterrupt:
        raise Interrupted(run_id if _run_exists(store, run_id) else None) from None
    except Exception as exc:
        _check_store_failure(store, exc, run_ref or run_id, run_id)
        _check_backend_build_failure(exc)
        raise


def _check_backend_build_failure(exc: BaseException) -> None:
    """A backend the config names could not be built (an adapter that does not load, a model
    folder that is not a model): one line, exit 2, as for a config that does not parse."""
    from nodes.backends.config import ConfigError
    from policies.deployed import VersionError

    if isinstance(exc, (ConfigError, VersionError)):
        raise CliError(str(exc)) from None


def _run_exists(store, run_id: str) -> bool:
    try:
        store.run(run_id)
    except Exception:  # missing, or the store itself is gone: nothing to point at
        return False
    return True


def _check_output_path(path: Path, suffix: str | None = ".png", option: str = "--out") -> None:
    if suffix is not None and path.suffix.lower() != suffix:
        raise CliError(f"{option} must end in {suffix}: {path}")
    parent = path.parent if str(path.parent) else Path(".")
    try:  # a name the file system refuses (too long, …) raises here rather than answering
        if not parent.is_dir():
            raise CliError(f"cannot write {path}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise CliError(f"cannot write {path}: permission denied")
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Around writing an output file: an ``OSError`` (a full disk, a name the file system
    refuses) is one ``CliError`` line naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise CliError("the prompt is empty")
    if args.max_rounds < 0:
        raise CliError("--max-rounds must be 0 or more")
    if args.out is not None:
        _check_output_path(args.out)
    _check_config(args.config, args.mode)

    from pydantic import ValidationError

    from agent_graph.runner import Runner
    from nodes.state import Budget, Task

    try:
        task = Task(prompt=args.prompt, seed=args.seed)
        budget = Budget(max_rounds=args.max_rounds)
    except ValidationError as exc:
        raise CliError(exc.errors()[0]["msg"]) from None
    from agent_graph.show import print_trajectory

    if args.no_record:
        from agent_graph.deploy import deploy
        from storage.images import MemoryImageStore

        lookup = _lookup_store(args)
        router, stop = _check_versions(args, lookup)
        images = MemoryImageStore()

        async def work():
            deployment = await deploy(
                lookup, backends_config=args.config, mode=args.mode, router=router, stop=stop
            )
            return await Runner(deployment.context(images), budget=budget).run_one(task)

        try:
            result = asyncio.run(work())
        except Exception as exc:
            _check_backend_build_failure(exc)
            raise
    else:
        from agent_graph.rollout import rollout

        store = images = open_store(args, must_exist=False)
        router, stop = _check_versions(args, store)
        run_id = uuid.uuid4().hex
        work = rollout(
            store,
            [task],
            mode=args.mode,
            router=router,
            stop=stop,
            budget=budget,
            name="run",
            keep_steps=True,
            backends_config=args.config,
            run_id=run_id,
        )
        result = _run_recording(store, run_id, work).results[0]
    print_trajectory(result)
    if not args.no_record:
        print(f"recorded as {result.trajectory_id} in {store.url}")
    if result.status != "succeeded":
        return 1
    if args.out is not None and result.state and result.state.final_image:
        with _writing(args.out):
            images.get(result.state.final_image).save(args.out)
        print(f"saved {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.per_category < 1:
        raise CliError("--per-category must be at least 1")
    if args.concurrency < 1:
        raise CliError("--concurrency must be at least 1")
    if args.markdown is not None:  # before the demo runs, not after
        _check_output_path(args.markdown, None, "--markdown")
    from rich.console import Console

    from agent_graph.demo import render_report, report_markdown, run_demo

    console = Console()
    store = None if args.no_record else open_store(args, must_exist=False)
    router, stop = _check_versions(args, store if store is not None else _lookup_store(args))
    freeze_startup_heap()
    try:
        report = asyncio.run(
            run_demo(
                args.per_category,
                args.seed,
                concurrency=args.concurrency,
                progress=console.is_terminal,
                store=store,
                router=router,
                stop=stop,
            )
        )
    except Exception as exc:
        if store is not None:
            _check_read_only_store(store, exc)
        _check_backend_build_failure(exc)
        raise
    console.print(render_report(report))
    routers = [("auto", "auto (rule-based router)")]
    if router is not None:
        routers.append((router.label, router.label))
    for column, label in routers:
        mix = ", ".join(f"{m} {count}" for m, count in sorted(report.mode_mix[column].items()))
        console.print(f"{label} chose: {mix}")
    if stop is not None:
        console.print(f"every column stopped with {stop.label}")
    if args.markdown:
        with _writing(args.markdown):
            args.markdown.write_text(report_markdown(report) + "\n")
        console.print(f"wrote {args.markdown}")
    if store is not None:
        console.print(
            f"recorded every trajectory in {store.url}: try `atelier runs`, "
            "`atelier ls --run demo-decompose`, `atelier view demo-auto`"
        )
    return 0


def rollout_plan(args: argparse.Namespace) -> tuple[list, Any, Any, Any, Any, str | None]:
    """What ``rollout`` (and ``rollout --register-only``) will record, checked before anything
    is: (tasks, budget, store, router, stop, mode)."""
    for name in ("per_category", "group_size", "concurrency"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be at least 1")
    from pydantic import ValidationError

    from agent_graph.runner import make_group_tasks
    from nodes.state import Budget

    if args.prompts is not None:
        try:
            lines = args.prompts.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read {args.prompts}: {exc}") from None
        prompts, categories = [line for line in lines if line.strip()], None
        if not prompts:
            raise CliError(f"{args.prompts} holds no prompt")
    else:
        from nodes.backends.shapeworld import fixed_prompt_set

        items = fixed_prompt_set(args.per_category, seed=args.seed)
        prompts, categories = [i.text for i in items], [i.category for i in items]
    try:
        tasks = make_group_tasks(prompts, args.group_size, args.seed, categories)
        budget = Budget(max_rounds=args.max_rounds)
    except ValidationError as exc:
        raise CliError(exc.errors()[0]["msg"]) from None
    config = _check_config(args.config, args.mode)
    store = open_store(args, must_exist=False)
    _check_run_name_free(store, args.name)
    router, stop = _check_versions(args, store)
    mode = args.mode
    named = config is not None and config.policies is not None and config.policies.router
    if mode is None and router is None and not named:
        mode = "random"  # exploration, unless the config names a router version
    return tasks, budget, store, router, stop, mode


def cmd_rollout(args: argparse.Namespace) -> int:
    from agent_graph.rollout import rollout

    tasks, budget, store, router, stop, mode = rollout_plan(args)
    run_id = uuid.uuid4().hex
    freeze_startup_heap()
    work = rollout(
        store,
        tasks,
        mode=mode,
        router=router,
        stop=stop,
        budget=budget,
        name=args.name,
        concurrency=args.concurrency,
        progress=sys.stderr.isatty(),
        backends_config=args.config,
        keep_groups_together=args.keep_groups_together,
        run_id=run_id,
    )
    outcome = _run_recording(store, run_id, work, args.name)
    results = outcome.results
    correct = sum(r.correct for r in results)
    print(f"run {run_id}: {len(results)} trajectories, {_outcome(results)}, {correct} correct")
    _print_requests(outcome.requests)
    return _exit_status(results, run_id)


def _outcome(results) -> str:
    """``8 succeeded`` or ``6 succeeded, 2 failed``."""
    failed = sum(r.status != "succeeded" for r in results)
    ok = len(results) - failed
    return f"{ok} succeeded" + (f", {failed} failed" if failed else "")


def _exit_status(results, run_id: str) -> int:
    """1 when every trajectory failed (nothing usable was recorded: a server down, a bad
    config), with the first error; 0 otherwise, the summary line having counted failures."""
    if not results or any(r.status == "succeeded" for r in results):
        return 0
    first = next((r.error for r in results if r.error), "unknown error")
    first = " ".join(str(first).split())
    print(
        f"atelier: error: all {len(results)} trajectories failed; the first: "
        f"{first[:300]} (`atelier ls --run {run_id[:12]} --status failed` lists them)",
        file=sys.stderr,
    )
    return 1


def _print_requests(requests: dict[str, dict[str, int]]) -> None:
    """The HTTP backends' summary line (nothing for ShapeWorld or in-process backends)."""
    if requests:
        from nodes.backends.clients.pool import describe_counters

        print(f"backends: {describe_counters(requests)}")


def cmd_runs(args: argparse.Namespace) -> int:
    from rich.console import Console

    store = open_store(args)
    runs = store.runs()
    console = Console()
    console.print(_runs_table(runs, f"runs in {store.url}", console.width))
    shared = _shared_names(runs)
    if shared:
        console.print(shared, soft_wrap=True, highlight=False, markup=False)
    if args.curves:
        from atelier.cli.curves import print_series
        from storage.analysis import training_series

        print(flush=True)
        print_series(training_series(store))
    return 0


def _runs_table(runs: list, title: str, width: int):  # -> rich.table.Table
    """One line per run, whatever its config holds (a Tree-RL run lists hundreds of parents):
    nothing wraps, the id is never clipped, and the config summary takes only the width the
    other columns leave."""
    from rich.markup import escape
    from rich.table import Table

    headers = ("id", "name", "created", "status", "trajectories")
    rows = [
        [run.id[:12], run.name, when(run.created_at), run.status, str(run.trajectory_count)]
        for run in runs
    ]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    config_width = max(width - sum(widths) - 3 * (len(headers) + 1) - 1, 12)
    table = Table(title=title)
    table.add_column("id", no_wrap=True, min_width=12)  # users copy it
    for header in headers[1:]:
        table.add_column(header, no_wrap=True, overflow="ellipsis")
    table.add_column("config", no_wrap=True, overflow="ellipsis", max_width=config_width)
    for run, row in zip(runs, rows, strict=True):
        table.add_row(*(escape(cell) for cell in (*row, config_summary(run.config))))
    return table


def _shared_names(runs: list) -> str | None:
    """A line naming the names several runs share (``demo-auto`` after two demos), if any."""
    from collections import Counter

    shared = sorted((name, n) for name, n in Counter(run.name for run in runs).items() if n > 1)
    if not shared:
        return None
    names = ", ".join(f"{name} ×{n}" for name, n in shared)
    return f"shared names: {names}: a name means its newest run; pass an id (prefix) for another"


_CONFIG_ALIASES = {"group_size": "G"}
_CONFIG_VALUE_CHARS = 24


def config_summary(config: dict, *, nested: bool = True) -> str:
    """A run's config in a few words: scalars as ``key=value`` (clipped, paths by their file
    name), lists and dicts as their size (``forks: 212``); one level of small dicts shown as
    ``key(...)``. The budget is left out (every run has one)."""
    return ", ".join(
        _config_item(key, value, nested) for key, value in config.items() if key != "budget"
    )


def _config_item(key: str, value, nested: bool) -> str:
    key = _CONFIG_ALIASES.get(key, key)
    if isinstance(value, dict) and nested and 0 < len(value) <= 6:
        return f"{key}({config_summary(value, nested=False)})"
    if isinstance(value, (dict, list, tuple)):
        return f"{key}: {len(value)}"
    text = str(value)
    if isinstance(value, str) and "/" in text:
        text = Path(text).name or text  # a resolved config path: its file names it
    if len(text) > _CONFIG_VALUE_CHARS:
        text = text[: _CONFIG_VALUE_CHARS - 1] + "…"
    return f"{key}={text}"


def cmd_ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    store = open_store(args)
    run = resolve_run(store, args.run).id if args.run else None
    filters = {"run": run, "status": args.status, "mode": args.mode, "min_reward": args.min_reward}
    rows = store.trajectories(**filters, limit=args.limit)
    if args.ids:
        for t in rows:
            print(t.id)
        return 0
    # Fewer rows than the limit are all there is; only a full page needs the count.
    total = len(rows) if len(rows) < args.limit else store.count_trajectories(**filters)
    title = f"{len(rows)} of {total} trajectories" if total > len(rows) else f"{total} trajectories"
    if run:
        title += f" of run {run[:12]}"
    if total > len(rows):
        title += f" (--limit {args.limit})"
    table = Table(title=title)
    table.add_column("id", no_wrap=True, min_width=12)  # never clipped: `show` takes it
    for column in ("prompt", "mode", "status", "images", "score", "correct"):
        table.add_column(column)
    for t in rows:
        score = "" if t.score is None else f"{t.score:.2f}"
        table.add_row(
            short_id(t.id),
            escape(t.prompt[:60]),
            t.mode or "",
            t.status,
            str(t.image_count),
            score,
            "" if t.correct is None else ("yes" if t.correct else "no"),
        )
    Console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from agent_graph.show import print_stored_trajectory
    from storage.store import TrajectoryNotFound

    store = open_store(args)
    try:
        trajectory = store.trajectory(store.resolve_trajectory(args.id))
    except TrajectoryNotFound as exc:
        raise CliError(str(exc.args[0]) if exc.args else str(exc)) from None
    print_stored_trajectory(trajectory, full=args.full)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from storage.store import TrajectoryNotFound
    from storage.viewer import write_html

    if args.limit < 1:
        raise CliError("--limit must be at least 1")
    store = open_store(args)
    out = args.out or Path(f"atelier-{args.ref[:16]}.html")
    _check_output_path(out, ".html")
    try:
        trajectory_ids = [store.resolve_trajectory(args.ref)]
        run = None
    except TrajectoryNotFound:
        trajectory_ids, run = None, resolve_run(store, args.ref).id
    # The trajectory asked for opens expanded (a run's page opens as a grid of cards).
    with _writing(out):
        write_html(
            store,
            out,
            run=run,
            trajectory_ids=trajectory_ids,
            expanded=trajectory_ids or (),
            limit=args.limit,
        )
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from storage import export

    store = open_store(args)
    run = resolve_run(store, args.run).id if args.run else None
    _check_output_path(args.out, f".{args.format}")
    write = export.export_jsonl if args.format == "jsonl" else export.export_parquet
    try:
        with _writing(args.out):
            count = write(store, args.out, run=run, images=args.images)
    except (ImportError, ValueError) as exc:  # no pyarrow; stored bytes that fail their hash
        raise CliError(str(exc)) from None
    print(f"wrote {count} {'trajectories' if args.format == 'jsonl' else 'steps'} to {args.out}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from agent_graph.rollout import resume_run

    store = open_store(args)
    run = resolve_run(store, args.run)
    if args.concurrency < 1:
        raise CliError("--concurrency must be at least 1")
    freeze_startup_heap()
    work = resume_run(
        store,
        run.id,
        router=args.router,
        stop=args.stop,
        concurrency=args.concurrency,
        progress=sys.stderr.isatty(),
    )
    try:
        outcome = _run_recording(store, run.id, work, args.run)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    results = outcome.results
    print(f"run {run.id}: resumed {len(results)} trajectories, {_outcome(results)}")
    _print_requests(outcome.requests)
    return _exit_status(results, run.id)


def cmd_graph(args: argparse.Namespace) -> int:
    from agent_graph.graph import build_reasoner

    print(build_reasoner().get_graph().draw_mermaid())
    return 0
