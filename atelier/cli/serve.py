"""Command-line entry points of Atelier's model servers (``atelier serve lm|image``) and of
``atelier tiny-models DIR`` (tiny random-weight models to try them with).

Only argparse is imported here; torch, transformers, diffusers, FastAPI and uvicorn load when a
server starts, so ``--help`` is instant. Wire into a CLI with :func:`add_serve_parser` (each
sub-command sets ``handler``), or call :func:`serve_main`, :func:`main_lm`, :func:`main_image`.

    atelier tiny-models /tmp/atelier-tiny
    atelier serve lm --model /tmp/atelier-tiny/vlm --port 8000 --max-batch 8
    atelier serve image --model /tmp/atelier-tiny/sd --edit-model /tmp/atelier-tiny/ip2p --steps 2

A missing or wrong model folder, or a model that does not load, is an
``atelier.cli.errors.CliError``: one ``atelier: error:`` line and exit code 2, no traceback; so is
a bad ``--lora``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from atelier.cli.errors import CliError

TOKEN_ENV = "ATELIER_SERVER_TOKEN"
TINY_CONFIG = "examples/configs/tiny-models.toml"

log = logging.getLogger(__name__)


def _cli_error(message: str) -> Exception:
    """``atelier.cli.errors.CliError`` (printed as one line, exit code 2 by ``atelier``)."""
    return CliError(message)


def _common(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument(
        "--model", required=True, help="model directory (saved with save_pretrained)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=default_port, help=f"(default: {default_port})")
    parser.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV} if set, else none)",
    )
    parser.add_argument("--served-model-name", default=None, help="model name (default: --model)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, auto (default)")
    parser.add_argument(
        "--dtype", default="auto", help="auto (default), float32, bfloat16, float16"
    )
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch (default: 8)")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long to collect a batch after its first request (default: 5)",
    )
    parser.add_argument(
        "--max-body-mb", type=float, default=32.0, help="request size limit, MiB (default: 32)"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="largest accepted image, width*height (default: 16777216)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="intra-op torch threads of the model's worker thread (default: torch's choice)",
    )
    parser.add_argument(
        "--max-request-pixels",
        type=int,
        default=4096 * 4096,
        help="most decoded input pixels over all images of one request (default: 16777216)",
    )
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help="most prompt characters per request, checked before tokenising (default: lm, "
        "32 per token of the model's context; image, 16384)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        help="seconds a request's model work may take; then it is cancelled and answered 504 "
        "(default: 300; 0: no deadline)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests waiting or running beyond which new ones get 503 + Retry-After "
        "(default: 64; 0: unbounded)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=int,
        default=30,
        help="on SIGTERM, seconds running requests may finish before they are cancelled "
        "(default: 30)",
    )
    parser.add_argument(
        "--no-runtime-lora",
        action="store_true",
        help="no /v1/load_lora_adapter or /v1/unload_lora_adapter (always off when the server "
        "binds beyond loopback without a token)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")


def add_lm_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, 8000)
    parser.add_argument(
        "--max-tokens", type=int, default=256, help="default max_tokens per request (default: 256)"
    )
    parser.add_argument(
        "--max-tokens-limit", type=int, default=4096, help="largest max_tokens allowed"
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="load a LoRA adapter at start-up (repeatable)",
    )


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser, 8001)
    parser.add_argument("--edit-model", default=None, help="separate editing pipeline directory")
    parser.add_argument("--steps", type=int, default=None, help="default num_inference_steps")
    parser.add_argument(
        "--size",
        default=None,
        help="image size of a request that gives none (default: the model's native size, e.g. "
        "512x512 for SD 1.5, 1024x1024 for SD3)",
    )
    parser.add_argument(
        "--max-size",
        default=None,
        metavar="WxH",
        help="largest image a request may ask for, as its pixel count W*H (default: the model's "
        "native size on CPU, e.g. 512x512 for SD 1.5; twice its side on a GPU)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=100, help="most num_inference_steps (default: 100)"
    )
    parser.add_argument(
        "--max-images", type=int, default=4, help="largest n in one request (default: 4)"
    )
    parser.add_argument(
        "--lora",
        default=None,
        metavar="NAME=PATH",
        help="load a diffusion LoRA (peft layout) at start-up; it serves every request",
    )


def add_serve_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``serve {lm,image}`` and ``tiny-models`` to an argparse sub-parsers object; each
    sets ``handler``."""
    serve = commands.add_parser("serve", help="run a model server (lm or image)")
    kinds = serve.add_subparsers(dest="server", required=True, metavar="SERVER")
    lm = kinds.add_parser("lm", help="a transformers chat model behind the OpenAI/vLLM chat API")
    add_lm_arguments(lm)
    lm.set_defaults(handler=run_lm)
    image = kinds.add_parser("image", help="a diffusers model behind the vLLM-Omni image API")
    add_image_arguments(image)
    image.set_defaults(handler=run_image)
    add_tiny_models_parser(commands)
    return serve


def add_tiny_models_parser(commands: Any) -> argparse.ArgumentParser:
    tiny = commands.add_parser(
        "tiny-models",
        help="build tiny random-weight models to try the real-model path offline",
        description="Build tiny random-weight models offline in a few seconds: DIR/lm (Qwen2), "
        "DIR/vlm (LLaVA), DIR/sd (Stable Diffusion), DIR/ip2p (InstructPix2Pix). Their "
        "outputs are noise; the plumbing is real. Needs the model extras "
        "(pip install -e '.[models,serve]').",
    )
    tiny.add_argument("dir", type=Path, help="folder to build them in, e.g. /tmp/atelier-tiny")
    tiny.set_defaults(handler=run_tiny_models)
    return tiny


def _limits(args: argparse.Namespace) -> Any:
    """The flags as :class:`ServerLimits`; a limit that is not positive is one error line."""
    from nodes.backends.servers.http_common import ServerLimits
    from nodes.backends.wire import parse_size

    positive = {
        "--max-batch": args.max_batch,
        "--max-body-mb": args.max_body_mb,
        "--max-image-pixels": args.max_image_pixels,
        "--max-request-pixels": args.max_request_pixels,
        "--max-prompt-chars": 1 if args.max_prompt_chars is None else args.max_prompt_chars,
        "--max-steps": getattr(args, "max_steps", 1),
        "--max-images": getattr(args, "max_images", 1),
    }
    for flag, value in positive.items():
        if not value > 0:
            raise _cli_error(f"{flag} must be positive, got {value:g}")
    at_least_zero = {
        "--request-timeout": args.request_timeout,
        "--max-queue": args.max_queue,
        "--drain-timeout": args.drain_timeout,
    }
    for flag, value in at_least_zero.items():
        if value < 0:
            raise _cli_error(f"{flag} must be 0 (off) or positive, got {value:g}")
    output_pixels = None
    if getattr(args, "max_size", None):
        try:
            width, height = parse_size(args.max_size)
        except ValueError as error:
            raise _cli_error(f"--max-size: {error}") from None
        output_pixels = width * height
    return ServerLimits(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        max_prompt_chars=args.max_prompt_chars,
        request_timeout_s=args.request_timeout or None,
        max_queue=args.max_queue or None,
        max_output_pixels=output_pixels,
        max_steps=getattr(args, "max_steps", 100),
        max_images_per_generation=getattr(args, "max_images", 4),
    )


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _runtime_lora(args: argparse.Namespace) -> bool:
    """Whether the LoRA endpoints are on: not with --no-runtime-lora, and not on a bind beyond
    loopback without a token (anyone who reaches the port could load files from this
    machine's disk into the model)."""
    if args.no_runtime_lora:
        return False
    if args.host not in LOOPBACK_HOSTS and not _token(args):
        log.warning(
            "runtime LoRA loading is off: --host %s is reachable beyond this machine and no "
            "--token is set",
            args.host,
        )
        return False
    return True


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get(TOKEN_ENV) or None


def _check_model(option: str, path: str | None, problem: Callable[[str], str | None]) -> None:
    if path is None:
        return
    from nodes.backends.model_dirs import looks_like_hub_id

    if looks_like_hub_id(path):
        return  # org/name: from_pretrained finds it in the hub cache (or says why not)
    found = problem(path)
    if found:
        raise _cli_error(f"{option}: {found}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _load(what: str, load: Callable[[], Any]) -> Any:
    """``load()``, any failure a one-line :func:`_cli_error` (the traceback at debug level)."""
    try:
        return load()
    except ImportError as error:
        raise _cli_error(
            f"cannot load {what}: {_first_line(error)} (install the model extras: "
            "pip install -e '.[models,serve]')"
        ) from None
    except Exception as error:  # transformers/diffusers/torch raise many kinds
        log.debug("loading %s failed", what, exc_info=True)
        raise _cli_error(f"cannot load {what}: {_first_line(error)}") from None


def _lora_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise _cli_error(f"--lora expects NAME=PATH, got {spec!r}")
    return name, path


def build_lm_app(args: argparse.Namespace) -> Any:
    from nodes.backends.model_dirs import lm_dir_problem

    _check_model("--model", args.model, lm_dir_problem)
    limits = _limits(args)
    loras = [_lora_spec(spec) for spec in args.lora]
    from nodes.backends.engines.lm_inprocess import LMService
    from nodes.backends.servers.lm_server import create_lm_app

    service = _load(
        f"--model {args.model}",
        lambda: LMService.from_pretrained(
            args.model,
            name=args.served_model_name,
            device=args.device,
            dtype=args.dtype,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            torch_threads=args.torch_threads,
        ),
    )
    for name, path in loras:
        try:
            service.engine.load_adapter(name, path)
        except ValueError as error:  # InvalidRequest: says what is wrong with it
            raise _cli_error(f"--lora: {error}") from None
    return create_lm_app(
        service,
        token=_token(args),
        limits=limits,
        default_max_tokens=args.max_tokens,
        max_tokens_limit=args.max_tokens_limit,
        runtime_lora=_runtime_lora(args),
    )


def build_image_app(args: argparse.Namespace) -> Any:
    from nodes.backends.model_dirs import image_dir_problem
    from nodes.backends.wire import parse_size

    _check_model("--model", args.model, image_dir_problem)
    _check_model("--edit-model", args.edit_model, image_dir_problem)
    try:
        default_size = None if args.size is None else parse_size(args.size)
    except ValueError as error:
        raise _cli_error(f"--size: {error}") from None
    limits = _limits(args)
    lora = _lora_spec(args.lora) if args.lora else None
    from nodes.backends.engines.image_inprocess import ImageService
    from nodes.backends.servers.image_server import create_image_app

    service = _load(
        f"--model {args.model}",
        lambda: ImageService.from_pretrained(
            args.model,
            edit_model_dir=args.edit_model,
            name=args.served_model_name,
            device=args.device,
            dtype=args.dtype,
            default_steps=args.steps,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            torch_threads=args.torch_threads,
        ),
    )
    if lora is not None:
        try:
            service.engine.load_adapter(*lora)
        except ValueError as error:
            raise _cli_error(f"--lora: {error}") from None
    try:
        return create_image_app(
            service,
            token=_token(args),
            limits=limits,
            default_size=default_size,
            runtime_lora=_runtime_lora(args),
        )
    except ValueError as error:  # --size beyond the output limit
        raise _cli_error(f"--size: {error}; raise --max-size or give a smaller --size") from None


def run_lm(args: argparse.Namespace) -> int:
    from nodes.backends.servers.http_common import serve_forever

    serve_forever(build_lm_app(args), args.host, args.port, args.log_level, args.drain_timeout)
    return 0


def run_image(args: argparse.Namespace) -> int:
    from nodes.backends.servers.http_common import serve_forever

    app = build_image_app(args)
    serve_forever(app, args.host, args.port, args.log_level, args.drain_timeout)
    return 0


def run_tiny_models(args: argparse.Namespace) -> int:
    from nodes.backends.engines.tiny_models import (
        build_all,
        build_sd3,
        missing_packages,
        quiet_progress_bars,
    )

    missing = missing_packages()
    if missing:
        raise _cli_error(
            f"the tiny models need {', '.join(missing)}: install the model extras with "
            "pip install -e '.[models,serve]' (or `make install-dev`)"
        )
    root = args.dir.expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise _cli_error(f"{args.dir} is a file, not a folder")
    started = time.perf_counter()
    quiet_progress_bars()
    try:
        models = build_all(root)
        sd3 = build_sd3(root / "sd3")  # flow matching: the README's Flow-GRPO example
    except OSError as error:
        raise _cli_error(f"cannot build in {root}: {error.strerror or error}") from None
    took = time.perf_counter() - started
    print(f"built tiny random-weight models in {root} ({took:.1f} s):")
    for kind in ("lm", "vlm", "sd", "ip2p"):
        print(f"  {getattr(models, kind)}")
    print(f"  {sd3}")
    print("try them in-process:")
    print(
        f'  ATELIER_TINY_MODELS={root} atelier run "a red circle" --mode reflect '
        f"--config {TINY_CONFIG} --no-record"
    )
    print("or behind Atelier's servers (examples/configs/tiny-servers.toml):")
    print(f"  atelier serve lm --model {models.vlm} --port 8000 --torch-threads 1")
    print(
        f"  atelier serve image --model {models.sd} --edit-model {models.ip2p} --port 8001 "
        "--steps 2 --size 64x64 --torch-threads 1"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atelier", description="Atelier's model servers")
    add_serve_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``serve_main(["lm", "--model", DIR])`` / ``serve_main(["image", ...])``."""
    from atelier.cli import CliError

    args = build_parser().parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.handler(args) or 0)
    except CliError as error:  # as `atelier` prints it
        print(f"atelier: error: {error}", file=sys.stderr)
        return 2


def main_lm(argv: Sequence[str] | None = None) -> int:
    return serve_main(["lm", *(sys.argv[1:] if argv is None else argv)])


def main_image(argv: Sequence[str] | None = None) -> int:
    return serve_main(["image", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # python -m atelier.cli.serve lm --model DIR
    raise SystemExit(serve_main())
