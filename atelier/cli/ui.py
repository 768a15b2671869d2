"""``atelier ui``: the trace UI, a local web app over the live store (``atelier.ui``).

    atelier ui                              # http://127.0.0.1:8780 over ./atelier.db
    atelier ui --db postgresql://h/atelier --port 9000 --token "$(openssl rand -hex 16)"

argparse only at import; Starlette and uvicorn load when it serves. Bound to 127.0.0.1 by
default; any other address needs a token (``--token`` or ``$ATELIER_UI_TOKEN``), since the pages
show every recorded prompt, output and image.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from atelier.cli.errors import CliError

TOKEN_ENV = "ATELIER_UI_TOKEN"
DEFAULT_PORT = 8780


def add_ui_parser(commands: Any, add_db: Any) -> argparse.ArgumentParser:
    ui = commands.add_parser(
        "ui", help="browse the store in a local web app (runs, groups, training curves)"
    )
    add_db(ui)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    ui.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"(default: {DEFAULT_PORT}; 0: any free)"
    )
    ui.add_argument(
        "--token",
        default=None,
        help=f"require this token (default: ${TOKEN_ENV} if set; none on 127.0.0.1; needed "
        "beyond it): open the printed link once, or send 'Authorization: Bearer TOKEN'",
    )
    ui.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a tokenizer folder (the model's, saved with save_pretrained): the log-prob pages "
        "show each token's text instead of its id",
    )
    ui.set_defaults(handler=cmd_ui)
    return ui


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _token(args: argparse.Namespace) -> str | None:
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and (not token.strip() or len(token) < 8 or not token.isprintable()):
        raise CliError("--token must be at least 8 printable characters")
    if token is None and not is_loopback(args.host):
        raise CliError(
            f"--host {args.host} would show every stored prompt and image to the network: "
            f"set --token (or ${TOKEN_ENV}), e.g. --token {secrets.token_hex(16)}"
        )
    return token


def _load_tokenizer(folder: Path | None) -> Any:
    if folder is None:
        return None
    if not folder.is_dir():
        raise CliError(f"--tokenizer {folder}: no such folder")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except ImportError:
        raise CliError("--tokenizer needs transformers: pip install 'atelier[models]'") from None
    except Exception as exc:  # not a tokenizer folder, a broken file
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CliError(f"--tokenizer {folder} holds no tokenizer: {line}") from None


def cmd_ui(args: argparse.Namespace) -> int:
    from atelier.cli.common import open_store, safe_url

    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be between 0 and 65535, not {args.port}")
    token = _token(args)
    try:
        import uvicorn

        from atelier.ui.app import LOOPBACK_HOSTS, create_app
    except ImportError as exc:
        raise CliError(f"atelier ui needs {exc.name}: pip install 'atelier[ui]'") from None
    tokenizer = _load_tokenizer(args.tokenizer)
    store = open_store(args)
    _catch_up(store)
    hosts = [*LOOPBACK_HOSTS] if is_loopback(args.host) else None
    app = create_app(store, token=token, tokenizer=tokenizer, allowed_hosts=hosts)
    sock = _bind(args.host, args.port)  # here, so a taken port is one error line
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    if ":" in shown_host:
        shown_host = f"[{shown_host}]"
    link = f"http://{shown_host}:{port}/" + (f"?token={token}" if token else "")
    print(f"atelier ui: serving {safe_url(store.url)} at {link} (Ctrl-C stops)", flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal: stopping the
    # UI is its normal end, so both exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    return 0


def _catch_up(store: Any) -> None:
    """Index the texts recorded since the last search now, not on the first search (SQLite)."""
    from storage.search import catch_up_search_index

    try:
        count = catch_up_search_index(store)
    except Exception as exc:  # a store the search cannot read: the pages say so later
        raise CliError(f"cannot index the store's texts for search: {exc}") from None
    if count:
        print(f"atelier ui: indexed {count:,} new texts for search", flush=True)


def _bind(host: str, port: int):  # -> socket.socket
    import socket

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:  # the port is taken, the address is not this machine's
        sock.close()
        raise CliError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
