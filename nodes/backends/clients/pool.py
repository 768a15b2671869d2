"""A pool of equivalent servers behind one role: load balancing, health, retries, timeouts.

Every Atelier HTTP client talks through a :class:`ServerPool`. A request goes to the server with
the fewest requests in flight (ties broken round robin), or strictly round robin. Connection
errors, timeouts and 5xx answers mark that server down for a cool-down and are retried on the
next server with exponential backoff; 4xx answers are the request's fault and are raised at once.
With ``health_interval_s`` set, ``GET /health`` probes run before requests once per interval:
dead servers are skipped before anything is sent to them, recovered ones come back. When every
attempt fails, the error (:class:`~nodes.backends.base.BackendUnavailable` or
:class:`~nodes.backends.base.BackendRequestError`) names the server URL and the request kind.
``max_in_flight`` caps the requests in flight per server: further requests wait (first come,
first served) for a free slot. ``counters()`` says per server how many attempts were sent,
failed, retried and given up, how many requests waited for a slot, and the most in flight.

One ``httpx.AsyncClient`` (a keep-alive connection pool) is kept per event loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import random
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from nodes.backends.base import BackendRequestError, BackendUnavailable

Strategy = Literal["least_inflight", "round_robin"]


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3
    """Retries after the first attempt (so ``retries + 1`` attempts in all)."""
    backoff_s: float = 0.25
    """Delay before the first retry; doubled for each next one (with ±25 % jitter)."""
    max_backoff_s: float = 8.0
    cooldown_s: float = 5.0
    """How long a failed server is avoided (while another one is up)."""


@dataclass
class ServerState:
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    requests: int = 0
    """Attempts sent (a retried request counts once per attempt)."""
    failures: int = 0
    """Attempts that failed with a connection error, a timeout or a 5xx answer."""
    retries: int = 0
    """Attempts sent here because an earlier attempt of the same request failed."""
    gave_up: int = 0
    """Requests whose last attempt failed here, so their caller got the error."""
    waited: int = 0
    """Requests that waited for a free slot here (``max_in_flight``)."""
    peak_in_flight: int = 0
    last_error: str = ""

    def up(self, now: float) -> bool:
        return now >= self.down_until


@dataclass(frozen=True)
class Timeouts:
    request_s: float = 120.0
    """Whole-request read/write timeout (image generation can take a while)."""
    connect_s: float = 5.0


CONNECTIONS_PER_CLIENT = 8
"""Connections per httpx client; see ``ServerPool._http``."""


@dataclass(eq=False)
class _Waiter:
    """A request waiting for a free slot (``max_in_flight``), on any server or a pinned one."""

    future: asyncio.Future[ServerState]
    pinned: str | None


@dataclass
class _LoopClient:
    loop: asyncio.AbstractEventLoop
    clients: list[httpx.AsyncClient]
    turn: int = 0


class ServerPool:
    """Several base URLs of equivalent servers (e.g. ``http://10.0.0.5:8000``)."""

    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        token: str | None = None,
        strategy: Strategy = "least_inflight",
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        max_connections: int = 64,
        health_interval_s: float | None = None,
        max_in_flight: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("a server pool needs at least one URL")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1 (or None: no cap)")
        if strategy not in ("least_inflight", "round_robin"):
            raise ValueError(f"unknown load-balancing strategy {strategy!r}")
        self.servers = [ServerState(_normalise(u)) for u in urls]
        self.token = token
        self.strategy: Strategy = strategy
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self.max_connections = max_connections
        self.health_interval_s = health_interval_s
        self.max_in_flight = max_in_flight
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._transport = transport
        self._last_health = float("-inf")
        self._health_task: asyncio.Task[dict[str, bool]] | None = None
        self._counter = itertools.count()
        self._client: _LoopClient | None = None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def counters(self) -> dict[str, dict[str, int]]:
        """Cumulative counts per server URL (see :class:`ServerState`); ``retries`` over all
        servers is how many attempts the pool repeated, ``gave_up`` how many requests failed."""
        return {
            s.url: {
                "requests": s.requests,
                "failures": s.failures,
                "retries": s.retries,
                "gave_up": s.gave_up,
                "waited": s.waited,
                "peak_in_flight": s.peak_in_flight,
            }
            for s in self.servers
        }

    # --- connections -------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        """One of a few small httpx clients, in turn.

        httpcore's pool rescans every connection of a client each time a request is queued or
        released (is_idle / has_expired, a getpeername call each), so one client with many
        connections costs O(connections) per request event: at 64 connections it dominated the
        runner's CPU. Clients of at most ``CONNECTIONS_PER_CLIENT`` connections keep each scan
        short; together they still allow ``max_connections``.
        """
        loop = asyncio.get_running_loop()
        if self._client is None or self._client.loop is not loop or self._client.loop.is_closed():
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            per_client = min(CONNECTIONS_PER_CLIENT, self.max_connections)
            count = max(1, -(-self.max_connections // per_client))
            clients = [
                httpx.AsyncClient(
                    headers=headers,
                    timeout=httpx.Timeout(self.timeouts.request_s, connect=self.timeouts.connect_s),
                    limits=httpx.Limits(
                        max_connections=per_client, max_keepalive_connections=per_client
                    ),
                    transport=self._transport,
                    verify=_default_ssl_context(),
                )
                for _ in range(count)
            ]
            self._client = _LoopClient(loop, clients)
        state = self._client
        state.turn = (state.turn + 1) % len(state.clients)
        return state.clients[state.turn]

    async def aclose(self) -> None:
        state = self._client
        if state is not None and state.loop is asyncio.get_running_loop():
            for client in state.clients:
                await client.aclose()
        self._client = None

    # --- choosing a server -------------------------------------------------------------------

    def _pick(self, exclude: set[str]) -> ServerState | None:
        """The server for the next attempt; None when every server is at ``max_in_flight``."""
        now = time.monotonic()
        servers = [s for s in self.servers if self._has_slot(s)]
        if not servers:
            return None
        candidates = [s for s in servers if s.up(now) and s.url not in exclude]
        if not candidates:
            candidates = [s for s in servers if s.url not in exclude]
        if not candidates:  # every server tried: start over with the least recently failed
            candidates = sorted(servers, key=lambda s: s.down_until)[:1]
        turn = next(self._counter)
        if self.strategy == "round_robin":
            return candidates[turn % len(candidates)]
        # Least in flight; ties broken by rotating the starting point.
        rotated = candidates[turn % len(candidates) :] + candidates[: turn % len(candidates)]
        return min(rotated, key=lambda s: s.in_flight)

    def _has_slot(self, server: ServerState) -> bool:
        return self.max_in_flight is None or server.in_flight < self.max_in_flight

    async def _acquire(self, pinned: str | None, exclude: set[str]) -> ServerState:
        """Take a slot on a server: the pinned one, or the best one with a free slot; wait
        (first come, first served) while there is none. Released by :meth:`_release`."""
        target = self._server(pinned) if pinned else self._pick(exclude)
        if target is None or not self._has_slot(target):
            waiter = _Waiter(asyncio.get_running_loop().create_future(), pinned)
            self._waiters.append(waiter)
            try:
                target = await waiter.future
            except asyncio.CancelledError:
                if waiter.future.done() and not waiter.future.cancelled():
                    self._release(waiter.future.result())  # handed a slot, then cancelled
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
            target.waited += 1
        else:
            target.in_flight += 1
        target.peak_in_flight = max(target.peak_in_flight, target.in_flight)
        return target

    def _release(self, server: ServerState) -> None:
        """Free a slot on ``server``, or hand it straight to the first request waiting for a
        slot there (so a newcomer cannot overtake the requests already waiting)."""
        for waiter in self._waiters:
            if waiter.future.done():  # cancelled: its task removes it when it wakes
                continue
            if waiter.pinned is None or _normalise(waiter.pinned) == server.url:
                self._waiters.remove(waiter)
                waiter.future.set_result(server)  # the slot changes hands: in_flight stays
                return
        server.in_flight -= 1

    def _mark_down(self, server: ServerState, error: str) -> None:
        server.failures += 1
        server.last_error = error
        server.down_until = time.monotonic() + self.retry.cooldown_s

    # --- requests ----------------------------------------------------------------------------

    async def request(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Mapping[str, Any] | None = None,
        files: Any = None,
        server: str | None = None,
        retry: bool = True,
    ) -> httpx.Response:
        """Send one request to some server of the pool; returns the (2xx) response.

        ``kind`` names the request in errors ("chat", "score_text", "images.generations", ...).
        ``server`` pins the request to one URL (used to broadcast, e.g. LoRA loading).
        """
        await self._periodic_health()
        attempts = self.retry.retries + 1 if retry else 1
        tried: set[str] = set()
        last: BackendUnavailable | None = None
        last_server: ServerState | None = None
        retry_after = 0.0
        for attempt in range(attempts):
            if attempt:
                delay = min(self.retry.max_backoff_s, self.retry.backoff_s * 2 ** (attempt - 1))
                delay *= random.uniform(0.75, 1.25)
                # A busy server's 503 says when to come back (capped like the backoff).
                await asyncio.sleep(max(delay, min(retry_after, self.retry.max_backoff_s)))
            target = await self._acquire(server, tried)
            tried.add(target.url)
            if len(tried) == len(self.servers):
                tried.clear()
            url = target.url + path
            target.requests += 1
            target.retries += attempt > 0
            try:
                response = await self._http().request(
                    method, url, json=json, data=data, files=files
                )
            except httpx.TransportError as error:
                detail = f"{type(error).__name__}: {error}".rstrip(": ")
                self._mark_down(target, detail)
                last = BackendUnavailable(
                    f"{kind} request to {url} failed: {detail}", url=url, kind=kind
                )
                last_server = target
                continue
            finally:
                self._release(target)
            if response.status_code >= 500:
                retry_after = _retry_after_s(response)
                detail = f"HTTP {response.status_code}: {_snippet(response)}"
                last = BackendUnavailable(
                    f"{kind} request to {url} failed: {detail}",
                    url=url,
                    kind=kind,
                    status=response.status_code,
                )
                last_server = target
                if _ran_past_deadline(response):
                    break  # the same work would run past the same deadline again
                self._mark_down(target, detail)
                continue
            if response.status_code >= 400:
                raise BackendRequestError(
                    f"{kind} request to {url} was refused: HTTP {response.status_code}: "
                    f"{_snippet(response)}",
                    url=url,
                    kind=kind,
                    status=response.status_code,
                )
            target.down_until = 0.0
            return response
        assert last is not None and last_server is not None
        last_server.gave_up += 1
        made = attempt + 1  # fewer than ``attempts`` when a retry could not help
        raise BackendUnavailable(
            f"{last} (gave up after {made} attempt{'s' * (made > 1)}; "
            f"servers: {', '.join(self.urls)})",
            url=last.url,
            kind=kind,
            status=last.status,
        )

    async def post_json(self, kind: str, path: str, payload: Any, **kwargs: Any) -> Any:
        response = await self.request(kind, "POST", path, json=payload, **kwargs)
        return _json(response, kind)

    async def get_json(self, kind: str, path: str, **kwargs: Any) -> Any:
        return _json(await self.request(kind, "GET", path, **kwargs), kind)

    async def broadcast(self, kind: str, method: str, path: str, **kwargs: Any) -> list[Any]:
        """Send the same request to every server (e.g. load a LoRA adapter everywhere)."""
        return list(
            await asyncio.gather(
                *(self.request(kind, method, path, server=s.url, **kwargs) for s in self.servers)
            )
        )

    async def check_health(self) -> dict[str, bool]:
        """``GET /health`` on every server; a failing one is marked down, a healthy one up."""

        async def one(server: ServerState) -> bool:
            try:
                response = await self._http().get(
                    server.url + "/health", timeout=self.timeouts.connect_s
                )
                ok = response.status_code == 200
            except httpx.HTTPError as error:
                ok = False
                server.last_error = str(error)
            if ok:
                server.down_until = 0.0
            else:
                server.down_until = time.monotonic() + self.retry.cooldown_s
            return ok

        results = await asyncio.gather(*(one(s) for s in self.servers))
        return {s.url: ok for s, ok in zip(self.servers, results, strict=True)}

    async def _periodic_health(self) -> None:
        """With ``health_interval_s``, probe every server before a request once the last probe
        is older than that (one probe at a time; concurrent requests wait for it)."""
        if self.health_interval_s is None:
            return
        loop = asyncio.get_running_loop()
        task = self._health_task
        if task is not None and task.get_loop() is not loop:
            task = None
        due = time.monotonic() - self._last_health >= self.health_interval_s
        if task is None or (task.done() and due):
            self._last_health = time.monotonic()
            task = self._health_task = loop.create_task(self.check_health())
        if not task.done():
            await asyncio.shield(task)

    def _server(self, url: str) -> ServerState:
        url = _normalise(url)
        for s in self.servers:
            if s.url == url:
                return s
        raise ValueError(f"{url} is not a server of this pool ({', '.join(self.urls)})")


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """httpx's default verifying context (certifi's CAs), built once: each client would
    otherwise load the CA bundle again (~25 ms each, several clients per pool and event loop)."""
    return httpx.create_ssl_context()


def _normalise(url: str) -> str:
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if "://" not in url:
        url = "http://" + url
    return url


def _ran_past_deadline(response: httpx.Response) -> bool:
    """An Atelier server's 504: the request's own work ran past the server's deadline (type
    ``timeout``), unlike a proxy's 504, which a retry may well get past."""
    if response.status_code != 504:
        return False
    try:
        return response.json()["error"]["type"] == "timeout"
    except (ValueError, KeyError, TypeError):
        return False


def _retry_after_s(response: httpx.Response) -> float:
    """``Retry-After`` in seconds (the delta-seconds form; an HTTP date or nothing: 0)."""
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isascii() and value.isdigit() else 0.0


def _snippet(response: httpx.Response, limit: int = 300) -> str:
    try:
        body = response.json()
        if isinstance(body, dict):
            detail = body.get("detail") or body.get("message") or body.get("error") or body
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
            text = str(detail)
        else:
            text = str(body)
    except ValueError:
        text = response.text
    text = " ".join(text.split())
    return text[:limit] + ("…" if len(text) > limit else "")


def _json(response: httpx.Response, kind: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise BackendUnavailable(
            f"{kind} response from {response.request.url} is not JSON: {_snippet(response)}",
            url=str(response.request.url),
            kind=kind,
        ) from None


def pools_of(backends: Iterable[Any]) -> list[ServerPool]:
    """The distinct pools behind some backends (HTTP clients hold one as ``.pool``; a judge
    wrapping a chat client as ``.model.pool``); in-process and simulated backends have none."""
    found: dict[int, ServerPool] = {}
    for backend in backends:
        for candidate in (backend, getattr(backend, "model", None)):
            pool = getattr(candidate, "pool", None)
            if isinstance(pool, ServerPool):
                found[id(pool)] = pool
    return list(found.values())


def request_counters(pools: Iterable[ServerPool]) -> dict[str, dict[str, int]]:
    """:meth:`ServerPool.counters` of several pools, summed per server URL."""
    total: dict[str, dict[str, int]] = {}
    for pool in pools:
        for url, counts in pool.counters().items():
            into = total.setdefault(url, dict.fromkeys(counts, 0))
            for key, value in counts.items():
                into[key] = max(into[key], value) if key == "peak_in_flight" else into[key] + value
    return total


def describe_counters(counters: Mapping[str, Mapping[str, int]]) -> str:
    """One line for a run summary: attempts, retries and requests given up, over all servers."""
    attempts = sum(c["requests"] for c in counters.values())
    retries = sum(c["retries"] for c in counters.values())
    gave_up = sum(c["gave_up"] for c in counters.values())
    return (
        f"{attempts} requests to {len(counters)} server{'s' * (len(counters) != 1)}, "
        f"{retries} retried, {gave_up} given up"
    )
