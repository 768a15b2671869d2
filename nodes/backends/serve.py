"""Command-line entry points of Atelier's model servers (``atelier serve lm|image``).

Only argparse is imported here; torch, transformers, diffusers, FastAPI and uvicorn load when a
server starts, so ``--help`` is instant. Wire into a CLI with :func:`add_serve_parser` (each
sub-command sets ``handler``), or call :func:`serve_main`, :func:`main_lm`, :func:`main_image`.

    atelier serve lm --model ./tiny/vlm --port 8000 --max-batch 8
    atelier serve image --model ./tiny/sd --edit-model ./tiny/ip2p --port 8001 --steps 4
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

TOKEN_ENV = "ATELIER_SERVER_TOKEN"


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
    parser.add_argument("--size", default="512x512", help="default image size (default: 512x512)")
    parser.add_argument(
        "--lora",
        default=None,
        metavar="NAME=PATH",
        help="load a diffusion LoRA (peft layout) at start-up; it serves every request",
    )


def add_serve_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``serve {lm,image}`` to an argparse sub-parsers object; each sets ``handler``."""
    serve = commands.add_parser("serve", help="run a model server (lm or image)")
    kinds = serve.add_subparsers(dest="server", required=True, metavar="SERVER")
    lm = kinds.add_parser("lm", help="a transformers chat model behind the OpenAI/vLLM chat API")
    add_lm_arguments(lm)
    lm.set_defaults(handler=run_lm)
    image = kinds.add_parser("image", help="a diffusers model behind the vLLM-Omni image API")
    add_image_arguments(image)
    image.set_defaults(handler=run_image)
    return serve


def _limits(args: argparse.Namespace) -> Any:
    from nodes.backends.http_common import ServerLimits

    return ServerLimits(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
    )


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get(TOKEN_ENV) or None


def build_lm_app(args: argparse.Namespace) -> Any:
    from nodes.backends.lm_inprocess import LMService
    from nodes.backends.lm_server import create_lm_app

    service = LMService.from_pretrained(
        args.model,
        name=args.served_model_name,
        device=args.device,
        dtype=args.dtype,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        torch_threads=args.torch_threads,
    )
    for spec in args.lora:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora expects NAME=PATH, got {spec!r}")
        service.engine.load_adapter(name, path)
    return create_lm_app(
        service,
        token=_token(args),
        limits=_limits(args),
        default_max_tokens=args.max_tokens,
        max_tokens_limit=args.max_tokens_limit,
    )


def build_image_app(args: argparse.Namespace) -> Any:
    from nodes.backends.image_inprocess import ImageService
    from nodes.backends.image_server import create_image_app
    from nodes.backends.wire import parse_size

    service = ImageService.from_pretrained(
        args.model,
        edit_model_dir=args.edit_model,
        name=args.served_model_name,
        device=args.device,
        dtype=args.dtype,
        default_steps=args.steps,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        torch_threads=args.torch_threads,
    )
    if args.lora:
        name, sep, path = args.lora.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora expects NAME=PATH, got {args.lora!r}")
        try:
            service.engine.load_adapter(name, path)
        except ValueError as error:
            raise SystemExit(f"--lora: {error}") from None
    return create_image_app(
        service, token=_token(args), limits=_limits(args), default_size=parse_size(args.size)
    )


def run_lm(args: argparse.Namespace) -> int:
    from nodes.backends.http_common import serve_forever

    serve_forever(build_lm_app(args), args.host, args.port, args.log_level)
    return 0


def run_image(args: argparse.Namespace) -> int:
    from nodes.backends.http_common import serve_forever

    serve_forever(build_image_app(args), args.host, args.port, args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atelier", description="Atelier's model servers")
    add_serve_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``serve_main(["lm", "--model", DIR])`` / ``serve_main(["image", ...])``."""
    args = build_parser().parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args) or 0)


def main_lm(argv: Sequence[str] | None = None) -> int:
    return serve_main(["lm", *(sys.argv[1:] if argv is None else argv)])


def main_image(argv: Sequence[str] | None = None) -> int:
    return serve_main(["image", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # python -m nodes.backends.serve lm --model DIR
    raise SystemExit(serve_main())
