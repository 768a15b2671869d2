"""The web app of ``atelier ui``: Starlette routes over a live :class:`TrajectoryStore`.

Every page is read from the store when asked (nothing is cached but image thumbnails), so a run
being recorded shows its new trajectories on reload. The store is synchronous, so the routes are
plain functions, which Starlette runs in its thread pool.

Security, as for the model servers: bind 127.0.0.1 by default; an optional token, sent as
``Authorization: Bearer TOKEN`` or once as ``?token=TOKEN`` (which sets an HttpOnly cookie and
redirects to the same page without it, as Jupyter does); on a loopback bind only loopback
``Host`` names are served (DNS rebinding); every response carries a Content-Security-Policy
(no script, styles by nonce, images from this origin only) and every stored text is escaped.
No route changes a record; on SQLite a text search first brings the search index up to date
(``storage.search.catch_up_search_index``), the one write.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from threading import Lock
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from atelier.ui import insight_pages, pages
from atelier.ui.layout import content_security_policy, with_query
from storage.analysis import group_view, run_groups, run_summary, training_series, version_usage
from storage.images import ImageNotFound, InvalidImageRef
from storage.search import TrajectoryFilter, filter_choices, search_trajectories
from storage.store import TrajectoryNotFound, TrajectoryStore
from storage.viewer import downscaled

log = logging.getLogger(__name__)

COOKIE = "atelier_ui_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
THUMBNAIL_SIDES = range(16, 1025)
MAX_PAGE = 1_000_000
GROUPS_PER_PAGE = 50


class BadQuery(ValueError):
    """A query parameter that cannot mean anything (a 400 page naming it)."""


class Pages:
    """The routes' shared state: the store, the tokenizer for token pieces, thumbnails."""

    def __init__(self, store: TrajectoryStore, tokenizer: Any = None, thumbnails: int = 512):
        self.store = store
        self.tokenizer = tokenizer
        self._thumbs: OrderedDict[tuple[str, int], tuple[bytes, str]] = OrderedDict()
        self._thumbs_max = thumbnails
        self._lock = Lock()

    # --- pages ---------------------------------------------------------------------------

    def runs(self, request: Request) -> Response:
        from atelier.cli.app import config_summary

        return _html(request, pages.runs_page, self.store.runs()[::-1], config_summary)

    def run(self, request: Request) -> Response:
        run = self._run(request.path_params["run_id"])
        query = request.query_params
        per_page = _choice(query, "per", pages.PAGE_SIZES, pages.DEFAULT_PAGE_SIZE)
        number = _int(query, "page", 1, 1, MAX_PAGE)
        try:
            where = TrajectoryFilter(
                run=run.id,
                mode=_text(query, "mode"),
                status=_text(query, "status"),
                category=_text(query, "category"),
                correct=_yes_no(query, "correct"),
                min_score=_float(query, "min_score"),
                max_score=_float(query, "max_score"),
                group=_text(query, "group"),
                policy_version=_text(query, "policy_version"),
                text=_text(query, "q"),
            )
            results = search_trajectories(
                self.store, where, offset=(number - 1) * per_page, limit=per_page
            )
        except BadQuery:
            raise
        except ValueError as exc:  # e.g. an unknown status
            raise BadQuery(str(exc)) from None
        choices = filter_choices(self.store, run.id)
        summary = run_summary(self.store, run.id)
        return _html(
            request, pages.run_page, run, summary, where, choices, results, per_page=per_page
        )

    def groups(self, request: Request) -> Response:
        run = self._run(request.path_params["run_id"])
        number = _int(request.query_params, "page", 1, 1, MAX_PAGE)
        found, total = run_groups(
            self.store, run.id, offset=(number - 1) * GROUPS_PER_PAGE, limit=GROUPS_PER_PAGE
        )
        return _html(request, pages.groups_page, run, found, total, number, GROUPS_PER_PAGE)

    def group(self, request: Request) -> Response:
        run = self._run(request.path_params["run_id"])
        group_id = request.path_params["group_id"]
        try:
            view = group_view(self.store, run.id, group_id)
        except KeyError:
            raise HTTPException(404, f"run {run.name} has no group {group_id!r}") from None
        return _html(request, pages.group_page, run, view)

    def trajectory(self, request: Request) -> Response:
        detail = self._trajectory(request.path_params["trajectory_id"])
        runs = {info.id: info for info in self.store.runs(ids=[detail.run_id])}
        return _html(request, pages.trajectory_page, detail, runs)

    def generation(self, request: Request) -> Response:
        detail = self._trajectory(request.path_params["trajectory_id"])
        seq, position = request.path_params["seq"], request.path_params["position"]
        step = next((s for s in detail.steps if s.seq == seq), None)
        generation = None
        if step is not None:
            generation = next((g for g in step.generations if g.position == position), None)
        if step is None or generation is None:
            raise HTTPException(404, f"trajectory {detail.id} has no generation {seq}/{position}")
        return _html(request, pages.tokens_page, detail, step, generation, self._pieces(generation))

    def training_list(self, request: Request) -> Response:
        return _html(request, insight_pages.training_list_page, training_series(self.store))

    def training(self, request: Request) -> Response:
        key = request.path_params["key"]
        found = next((s for s in training_series(self.store) if s.key == key), None)
        if found is None:
            raise HTTPException(404, f"no training run {key!r} in this store")
        return _html(request, insight_pages.training_page, found)

    def versions(self, request: Request) -> Response:
        decided = set(filter_choices(self.store, None).get("policy_version", []))
        return _html(request, insight_pages.versions_page, version_usage(self.store), decided)

    def compare(self, request: Request) -> Response:
        runs = self.store.runs()[::-1]
        first = _text(request.query_params, "a")
        second = _text(request.query_params, "b")
        if first is None:
            raise BadQuery("compare needs ?a=RUN (and &b=RUN): pick two runs on the runs page")
        a = self._run(first)
        if second is None:  # the newest other run
            other = next((r for r in runs if r.id != a.id), None)
            if other is None:
                raise BadQuery("this store has only one run: nothing to compare it with")
            second = other.id
        b = self._run(second)
        return _html(
            request,
            insight_pages.compare_page,
            run_summary(self.store, a.id),
            run_summary(self.store, b.id),
            runs,
        )

    def image(self, request: Request) -> Response:
        ref = request.path_params["ref"]
        side = _int(request.query_params, "max", 0, THUMBNAIL_SIDES.start, THUMBNAIL_SIDES[-1])
        try:
            if side:
                data, media = self._thumbnail(ref, side)
            else:
                data, media = self.store.image_bytes(ref), "image/png"
        except (ImageNotFound, InvalidImageRef, KeyError):
            raise HTTPException(404, "no such image") from None
        headers = {"Cache-Control": "private, max-age=86400, immutable"}  # content-addressed
        return Response(data, media_type=media, headers=headers)

    # --- helpers --------------------------------------------------------------------------

    def _run(self, run_id: str) -> Any:
        try:
            return self.store.run(run_id)
        except KeyError:
            raise HTTPException(404, f"no run {run_id!r} in this store") from None

    def _trajectory(self, trajectory_id: str) -> Any:
        try:
            return self.store.trajectory(trajectory_id)
        except (TrajectoryNotFound, KeyError):
            raise HTTPException(404, f"no trajectory {trajectory_id!r} in this store") from None

    def _thumbnail(self, ref: str, side: int) -> tuple[bytes, str]:
        key = (ref, side)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        made = downscaled(self.store.image_bytes(ref), side)
        with self._lock:
            self._thumbs[key] = made
            while len(self._thumbs) > self._thumbs_max:
                self._thumbs.popitem(last=False)
        return made

    def _pieces(self, generation: Any) -> list[str] | None:
        """Each token's text, from the tokenizer the app was started with (None without)."""
        if self.tokenizer is None:
            return None
        try:
            return [self.tokenizer.decode([token]) for token in generation.token_ids]
        except Exception:  # ids from another model's vocabulary: show the ids instead
            log.warning("the tokenizer cannot decode generation tokens; showing ids")
            return None


def _html(request: Request, render: Callable[..., str], *args: Any, **kwargs: Any) -> Response:
    nonce = secrets.token_urlsafe(18)
    body = render(*args, nonce=nonce, **kwargs)
    return HTMLResponse(body, headers={"Content-Security-Policy": content_security_policy(nonce)})


# --- query parameters --------------------------------------------------------------------------


def _text(query: QueryParams, name: str) -> str | None:
    value = query.get(name)
    if value is None or not value.strip():
        return None
    if len(value) > 1000:
        raise BadQuery(f"{name} is longer than 1000 characters")
    return value.strip()


def _int(query: QueryParams, name: str, default: int, low: int, high: int) -> int:
    raw = _text(query, name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit():
        raise BadQuery(f"{name} must be a whole number, not {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise BadQuery(f"{name} must be between {low} and {high}")
    return value


def _choice(query: QueryParams, name: str, allowed: Sequence[int], default: int) -> int:
    value = _int(query, name, default, min(allowed), max(allowed))
    if value not in allowed:
        raise BadQuery(f"{name} must be one of {', '.join(map(str, allowed))}")
    return value


def _float(query: QueryParams, name: str) -> float | None:
    raw = _text(query, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadQuery(f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value):
        raise BadQuery(f"{name} must be finite")
    return value


def _yes_no(query: QueryParams, name: str) -> bool | None:
    raw = _text(query, name)
    if raw is None:
        return None
    if raw.lower() in ("yes", "true", "1"):
        return True
    if raw.lower() in ("no", "false", "0"):
        return False
    raise BadQuery(f"{name} must be yes or no")


# --- the app -----------------------------------------------------------------------------------


class TokenGate:
    """Requests carry the token (header or cookie); ``?token=`` once sets the cookie."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        offered = request.query_params.get("token")
        if offered is not None and secrets.compare_digest(offered.encode(), self.token.encode()):
            rest = {k: v for k, v in request.query_params.multi_items() if k != "token"}
            raw_path = scope.get("raw_path") or request.url.path.encode()
            target = with_query(raw_path.decode("latin-1"), rest)  # the path as it was sent
            response: Response = RedirectResponse(target, 303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            await response(scope, receive, send)
            return
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        candidates = [request.cookies.get(COOKIE, "")]
        if scheme.lower() == "bearer":
            candidates.append(credential.strip())
        if any(secrets.compare_digest(c.encode(), self.token.encode()) for c in candidates if c):
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(18)
        body = insight_pages.error_page(
            401,
            "This Atelier UI needs its token: open the link it printed (…?token=…).",
            nonce=nonce,
        )
        headers = {
            "Content-Security-Policy": content_security_policy(nonce),
            "WWW-Authenticate": "Bearer",
        }
        await HTMLResponse(body, status_code=401, headers=headers)(scope, receive, send)


class SecurityHeaders:
    """Headers on every response: no sniffing, no referrer, no framing."""

    HEADERS = (
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _error_response(status: int, message: str) -> Response:
    nonce = secrets.token_urlsafe(18)
    return HTMLResponse(
        insight_pages.error_page(status, message, nonce=nonce),
        status_code=status,
        headers={"Content-Security-Policy": content_security_policy(nonce)},
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else "error"
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no page {request.url.path!r} here"
    return _error_response(exc.status_code, detail)


async def _bad_query(request: Request, exc: Exception) -> Response:
    return _error_response(400, str(exc))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("atelier ui: %s failed", request.url.path)
    return _error_response(500, f"this page failed: {type(exc).__name__}: {exc}"[:300])


def _no_icon(request: Request) -> Response:
    return Response(status_code=204)


def create_app(
    store: TrajectoryStore,
    *,
    token: str | None = None,
    tokenizer: Any = None,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The app over ``store``. ``token``: required on every request when set; ``tokenizer``
    (with ``decode([id])``) shows each token's text on the log-prob pages; ``allowed_hosts``:
    the ``Host`` names served (None: any; :data:`LOOPBACK_HOSTS` for a loopback bind)."""
    handlers = Pages(store, tokenizer)
    routes = [
        Route("/", handlers.runs),
        Route("/runs/{run_id}", handlers.run),
        Route("/runs/{run_id}/groups", handlers.groups),
        Route("/runs/{run_id}/groups/{group_id}", handlers.group),
        Route("/trajectories/{trajectory_id}", handlers.trajectory),
        Route(
            "/trajectories/{trajectory_id}/generations/{seq:int}/{position:int}",
            handlers.generation,
        ),
        Route("/training", handlers.training_list),
        Route("/training/{key}", handlers.training),
        Route("/versions", handlers.versions),
        Route("/compare", handlers.compare),
        Route("/images/{ref}", handlers.image),
        Route("/favicon.ico", _no_icon),  # browsers ask for it on every first visit
    ]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    if token:
        middleware.append(Middleware(TokenGate, token=token))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            HTTPException: _http_error,
            BadQuery: _bad_query,
            Exception: _unexpected,
        },
    )
