"""A fault-injecting HTTP proxy for loopback tests: it stands between a client and one upstream
server and, at a set rate, breaks requests the ways networks and servers break them.

    with FaultProxy(upstream_url, rate=0.2, seed=0) as proxy:
        client = OpenAIChatClient(proxy.url, ...)
        ...
    proxy.injected   # Counter: how many faults of each kind it injected

Faults (``FAULTS``; ``mix`` weights them):

- ``reset_before``: the connection is reset (RST) once the request has arrived, before anything
  is forwarded; the upstream never sees the request.
- ``reset_after``: the request is forwarded and answered upstream, then the connection is reset
  instead of replying (the work was done; the client cannot know it).
- ``http_500``: a JSON 500 answer, not forwarded.
- ``timeout``: nothing is answered; the connection is held until the client gives up (closes it)
  or ``hold_s`` passes.
- ``truncated``: the upstream's answer is sent with its full ``Content-Length`` but only half of
  its body, then the connection is closed.
- ``slow_drip``: the upstream's answer is sent in ``drip_chunks`` pieces, ``drip_delay_s`` apart
  (stays under a client's read timeout, so the request succeeds, slowly).
- ``garbage``: a 200 answer whose body is not JSON (an HTML page), not forwarded.

All but ``slow_drip`` and ``garbage`` are failures a client must retry; ``garbage`` is a wrong
answer that a client must refuse with a clear error. Only requests whose path starts with one of
``paths`` are eligible (``/health`` probes pass untouched). The proxy speaks just enough HTTP/1.1
for Atelier's clients: keep-alive on the client side, one upstream connection per request,
bodies framed by ``Content-Length``. Faults are drawn from ``random.Random(seed)`` in the order
requests arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Mapping
from urllib.parse import urlsplit

FAULTS = (
    "reset_before",
    "reset_after",
    "http_500",
    "timeout",
    "truncated",
    "slow_drip",
    "garbage",
)
RETRIED = ("reset_before", "reset_after", "http_500", "timeout", "truncated")
"""Faults that fail an attempt at the transport or HTTP level: a client retries them."""


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.2,
        mix: Mapping[str, float] | None = None,
        seed: int = 0,
        paths: tuple[str, ...] = ("/v1/",),
        hold_s: float = 30.0,
        drip_chunks: int = 8,
        drip_delay_s: float = 0.02,
        port: int = 0,
    ) -> None:
        parts = urlsplit(upstream if "://" in upstream else f"http://{upstream}")
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rate = rate
        mix = dict(mix) if mix is not None else {kind: 1.0 for kind in FAULTS}
        unknown = set(mix) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
        self.kinds = [k for k, w in mix.items() if w > 0]
        self.weights = [mix[k] for k in self.kinds]
        self.rng = random.Random(seed)
        self.paths = paths
        self.hold_s = hold_s
        self.drip_chunks = drip_chunks
        self.drip_delay_s = drip_delay_s
        self.requests = 0
        """Requests that arrived (eligible or not)."""
        self.forwarded = 0
        """Requests sent on to the upstream."""
        self.injected: Counter[str] = Counter()
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def retried_faults(self) -> int:
        """Injected faults that a client sees as a failed attempt."""
        return sum(self.injected[k] for k in RETRIED)

    # --- lifecycle (a background thread with its own event loop) ------------------------------

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._shutdown)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, "127.0.0.1", self._port, backlog=1024)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            loop.run_until_complete(self._server.serve_forever())
        except asyncio.CancelledError:
            pass
        finally:
            for task in list(self._handlers):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()

    # --- one client connection -----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # always set inside a server callback; kept so shutdown can cancel
            self._handlers.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()  # a FIN (after a reset: nothing more to do)

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; False when the connection is to be dropped."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed its idle connection
        length = _content_length(head)
        body = await reader.readexactly(length) if length else b""
        self.requests += 1
        path = head.split(b" ", 2)[1].decode("latin-1")
        fault = self._draw() if path.startswith(self.paths) else None
        if fault is not None:
            self.injected[fault] += 1
        if fault == "reset_before":
            _reset(writer)
            return False
        if fault == "http_500":
            _write_response(writer, 500, b'{"error": {"message": "injected fault", "code": 500}}')
            await writer.drain()
            return True
        if fault == "garbage":
            _write_response(writer, 200, b"<html><body>502 Bad Gateway</body></html>")
            await writer.drain()
            return True
        if fault == "timeout":
            # The client closes the connection when its read times out.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(), self.hold_s)
            return False
        status_line, headers, answer = await self._forward(head, body)
        if fault == "reset_after":
            _reset(writer)
            return False
        writer.write(status_line + _headers(headers, len(answer)) + b"\r\n")
        if fault == "truncated":
            writer.write(answer[: len(answer) // 2])
            await writer.drain()
            return False
        if fault == "slow_drip":
            step = max(1, -(-len(answer) // self.drip_chunks))
            for start in range(0, len(answer), step):
                writer.write(answer[start : start + step])
                await writer.drain()
                await asyncio.sleep(self.drip_delay_s)
            return True
        writer.write(answer)
        await writer.drain()
        return True

    def _draw(self) -> str | None:
        if self.rng.random() >= self.rate:
            return None
        return self.rng.choices(self.kinds, self.weights)[0]

    async def _forward(self, head: bytes, body: bytes) -> tuple[bytes, list[bytes], bytes]:
        """Send the request upstream on a fresh connection; the answer's status line, headers
        (without the framing ones) and body."""
        self.forwarded += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            request_line, *lines = head[:-4].split(b"\r\n")
            kept = [h for h in lines if not h.lower().startswith(b"connection:")]
            up_writer.write(b"\r\n".join([request_line, *kept, b"Connection: close"]))
            up_writer.write(b"\r\n\r\n" + body)
            await up_writer.drain()
            answer = await up_reader.read()  # until the upstream closes (Connection: close)
        finally:
            up_writer.close()
        answer_head, _, answer_body = answer.partition(b"\r\n\r\n")
        status_line, *header_lines = answer_head.split(b"\r\n")
        framing = (b"connection:", b"content-length:", b"transfer-encoding:", b"keep-alive:")
        headers = [h for h in header_lines if not h.lower().startswith(framing)]
        length = _content_length(answer_head + b"\r\n\r\n")
        if length:
            answer_body = answer_body[:length]
        return status_line + b"\r\n", headers, answer_body


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
        if name.strip().lower() == b"transfer-encoding":
            raise ValueError("the fault proxy frames bodies by Content-Length only")
    return 0


def _headers(headers: list[bytes], length: int) -> bytes:
    lines = [*headers, b"content-length: %d" % length]
    return b"".join(line + b"\r\n" for line in lines)


def _write_response(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    reason = {200: b"OK", 500: b"Internal Server Error"}[status]
    writer.write(b"HTTP/1.1 %d %s\r\n" % (status, reason))
    writer.write(_headers([b"content-type: application/json"], len(body)) + b"\r\n" + body)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, as a crashed peer or a middlebox does (SO_LINGER 0, then abort)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
