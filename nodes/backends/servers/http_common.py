"""What Atelier's HTTP servers share: bearer-token auth, request size limits, JSON errors, the
LoRA load/unload body, and running uvicorn in the foreground or on a background thread (tests,
notebooks).

Errors are OpenAI-shaped: ``{"error": {"message": ..., "type": ..., "code": <status>}}``.
``/health`` is open (load balancers probe it); every other path needs the token when one is set.
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nodes.backends.wire import DEFAULT_MAX_PIXELS

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body; more is answered 413."""
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    """Largest decoded image (width × height); more is answered 400."""
    max_images_per_request: int = 16


class LoraBody(BaseModel):
    """``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, as vLLM takes them."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_path: str | None = None
    load_inplace: bool = False


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status
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
            given = headers.get("authorization", "")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
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
    """A FastAPI app with what every Atelier server has: protocol-shaped errors, ``/health``
    (open, for load balancers) and ``/stats`` (the service's batch sizes)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse

    app = FastAPI(title=title, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, error: HTTPError) -> JSONResponse:
        return error_response(error.status, error.message, error.kind)

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("")

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return service.stats()

    return app


def guard(app: ASGIApp, token: str | None, limits: ServerLimits) -> ASGIApp:
    return GuardMiddleware(app, token=token, max_body_bytes=limits.max_body_bytes)


async def read_json(request: Any) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except ValueError as error:
        raise HTTPError(400, f"request body is not valid JSON: {error}") from None


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


def serve_forever(app: ASGIApp, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
