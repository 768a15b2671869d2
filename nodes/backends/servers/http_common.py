"""What Atelier's HTTP servers share: bearer-token auth, request size limits, JSON errors, the
LoRA load/unload body, bounded work per request, and running uvicorn in the foreground or on a
background thread (tests, notebooks).

Errors are OpenAI-shaped: ``{"error": {"message": ..., "type": ..., "code": <status>}}``, for
every status (404 and 405 included; an unexpected failure is a JSON 500, never plain text).
``/health`` is open (load balancers probe it); every other path needs the token when one is set.

Bounded work (:class:`ServerLimits`, set by the deployer): the body size, decoded pixels per
image and per request, images per request, prompt characters (checked before tokenising), and a
deadline per request. The model's queue is bounded too: a request beyond ``max_queue`` is a 503
with ``Retry-After``. :func:`run_bounded` runs a request's model work so that a client that
disconnects, a deadline that passes (504) or a server shutting down cancels it; the batch stops
between model steps once nobody waits for it (:mod:`nodes.backends.abandon`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nodes.backends.engines.batching import DeadlineExceeded, Overloaded
from nodes.backends.wire import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_JSON_DEPTH = 32
"""Deepest JSON nesting a request may have (a chat request needs 5; deeper is a 400)."""


@dataclass(frozen=True)
class ServerLimits:
    """What one request may cost; every limit beyond which a request is refused with a 4xx
    saying which. Defaults fit a model on one device; ``atelier serve`` sets them from flags."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body; more is answered 413."""
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    """Largest decoded input image (width × height); more is answered 400."""
    max_images_per_request: int = 16
    """Most input images in one request (chat image parts, edit uploads)."""
    max_request_pixels: int = DEFAULT_MAX_PIXELS
    """Most decoded input pixels over all the images of one request (16 small PNGs can each
    decode to the per-image limit: 16 × 4096² RGB is 800 MB)."""
    max_prompt_chars: int | None = None
    """Most characters of prompt text in one request, checked before tokenising (None: the
    server's default, from the model's context for the lm server)."""
    request_timeout_s: float | None = 300.0
    """Deadline of one request's model work, from the start of its batch (waiting in the queue
    is bounded by ``max_queue``); past it the work is cancelled and the answer is 504 (None: no
    deadline)."""
    max_queue: int | None = 64
    """Requests waiting or running in the model's queue beyond which a new one is answered 503
    with ``Retry-After`` (None: unbounded)."""
    max_output_pixels: int | None = None
    """Image server: the largest image generated (width × height; None: by device, see
    :func:`~nodes.backends.servers.image_server.default_output_pixels`)."""
    max_steps: int = 100
    """Image server: the most ``num_inference_steps`` a request may ask for."""
    max_images_per_generation: int = 4
    """Image server: the largest ``n``."""


class LoraBody(BaseModel):
    """``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, as vLLM takes them."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_path: str | None = None
    load_inplace: bool = False


class HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}},
        status_code=status,
        headers=headers,
    )


async def _send_json(send: Send, status: int, message: str, kind: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Bearer-token check and request body limit, before anything reads the body."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        max_body_bytes: int,
        open_paths: Iterable[str] = ("/health",),
    ) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token and scope["path"] not in self.open_paths:
            # The scheme is case-insensitive (RFC 9110 §11.1): "bearer" is as good as "Bearer".
            scheme, _, given = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self.token.encode()
            ):
                await _send_json(send, 401, "missing or wrong bearer token", "unauthorized")
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _send_json(send, 413, self._too_large_message(), "request_too_large")
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # the app's HTTPError handler answers
                    raise HTTPError(413, self._too_large_message(), "request_too_large")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except HTTPError as error:  # raised while reading, and not handled by the app
            if not started:
                await _send_json(send, error.status, error.message, error.kind)

    def _too_large_message(self) -> str:
        return f"request body exceeds the limit of {self.max_body_bytes} bytes"


def base_app(title: str, service: Any) -> Any:
    """A FastAPI app with what every Atelier server has: protocol-shaped errors for every
    status, ``/health`` (open, for load balancers), ``/stats`` (the service's batch sizes and
    queue) and ``/openapi.json``."""
    from fastapi import FastAPI, Request
    from starlette.exceptions import HTTPException

    app = FastAPI(title=title, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, error: HTTPError) -> JSONResponse:
        return error_response(error.status, error.message, error.kind, error.headers)

    @app.exception_handler(HTTPException)
    async def _starlette_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(error.status_code, str(error.detail), kind, error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        # A bug, not the client's fault: logged with its traceback, answered in JSON.
        log.error("unexpected error on %s", request.url.path, exc_info=error)
        return error_response(500, f"internal error: {type(error).__name__}", "internal_error")

    @app.get("/health", response_class=PlainTextResponse)
    async def health() -> PlainTextResponse:
        return PlainTextResponse("")

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return service.stats()

    return app


def guard(app: ASGIApp, token: str | None, limits: ServerLimits) -> ASGIApp:
    return GuardMiddleware(app, token=token, max_body_bytes=limits.max_body_bytes)


async def read_json(request: Any) -> Any:
    """The request's JSON body: invalid JSON, JSON nested deeper than :data:`MAX_JSON_DEPTH`
    and strings that are not valid Unicode (a lone surrogate such as ``"\\ud800"``, which
    tokenisers and encoders cannot take) are each a 400 naming the problem."""
    body = await request.body()
    try:
        data = json.loads(body)
    except RecursionError:
        raise HTTPError(400, "request body is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError, and UnicodeDecodeError for non-UTF-8 bytes
        raise HTTPError(400, f"request body is not valid JSON: {error}") from None
    problem = json_problem(data)
    if problem:
        raise HTTPError(400, f"request body: {problem}")
    return data


def json_problem(data: Any, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why parsed JSON cannot be served (too deep, a string that is not valid Unicode), or
    None. Iterative: a deep document cannot exhaust the stack here."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not _valid_unicode(value):
                return "a string is not valid Unicode (lone surrogate)"
        elif isinstance(value, (dict, list)):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            if isinstance(value, dict):
                for key, item in value.items():
                    if not _valid_unicode(key):
                        return "a key is not valid Unicode (lone surrogate)"
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)
    return None


def _valid_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def prompt_chars_check(chars: int, limit: int | None) -> None:
    """A 400 when the request's prompt text is longer than ``limit`` characters (checked before
    tokenising: a 28 MiB prompt is 7M tokens and seconds of CPU to find too long)."""
    if limit is not None and chars > limit:
        raise HTTPError(400, f"the prompt is {chars} characters; this server's limit is {limit}")


# --- bounded model work --------------------------------------------------------------------------


async def run_bounded(request: Any, work: Awaitable[T], limits: ServerLimits) -> T:
    """``work`` (a request's model work), cancelled when the client disconnects; a 503 with
    ``Retry-After`` when the model's queue is full, a 504 when its batch ran past the deadline
    (:func:`bound_service`). Cancelling the work cancels its queued jobs and abandons its
    running batch (:mod:`nodes.backends.abandon`). Call it after the body has been read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when="FIRST_COMPLETED")
    except BaseException:  # this handler was cancelled (server shutting down): so is the work
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():  # the client disconnected
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise HTTPError(499, "the client closed the request", "client_closed")
    try:
        return task.result()
    except Overloaded as error:
        raise HTTPError(
            503, str(error), "server_busy", {"Retry-After": str(error.retry_after_s)}
        ) from None
    except DeadlineExceeded as error:
        raise HTTPError(504, str(error), "timeout") from None


def bound_service(service: Any, limits: ServerLimits) -> None:
    """Apply ``limits`` to the model service a server fronts: its queue bound and the deadline
    of each batch (counted from the batch's start, so a request queued behind a long one is
    not timed out by the wait)."""
    service.batcher.max_queue = limits.max_queue
    service.batcher.max_run_s = limits.request_timeout_s


async def _disconnected(request: Any) -> None:
    """Returns when the client disconnects. The body has been read, so the next ASGI message
    is ``http.disconnect`` (or never comes)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def gather_all_or_none(*works: Awaitable[T]) -> list[T]:
    """Every result, or the first error with the other works cancelled (``asyncio.gather``
    leaves them running: an ``n = 4`` request refused on its third image would go on drawing
    the first two for nobody)."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# --- LoRA adapters at run time -------------------------------------------------------------------


NO_ADAPTER_MESSAGE = (
    "lora_path is not a LoRA adapter this server can read (a directory with adapter_config.json)"
)


def check_adapter_path(path: str) -> None:
    """A 400 unless ``path`` holds ``adapter_config.json``. One message for a path that is
    missing, not a directory, unreadable or not an adapter, so the endpoint cannot be used to
    learn which paths exist on the server."""
    try:
        found = (Path(path) / "adapter_config.json").is_file()
    except (OSError, ValueError):  # e.g. a NUL byte, a name too long
        found = False
    if not found:
        raise HTTPError(400, NO_ADAPTER_MESSAGE)


def without_path(message: str, path: str) -> str:
    """``message`` with the server's path spelled as ``lora_path`` (the client knows which it
    sent; the resolved form is the server's business)."""
    for spelling in sorted({path, str(Path(path).resolve())}, key=len, reverse=True):
        message = message.replace(spelling, "<lora_path>")
    return message


# --- running -------------------------------------------------------------------------------------


def free_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says it is TCP (proto 0 does not), and without it every response waits
    # ~40 ms on the client's delayed ACK (headers and body are written separately).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """Runs an ASGI app with uvicorn on a background thread (port 0: a free port).

    ``with BackgroundServer(app) as server: httpx.get(server.url + "/health")``
    """

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.app = app
        self.sock = free_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name=f"uvicorn:{self.port}", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(
    app: ASGIApp, host: str, port: int, log_level: str = "info", drain_timeout_s: int = 30
) -> None:
    """Serve until SIGINT/SIGTERM; then stop accepting, let running requests finish for up to
    ``drain_timeout_s`` seconds, and cancel the rest (their batches stop at the next step)."""
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=drain_timeout_s,
    )
