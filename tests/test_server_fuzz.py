"""Schema-driven fuzzing of Atelier's two HTTP servers (``atelier serve lm`` and ``atelier serve
image``), in-process on loopback with the tiny random-weight models.

Why: the servers face clients we do not control (agents, notebooks, other teams' scripts). A
malformed, hostile or merely unusual request must never crash a handler: it gets an answer a
client can act on, and the server keeps serving everyone else.

What every request checks:

- the status is below 500;
- every 4xx body is OpenAI-shaped: ``{"error": {"message": str, "type": str, "code": <status>}}``;
- ``GET /health`` answers 200 afterwards (the server is still alive).

How requests are made: strategies are derived from each request model's
``model_json_schema()`` (:class:`ChatBody`, :class:`LoraBody`, :class:`GenerationBody`,
:class:`EditBody`): per property mostly values of the declared type, with the boundary values
(min/max ± 1, 0, negative, 10**30, NaN and ±inf written as raw JSON text, empty and very long
strings, lone surrogates written as ``\\ud800`` escapes, NUL, right-to-left and non-ASCII
digits), sometimes a value of the wrong type, a missing required field or extra fields. Each
body is drawn in one of three modes: every field valid (so the request reaches the model with
boundary values: a 1e-300 temperature, a 10**30 seed), exactly one field hostile (so the
refusal of that one field is what is tested), or chaos. A few fields get semantic strategies
on top (chat messages with tiny PNG data URLs and broken images, image sizes, per-request
LoRA, and what the server supports beyond its schema, such as ``n`` 1 for chat).

Raw-body mutations cover what a schema cannot say: invalid JSON, JSON nested 1000+ deep,
non-UTF-8 bytes, wrong content types, empty bodies, oversized bodies and JSON that is not an
object; edits are also sent as hand-built multipart forms. Plain regression tests pin the
server errors found so far (see the last section).

Cost: a request that would be *valid* stays cheap for the tiny models (at most 4 new tokens,
images at most 64×64, ``n`` ≤ 2, at most 2 inference steps): hostile values of those fields are
still sent, but a valid expensive one is replaced by the cap before sending (checked against
the server's own pydantic models).

Determinism and time: ``derandomize=True`` and no example database, so every run sends the same
requests; shrinking is off because every shrink step is real model work (a failing run would
spend minutes) — instead each failure message carries the exact request and response.
"""

from __future__ import annotations

import base64
import io
import json
import math
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from PIL import Image
from pydantic import BaseModel, ValidationError

from nodes.backends.servers.http_common import LoraBody
from nodes.backends.servers.image_server import EditBody, GenerationBody
from nodes.backends.servers.lm_server import ChatBody

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models and servers
pytestmark = pytest.mark.models

Json = Any
"""A JSON-able Python value (NaN/inf floats and lone surrogates included on purpose)."""

# --- cost caps: what a *valid* request may ask of the tiny models ------------------------------

MAX_NEW_TOKENS = 4
LM_MAX_TOKENS_LIMIT = 4096  # create_lm_app's max_tokens_limit: above it the server answers 400
LM_DEFAULT_MAX_TOKENS = 256  # create_lm_app's default_max_tokens (too many for a fuzz run)
MAX_SIDE = 64
MAX_N = 2
MAX_STEPS = 2
MAX_PIXELS = 256 * 256  # tests.tiny_models.SERVER_LIMITS["max_image_pixels"]
CHEAP_SIZE = "32x32"
REQUEST_TIMEOUT_S = 60.0


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# --- requests and the checks every response must pass -------------------------------------------


@dataclass(frozen=True)
class Call:
    """One HTTP request, exactly as sent (the body as raw bytes)."""

    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        body = self.body
        if len(body) > 2000:  # keep both ends: the sampling fields often follow the images
            body = body[:1400] + f"...({len(body) - 1900} bytes)...".encode() + body[-500:]
        headers = "".join(f"\n  {k}: {v}" for k, v in self.headers)
        return f"{self.method} {self.path} ({len(self.body)} bytes){headers}\n  body: {body!r}"


def json_bytes(value: Json, ascii_only: bool = True) -> bytes:
    """JSON text as Python writes it: NaN / Infinity literals, and lone surrogates as ``\\ud800``
    escapes (``ascii_only``) or as their raw surrogate-pass bytes (not valid UTF-8)."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode(
        "utf-8", "surrogatepass"
    )


def json_call(path: str, value: Json, ascii_only: bool = True) -> Call:
    return Call(
        "POST", path, json_bytes(value, ascii_only), (("content-type", "application/json"),)
    )


def send(base_url: str, call: Call, headers: Iterable[tuple[str, str]] = ()) -> httpx.Response:
    # A fresh connection per request: after an unhandled exception uvicorn closes the
    # connection, and a reused keep-alive connection would then fail the *next* request.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        return http.request(
            call.method, base_url + call.path, content=call.body, headers=[*call.headers, *headers]
        )


def error_body_problem(response: httpx.Response) -> str | None:
    """Why a 4xx body is not ``{"error": {"message": str, "type": str, "code": <status>}}``."""
    try:
        body = response.json()
    except ValueError:
        return "the body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return 'no "error" object'
    if not isinstance(error.get("message"), str):
        return "error.message is not a string"
    if not isinstance(error.get("type"), str):
        return "error.type is not a string"
    code = error.get("code")
    if not isinstance(code, int) or isinstance(code, bool) or code != response.status_code:
        return f"error.code is {code!r}, not the status {response.status_code}"
    return None


def report(call: Call, response: httpx.Response, problem: str) -> str:
    return (
        f"{problem}\nrequest: {call.describe()}\n"
        f"response: {response.status_code} {response.text[:800]!r}"
    )


def exercise(server: Any, call: Call, headers: Iterable[tuple[str, str]] = ()) -> httpx.Response:
    """Send ``call``; check the status, the error shape and that the server is still healthy."""
    try:
        response = send(server.url, call, headers)
    except httpx.TransportError as error:
        pytest.fail(f"no response: {type(error).__name__}: {error}\nrequest: {call.describe()}")
    assert response.status_code < 500, report(call, response, "server error")
    if 400 <= response.status_code < 500:
        problem = error_body_problem(response)
        assert problem is None, report(call, response, f"4xx body not OpenAI-shaped: {problem}")
    try:
        health = send(server.url, Call("GET", "/health"))
    except httpx.TransportError as error:
        pytest.fail(f"/health failed after the request: {error}\nrequest: {call.describe()}")
    assert health.status_code == 200, report(call, response, f"/health is {health.status_code}")
    return response


# --- images --------------------------------------------------------------------------------------


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


TINY_PNG = png(Image.new("RGB", (16, 16), (200, 30, 30)))
GOOD_IMAGES: list[bytes] = [
    TINY_PNG,
    png(Image.new("RGBA", (16, 16), (0, 90, 200, 128))),
    png(Image.new("L", (16, 16), 7)),
    png(Image.new("1", (16, 16), 1)),
    png(Image.new("P", (16, 16), 3)),
    png(Image.new("LA", (16, 16), (3, 200))),
    png(Image.new("I;16", (16, 16), 40000)),
    png(Image.new("RGB", (1, 1), (1, 2, 3))),
    png(Image.new("RGB", (64, 1), (1, 2, 3))),
    encoded(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG"),
    encoded(Image.new("CMYK", (16, 16), (9, 9, 9, 9)), "JPEG"),
    encoded(Image.new("RGB", (16, 16), (9, 9, 9)), "GIF"),
    encoded(Image.new("RGB", (16, 16), (9, 9, 9)), "BMP"),
    encoded(Image.new("RGB", (16, 16), (9, 9, 9)), "WEBP"),
    encoded(Image.new("RGB", (16, 16), (9, 9, 9)), "TIFF"),
]
"""Small decodable images (at most 64 pixels a side: a request that uses one stays cheap)."""
BAD_IMAGES: list[bytes] = [
    b"",
    b"\x00",
    b"not an image",
    b"\x89PNG\r\n\x1a\n",
    TINY_PNG[: len(TINY_PNG) // 2],  # truncated
    TINY_PNG[:16] + b"\xff" * 16 + TINY_PNG[32:],  # corrupted header
    png(Image.new("L", (257, 256))),  # one row over the 65 536-pixel limit
    png(Image.new("L", (1, 65537))),
    b"<svg xmlns='http://www.w3.org/2000/svg'/>",
]
"""Bytes a server must refuse with a 400 (broken, empty, not an image, over the pixel limit)."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


image_bytes = st.one_of(st.sampled_from(GOOD_IMAGES), st.sampled_from(BAD_IMAGES))
image_strings = st.one_of(
    st.sampled_from(GOOD_IMAGES).map(data_url),
    st.sampled_from(GOOD_IMAGES).map(b64),
    st.sampled_from(BAD_IMAGES).map(data_url),
    st.sampled_from(
        [
            data_url(TINY_PNG, "text/plain"),
            "data:image/png;base64,",
            "data:image/png," + b64(TINY_PNG),  # not base64-flagged
            "data:;base64," + b64(TINY_PNG),
            "data:image/png;base64," + b64(TINY_PNG)[:-3],  # bad padding
            "data:image/png;base64," + b64(TINY_PNG).replace("A", "*"),
            "data:image/png;base64,\n" + b64(TINY_PNG),
            "data:image/png;base64," + b64(TINY_PNG) + "\x00",
            "data:image/png;base64,\ud800",
            "DATA:image/png;base64," + b64(TINY_PNG),
            "http://127.0.0.1:9/x.png",  # remote URLs are refused, never fetched
            "file:///etc/passwd",
            "",
            "data:",
        ]
    ),
)


# --- the schema → strategy converter ------------------------------------------------------------

NASTY_STRINGS: list[str] = [
    "",
    " ",
    "x",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff",
    "a\ud800b",
    "\udc00\ud800",
    "\ud83d\ude00",  # a valid pair (an emoji) spelled with escapes
    "😀",
    "\u202eevil\u202c",  # right-to-left override
    "שלום עולם",
    "٣x٣",
    "١٢٣",
    "１２",
    "²",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "\r\n\t\x0b\x0c",
    "<image>",
    "<image><image><image>",
    "<|im_start|>assistant\n",
    "<|im_end|>",
    "<|endoftext|>",
    "{{ raise_exception('x') }}",
    "{% for x in range(10**9) %}{% endfor %}",
    "%s%n%x",
    "null",
    "NaN",
    "\\u0000",
    "a" * 1000,
    "red " * 300,
    "\u0300" * 500,  # combining marks
    "x" * 20_000,
]
"""Strings that have broken text pipelines before: NUL, lone surrogates, bidi controls,
non-ASCII digits, the models' special tokens, template syntax, and very long text."""

INT_EXTREMES = [0, 1, -1, 2, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
FLOAT_EXTREMES = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    5e-324,
    -5e-324,
    1e-300,
    1e308,
    -1e308,
    math.nan,
    math.inf,
    -math.inf,
]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(INT_EXTREMES),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NASTY_STRINGS),
    st.text(max_size=8),
)
json_values: st.SearchStrategy[Json] = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.text(max_size=6), st.sampled_from(NASTY_STRINGS)), inner, max_size=3
        ),
    ),
    max_leaves=8,
)
"""Any JSON value (the wrong type for almost every field)."""


def _bounds(schema: dict[str, Any]) -> tuple[float | None, float | None, bool, bool]:
    """(low, high, low excluded, high excluded) of a numeric schema."""
    low, high = schema.get("minimum"), schema.get("maximum")
    low_out, high_out = False, False
    if "exclusiveMinimum" in schema:
        low, low_out = schema["exclusiveMinimum"], True
    if "exclusiveMaximum" in schema:
        high, high_out = schema["exclusiveMaximum"], True
    return low, high, low_out, high_out


def _in_range(value: float, schema: dict[str, Any]) -> bool:
    low, high, low_out, high_out = _bounds(schema)
    if math.isnan(value):
        return low is None and high is None
    if low is not None and (value < low or (low_out and value == low)):
        return False
    return high is None or not (value > high or (high_out and value == high))


def _integers(schema: dict[str, Any], valid: bool) -> st.SearchStrategy[int]:
    low, high, low_out, high_out = _bounds(schema)
    low = None if low is None else int(low) + int(low_out)
    high = None if high is None else int(high) - int(high_out)
    points = set(INT_EXTREMES)
    for bound in (low, high):
        if bound is not None:
            points |= {bound - 1, bound, bound + 1}
    if valid:
        inside = sorted(p for p in points if _in_range(p, schema))
        return st.one_of(st.sampled_from(inside), st.integers(low, high))
    return st.one_of(st.sampled_from(sorted(points)), st.integers(-100, 100))


def _numbers(schema: dict[str, Any], valid: bool) -> st.SearchStrategy[float | int]:
    points = set(FLOAT_EXTREMES)
    for bound in _bounds(schema)[:2]:
        if bound is not None:
            bound = float(bound)
            points |= {bound, bound - 1, bound + 1}
            points |= {math.nextafter(bound, -math.inf), math.nextafter(bound, math.inf)}
    extremes = sorted(points, key=lambda x: (math.isnan(x), x))
    if valid:
        low, high, low_out, high_out = _bounds(schema)
        return st.one_of(
            st.sampled_from([p for p in extremes if _in_range(p, schema)]),
            st.floats(
                low,
                high,
                exclude_min=low_out,
                exclude_max=high_out,
                allow_nan=low is None and high is None,
            ),
            st.integers(-3, 3).filter(lambda x: _in_range(x, schema)),
        )
    return st.one_of(
        st.sampled_from(extremes),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-3, 3),
    )


def _strings(schema: dict[str, Any], valid: bool) -> st.SearchStrategy[str]:
    shortest, longest = int(schema.get("minLength", 0)), schema.get("maxLength")
    if valid:

        def fits(text: str) -> bool:
            return shortest <= len(text) and (longest is None or len(text) <= longest)

        return st.one_of(
            st.sampled_from([s for s in NASTY_STRINGS if fits(s)]),
            st.text(min_size=shortest, max_size=longest if longest is not None else 12),
        )
    options = [st.sampled_from(NASTY_STRINGS), st.text(max_size=12)]
    if shortest:
        options.append(st.just("x" * (shortest - 1)))
    if longest is not None:
        options.append(st.just("x" * (longest + 1)))
    return st.one_of(options)


def from_schema(schema: dict[str, Any], valid: bool = False) -> st.SearchStrategy[Json]:
    """Values of the type ``schema`` declares, its boundary values among them: with ``valid``
    only those the schema allows, else out-of-range ones too."""
    if "anyOf" in schema:
        return st.one_of([from_schema(option, valid) for option in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return _integers(schema, valid)
    if kind == "number":
        return _numbers(schema, valid)
    if kind == "string":
        return _strings(schema, valid)
    if kind == "array":
        items = from_schema(schema.get("items", {}), valid)
        low = int(schema.get("minItems", 0))
        shortest = st.just([]) if low == 0 or not valid else st.nothing()
        return st.one_of(st.lists(items, min_size=low, max_size=low + 3), shortest)
    if kind == "object":
        return st.dictionaries(st.text(max_size=8), json_values, max_size=4)
    return json_values  # no type (``Any``): anything


NOTHING: st.SearchStrategy[Any] = st.nothing()


@dataclass(frozen=True)
class Override:
    """What a property means to the server, beyond its schema: values it runs with, and
    (besides the schema's wrong ones) values it must refuse."""

    valid: st.SearchStrategy[Json]
    hostile: st.SearchStrategy[Json] = NOTHING


def valid_field(schema: dict[str, Any], override: Override | None) -> st.SearchStrategy[Json]:
    return from_schema(schema, valid=True) if override is None else override.valid


def hostile_field(schema: dict[str, Any], override: Override | None) -> st.SearchStrategy[Json]:
    semantic = st.nothing() if override is None else override.hostile
    return st.one_of(semantic, semantic, from_schema(schema), json_values)


EXTRA_FIELDS = st.dictionaries(
    st.one_of(
        st.sampled_from(["tools", "stop", "stream_options", "user", "__proto__", "", "\ud800"]),
        st.text(max_size=8),
    ),
    json_values,
    max_size=3,
)


@st.composite
def schema_objects(
    draw: st.DrawFn, model: type[BaseModel], overrides: dict[str, Override] | None = None
) -> dict[str, Json]:
    """A JSON object for ``model``, in one of three modes: every field valid (so the request
    reaches the model with boundary values), one field hostile (wrong type, out of range, or a
    required one missing), or chaos (each field either). Optional fields come and go; extra
    fields are added now and then."""
    overrides = overrides or {}
    schema = model.model_json_schema()
    properties: dict[str, Any] = schema["properties"]
    required = set(schema.get("required", ()))
    mode = draw(st.sampled_from(["valid", "valid", "one-hostile", "one-hostile", "chaos"]))
    body: dict[str, Json] = {}
    for name, prop in properties.items():
        if name in required or draw(st.booleans()):
            hostile = mode == "chaos" and draw(st.integers(0, 2)) == 0
            field = hostile_field if hostile else valid_field
            body[name] = draw(field(prop, overrides.get(name)))
    if mode == "one-hostile":
        name = draw(st.sampled_from(sorted(properties)))
        if name in required and draw(st.integers(0, 3)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(hostile_field(properties[name], overrides.get(name)))
    if draw(st.integers(0, 4)) == 0:
        extras = draw(EXTRA_FIELDS)
        body.update({k: v for k, v in extras.items() if k not in properties})
    return body


def valid_as(model: type[BaseModel], body: Json) -> Any:
    """``body`` parsed by the server's own model, or ``None`` when the server refuses it."""
    try:
        return model.model_validate(body)
    except (ValidationError, TypeError, ValueError):
        return None


# --- chat ----------------------------------------------------------------------------------------

roles = st.sampled_from(["user", "user", "user", "system", "assistant"])
odd_roles = st.one_of(
    st.sampled_from(["tool", "developer", "USER", "", "function"]),
    st.sampled_from(NASTY_STRINGS),
    json_values,
)
texts = st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=30))
good_images = st.sampled_from(GOOD_IMAGES).map(data_url)
good_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": good_images})}
    ),
)
odd_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": json_values}),
    st.fixed_dictionaries({"type": st.just("text")}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": image_strings})}
    ),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": image_strings}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": json_values}),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["image", "input_audio", "file", "", "TEXT"]) | json_values}
    ),
    json_values,
)
good_messages = st.fixed_dictionaries(
    {"role": roles, "content": st.one_of(texts, st.lists(good_parts, min_size=1, max_size=3))}
)
odd_messages = st.fixed_dictionaries(
    {
        "role": st.one_of(roles, odd_roles),
        "content": st.one_of(
            texts, st.lists(st.one_of(good_parts, odd_parts), max_size=4), st.none(), json_values
        ),
    },
    optional={"name": texts, "tool_calls": json_values, "extra": json_values},
)
too_many_images = st.just(
    [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_url(TINY_PNG)}}] * 17,
        }
    ]
)

CHAT_OVERRIDES: dict[str, Override] = {
    "model": Override(st.just("tiny-vlm"), st.sampled_from(["tiny-sd", "nope", "", "\ud800"])),
    "messages": Override(
        st.lists(good_messages, min_size=1, max_size=3),
        st.one_of(
            st.lists(st.one_of(good_messages, odd_messages), min_size=1, max_size=4),
            too_many_images,
        ),
    ),
    "max_tokens": Override(st.integers(1, MAX_NEW_TOKENS)),
    "max_completion_tokens": Override(st.integers(1, MAX_NEW_TOKENS)),
    # what the server supports beyond its schema (``n`` 1, no streaming, no min-p)
    "n": Override(st.just(1)),
    "stream": Override(st.just(False)),
    "min_p": Override(st.sampled_from([0, 0.0, None])),
    "continue_final_message": Override(st.just(False)),
    "response_format": Override(
        st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {"type": st.sampled_from(["json_object", "json_schema", "text"])},
                optional={"json_schema": json_values},
            ),
        ),
        st.fixed_dictionaries({"type": json_values}),
    ),
}


def cheap_chat(body: Json) -> Json:
    """A chat body the server would run, with at most :data:`MAX_NEW_TOKENS` new tokens."""
    parsed = valid_as(ChatBody, body)
    if parsed is None:
        return body
    tokens = parsed.max_completion_tokens or parsed.max_tokens or LM_DEFAULT_MAX_TOKENS
    if MAX_NEW_TOKENS < tokens <= LM_MAX_TOKENS_LIMIT:
        body = {**body, "max_completion_tokens": MAX_NEW_TOKENS}
    return body


chat_bodies = schema_objects(ChatBody, CHAT_OVERRIDES).map(cheap_chat)


def chat_calls() -> st.SearchStrategy[Call]:
    return st.builds(
        lambda body, ascii_only: json_call("/v1/chat/completions", body, ascii_only),
        chat_bodies,
        st.sampled_from([True, True, True, False]),
    )


# --- LoRA ----------------------------------------------------------------------------------------

LORA_OVERRIDES: dict[str, Override] = {
    "lora_name": Override(
        st.one_of(
            st.sampled_from(["tiny-vlm", "tiny-sd", "fuzz", "a/b", "../x", "x" * 300, "\x00"]),
            st.text(max_size=6).map(lambda s: "fuzz-" + s),
        )
    ),
    # never a real adapter: loading one would change the shared session servers
    "lora_path": Override(
        st.sampled_from(
            [
                "/",
                ".",
                "..",
                "/tmp",
                "/etc/passwd",
                "/dev/zero",
                "/dev/null",
                "/proc/self/environ",
                "/nonexistent/adapter",
                "~/adapter",
                "file:///tmp/adapter",
                "some-org/some-adapter",
                "a\x00b",
                "\ud800",
                "x" * 5000,
                "/" + "a/" * 3000,
            ]
        )
    ),
}


def lora_calls(path: str) -> st.SearchStrategy[Call]:
    return st.builds(lambda body: json_call(path, body), schema_objects(LoraBody, LORA_OVERRIDES))


# --- images --------------------------------------------------------------------------------------

GOOD_SIZES = ["16x16", "32x32", "64x64", "64X48", "8x64", "1x1", "50x30", "0016x0016"]
BAD_SIZES = [
    "0x0",
    "0x16",
    "16x0",
    "-16x16",
    "16x-16",
    "+16x16",
    "16.5x16",
    "16x16x16",
    "x16",
    "16x",
    "x",
    "16",
    " 16x16",
    "16x16 ",
    "16 x 16",
    "16×16",  # multiplication sign
    "٣x٣",  # Arabic-Indic digits
    "١٦x١٦",
    "１６x１６",  # full-width digits
    "²x²",  # superscripts: str.isdigit() but not int()
    "𝟙𝟞x𝟙𝟞",  # mathematical digits
    "16x16\x00",
    "\ud800",
    "257x256",
    "256x257",
    "4096x4096",
    "1" + "0" * 30 + "x1",
    "9" * 5000 + "x1",
]
"""Sizes: every valid one at most 64 pixels a side."""

IMAGE_OVERRIDES: dict[str, Override] = {
    "size": Override(
        st.sampled_from([*GOOD_SIZES, "auto", None]),
        st.sampled_from([*BAD_SIZES, "AUTO", ""]),
    ),
    "n": Override(
        st.sampled_from([1, 2]), st.sampled_from([0, -1, 5, 10**30, "2", 2.0, 2.5, True])
    ),
    "num_inference_steps": Override(
        st.sampled_from([1, 2, None]), st.sampled_from([0, -1, 1001, 10**9, "x", "2", 1.5])
    ),
    "prompt": Override(texts.filter(bool), st.just("")),
    "negative_prompt": Override(st.one_of(st.none(), texts)),
    "response_format": Override(st.just("b64_json"), st.sampled_from(["url", "B64_JSON", ""])),
    "output_format": Override(st.sampled_from(["png", "PNG"]), st.sampled_from(["jpeg", ""])),
    "return_transitions": Override(st.just(False), st.just(True)),
    "lora": Override(
        st.none(),
        st.sampled_from(
            [
                {"name": "tiny-sd"},
                {"name": "fuzz", "scale": 1},
                {"name": 1},
                {"name": "fuzz", "scale": math.nan},
                {"name": "fuzz", "local_path": "\x00"},
                "not json",
                '{"name": "fuzz"}',
                "[]",
                "",
                "\ud800",
            ]
        ),
    ),
    "image": Override(st.one_of(good_images, st.sampled_from(GOOD_IMAGES).map(b64)), image_strings),
}


def size_reading(size: str) -> tuple[int, int] | None:
    """Any plausible reading of ``size`` as W×H (generous: non-ASCII digits, spaces, ×)."""
    text = size.strip().lower().replace("×", "x")
    width, sep, height = text.partition("x")
    if not sep:
        return None

    def number(part: str) -> int | None:
        part = part.strip().lstrip("+")
        digits = [unicodedata.digit(c, None) for c in part]
        if not digits or None in digits:
            return None
        return int("".join(str(d) for d in digits))

    w, h = number(width), number(height)
    return None if w is None or h is None else (w, h)


def cheap_image(model: type[GenerationBody], body: Json, generation: bool) -> Json:
    """An image body the server would run, made cheap: ``n`` ≤ 2, ≤ 2 steps, ≤ 64×64."""
    parsed = valid_as(model, body)
    if parsed is None or not isinstance(body, dict):
        return body
    fixes: dict[str, Json] = {}
    if parsed.n > MAX_N:
        fixes["n"] = MAX_N
    if parsed.num_inference_steps is not None and parsed.num_inference_steps > MAX_STEPS:
        fixes["num_inference_steps"] = MAX_STEPS
    size = parsed.size
    if size is None or size.strip().lower() in ("", "auto"):
        if generation:  # the server's default size (512×512) is far too slow for a fuzz run
            fixes["size"] = CHEAP_SIZE
    else:
        reading = size_reading(size)
        if (
            reading is not None
            and max(reading) > MAX_SIDE
            and reading[0] * reading[1] <= MAX_PIXELS
        ):
            fixes["size"] = CHEAP_SIZE
    return {**body, **fixes}


generation_bodies = schema_objects(GenerationBody, IMAGE_OVERRIDES).map(
    lambda body: cheap_image(GenerationBody, body, generation=True)
)
edit_bodies = schema_objects(EditBody, IMAGE_OVERRIDES).map(
    lambda body: cheap_image(EditBody, body, generation=False)
)


def generation_calls() -> st.SearchStrategy[Call]:
    return st.builds(
        lambda body, ascii_only: json_call("/v1/images/generations", body, ascii_only),
        generation_bodies,
        st.sampled_from([True, True, True, False]),
    )


def edit_json_calls() -> st.SearchStrategy[Call]:
    return st.builds(lambda body: json_call("/v1/images/edits", body), edit_bodies)


# --- multipart edits -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    name: bytes
    data: bytes
    filename: bytes | None = None
    content_type: bytes | None = None


def multipart(parts: list[Part], boundary: bytes = b"fuzzboundary7MA4YWxk") -> Call:
    """A ``multipart/form-data`` body built by hand (raw bytes anywhere, unlike a client's)."""
    out = io.BytesIO()
    for part in parts:
        out.write(b"--" + boundary + b"\r\n")
        disposition = b'Content-Disposition: form-data; name="' + part.name + b'"'
        if part.filename is not None:
            disposition += b'; filename="' + part.filename + b'"'
        out.write(disposition + b"\r\n")
        if part.content_type is not None:
            out.write(b"Content-Type: " + part.content_type + b"\r\n")
        out.write(b"\r\n" + part.data + b"\r\n")
    out.write(b"--" + boundary + b"--\r\n")
    content_type = "multipart/form-data; boundary=" + boundary.decode()
    return Call("POST", "/v1/images/edits", out.getvalue(), (("content-type", content_type),))


def form_text(value: Json) -> str:
    """A form field's text for a JSON value (strings as they are, the rest as JSON)."""
    return value if isinstance(value, str) else json.dumps(value, allow_nan=True)


image_files = st.one_of(
    st.builds(lambda data: [Part(b"image", data, b"in.png", b"image/png")], image_bytes),
    st.builds(lambda data: [Part(b"image", data, b"in.png", b"image/png")], image_bytes),
    st.builds(lambda data: [Part(b"image[]", data, b"in.png", b"image/png")], image_bytes),
    st.builds(lambda data: [Part(b"image", data, b"\xff\xfe.png", b"x/y")], image_bytes),
    st.builds(lambda data: [Part(b"image", data, b"", None)], image_bytes),
    st.just([Part(b"image", TINY_PNG, b"a.png"), Part(b"image", TINY_PNG, b"b.png")]),
    st.just([Part(b"image", b64(TINY_PNG).encode())]),  # a text field, not a file
    st.just([]),
)


@st.composite
def edit_form_calls(draw: st.DrawFn) -> Call:
    values = draw(schema_objects(EditBody, IMAGE_OVERRIDES))
    values.pop("image", None)
    strings = {k: form_text(v) for k, v in values.items() if v is not None}  # a form has no null
    fields = cheap_image(EditBody, strings, generation=False)
    parts = [
        Part(name.encode("utf-8", "surrogatepass"), form_text(v).encode("utf-8", "surrogatepass"))
        for name, v in fields.items()
    ]
    if draw(st.integers(0, 5)) == 0:
        parts.append(Part(b"prompt", b"\xff\xfe not utf-8"))
    parts += draw(image_files)
    return multipart(draw(st.permutations(parts)))


# --- raw bodies ----------------------------------------------------------------------------------


def nested_list(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


CHEAP_VALID: dict[str, Json] = {
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": MAX_NEW_TOKENS,
    },
    "/v1/images/generations": {"prompt": "a star", "size": "16x16", "num_inference_steps": 1},
    "/v1/images/edits": {"prompt": "a star", "image": b64(TINY_PNG), "num_inference_steps": 1},
    "/v1/load_lora_adapter": {"lora_name": "fuzz", "lora_path": "/nonexistent/adapter"},
    "/v1/unload_lora_adapter": {"lora_name": "fuzz-not-loaded"},
}
"""A valid (or cleanly refused) cheap body per endpoint, for the wrong-content-type cases."""

ENDPOINTS: list[tuple[str, str]] = [
    ("lm", "/v1/chat/completions"),
    ("lm", "/v1/load_lora_adapter"),
    ("lm", "/v1/unload_lora_adapter"),
    ("image", "/v1/images/generations"),
    ("image", "/v1/images/edits"),
    ("image", "/v1/load_lora_adapter"),
    ("image", "/v1/unload_lora_adapter"),
]

INVALID_JSON = [
    b"{",
    b"}",
    b"[",
    b'{"messages": [}',
    b"{'prompt': 'x'}",
    b'{"prompt": "x",}',
    b'{"prompt": "x"} trailing',
    b'{"prompt": "x"}{"prompt": "y"}',
    b'{"prompt": "\\ud8"}',
    b'{"prompt": "\\x41"}',
    b'{"prompt": "a\nb"}',  # a raw control character in a string
    b'{"prompt" "x"}',
    b"nul",
    b"tru",
    b"-",
    b"01",
    b"\x00",
    b"\xef\xbb\xbf{}",  # UTF-8 byte order mark
    b'{"seed": 1' + b"0" * 5000 + b"}",  # past Python's int-string digit limit
    b'{"seed": 1e999999}',
    b"\t\n\r ",
]
NOT_OBJECTS = [
    b"null",
    b"1",
    b"-0",
    b"1e999",
    b'"x"',
    b'"\\ud800"',
    b"[]",
    b"[{}]",
    b"true",
    b"[null]",
]
NOT_UTF8 = [
    b'{"prompt": "\xff"}',
    b'{"prompt": "\xc3("}',
    b'{"prompt": "\xed\xa0\x80"}',  # an encoded surrogate (CESU-8)
    b"\xff\xfe{\x00}\x00",
    b"\x80",
]


@st.composite
def raw_calls(draw: st.DrawFn, path: str) -> Call:
    json_type = (("content-type", "application/json"),)
    valid = json_bytes(CHEAP_VALID[path])
    kind = draw(st.sampled_from(["invalid", "not-object", "utf", "deep", "deep-field", "type"]))
    if kind == "invalid":
        return Call("POST", path, draw(st.sampled_from(INVALID_JSON)), json_type)
    if kind == "not-object":
        return Call("POST", path, draw(st.sampled_from(NOT_OBJECTS)), json_type)
    if kind == "utf":
        body = draw(
            st.one_of(
                st.sampled_from(NOT_UTF8),
                st.sampled_from(["utf-16", "utf-32", "utf-16-le"]).map(
                    lambda codec: json.dumps(CHEAP_VALID[path]).encode(codec)
                ),
            )
        )
        return Call("POST", path, body, json_type)
    if kind in ("deep", "deep-field"):
        depth = draw(st.sampled_from([500, 990, 1000, 1001, 5000, 100_000]))
        nested = draw(st.sampled_from([nested_list, nested_object]))(depth)
        if kind == "deep":
            return Call("POST", path, nested, json_type)
        field = draw(st.sampled_from(["messages", "prompt", "lora", "response_format", "extra"]))
        body = valid[:-1] + b', "' + field.encode() + b'": ' + nested + b"}"
        return Call("POST", path, body, json_type)
    content_type = draw(
        st.sampled_from(
            [
                None,
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data",
                "multipart/form-data; boundary=fuzz",
                "multipart/form-data; boundary=",
                "application/json; charset=latin-1",
                "application/json; charset=utf-16",
                "application/jsonx",
                "image/png",
            ]
        )
    )
    body = draw(st.sampled_from([valid, b"", b"image=x&prompt=y", TINY_PNG, b"x" * 1_100_000]))
    return Call(
        "POST", path, body, () if content_type is None else (("content-type", content_type),)
    )


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(lm_server: Any, image_server: Any) -> dict[str, Any]:
    return {"lm": lm_server, "image": image_server}


@pytest.fixture(scope="module")
def locked_servers(vlm_service: Any, image_service: Any) -> Iterator[dict[str, Any]]:
    """Both servers again, each with the bearer token ``t``."""
    from nodes.backends.servers.http_common import BackgroundServer, ServerLimits
    from nodes.backends.servers.image_server import create_image_app
    from nodes.backends.servers.lm_server import create_lm_app
    from tests.tiny_models import SERVER_LIMITS

    limits = ServerLimits(**SERVER_LIMITS)
    lm = BackgroundServer(create_lm_app(vlm_service, token="t", limits=limits)).start()
    image = BackgroundServer(create_image_app(image_service, token="t", limits=limits)).start()
    yield {"lm": lm, "image": image}
    lm.stop()
    image.stop()


# --- the fuzz tests ------------------------------------------------------------------------------


@fuzz_settings(120)
@given(call=chat_calls())
def test_chat_completions_survive_fuzzed_bodies(servers: dict[str, Any], call: Call) -> None:
    exercise(servers["lm"], call)


@fuzz_settings(60)
@given(call=generation_calls())
def test_image_generations_survive_fuzzed_bodies(servers: dict[str, Any], call: Call) -> None:
    exercise(servers["image"], call)


@fuzz_settings(40)
@given(call=edit_json_calls())
def test_json_image_edits_survive_fuzzed_bodies(servers: dict[str, Any], call: Call) -> None:
    exercise(servers["image"], call)


@fuzz_settings(40)
@given(call=edit_form_calls())
def test_multipart_image_edits_survive_fuzzed_forms(servers: dict[str, Any], call: Call) -> None:
    exercise(servers["image"], call)


@pytest.mark.parametrize("which", ["lm", "image"])
@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
@fuzz_settings(15)
@given(data=st.data())
def test_lora_endpoints_survive_fuzzed_bodies(
    servers: dict[str, Any], which: str, path: str, data: st.DataObject
) -> None:
    exercise(servers[which], data.draw(lora_calls(path)))


@pytest.mark.parametrize(("which", "path"), ENDPOINTS)
@fuzz_settings(25)
@given(data=st.data())
def test_endpoints_survive_raw_body_mutations(
    servers: dict[str, Any], which: str, path: str, data: st.DataObject
) -> None:
    exercise(servers[which], data.draw(raw_calls(path)))


@pytest.mark.parametrize("which", ["lm", "image"])
def test_get_endpoints_answer_json(servers: dict[str, Any], which: str) -> None:
    for path in ("/v1/models", "/stats", "/openapi.json"):
        response = exercise(servers[which], Call("GET", path))
        assert response.status_code == 200, report(Call("GET", path), response, "not 200")
        response.json()
    for call in (
        Call("GET", "/v1/nope"),
        Call("GET", "/v1/chat/completions" if which == "lm" else "/v1/images/generations"),
        Call("DELETE", "/health"),
    ):
        response = exercise(servers[which], call)
        assert 400 <= response.status_code < 500, report(call, response, "not a 4xx")


# --- regressions: the 500s found so far, one plain test each -------------------------------------


@pytest.mark.parametrize(("which", "path"), ENDPOINTS)
@pytest.mark.parametrize("nest", [nested_list, nested_object], ids=["list", "object"])
def test_json_nested_1000_deep_is_a_client_error(
    servers: dict[str, Any], which: str, path: str, nest: Callable[[int], bytes]
) -> None:
    call = Call("POST", path, nest(1000), (("content-type", "application/json"),))
    response = exercise(servers[which], call)
    assert 400 <= response.status_code < 500, report(call, response, "not a 4xx")


@pytest.mark.parametrize(
    "content",
    ["\ud800", "a\udfffb", [{"type": "text", "text": "\ud800"}]],
    ids=["string", "inner", "text-part"],
)
def test_lone_surrogate_in_chat_text_is_not_a_server_error(
    servers: dict[str, Any], content: Json
) -> None:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": MAX_NEW_TOKENS}
    exercise(servers["lm"], json_call("/v1/chat/completions", body))


def test_lone_surrogate_in_chat_role_is_not_a_server_error(servers: dict[str, Any]) -> None:
    body = {"messages": [{"role": "\ud800", "content": "hi"}], "max_tokens": MAX_NEW_TOKENS}
    exercise(servers["lm"], json_call("/v1/chat/completions", body))


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 5e-324},
        {"temperature": 1e-300},
        {"temperature": 1e-45},
        {"repetition_penalty": 5e-324},
        {"repetition_penalty": 1e-300},
        {"temperature": 1e308, "repetition_penalty": 1e308},
    ],
    ids=lambda sampling: "-".join(f"{k}={v}" for k, v in sampling.items()),
)
def test_extreme_sampling_values_are_not_a_server_error(
    servers: dict[str, Any], sampling: dict[str, float]
) -> None:
    """Valid by the schema (> 0), but scaling the logits by them overflows to inf / NaN."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": 1, **sampling}
    exercise(servers["lm"], json_call("/v1/chat/completions", body))


def test_1000_inference_steps_is_not_a_server_error(servers: dict[str, Any]) -> None:
    body = {"prompt": "a star", "size": "16x16", "num_inference_steps": 1000, "seed": 1}
    exercise(servers["image"], json_call("/v1/images/generations", body))


@pytest.mark.parametrize("which", ["lm", "image"])
def test_openapi_json_is_served(servers: dict[str, Any], which: str) -> None:
    call = Call("GET", "/openapi.json")
    response = exercise(servers[which], call)
    assert response.status_code == 200, report(call, response, "not 200")
    assert isinstance(response.json().get("paths"), dict)


@pytest.mark.parametrize("which", ["lm", "image"])
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_scheme_is_case_insensitive(
    locked_servers: dict[str, Any], which: str, scheme: str
) -> None:
    call = Call("GET", "/v1/models")
    response = exercise(locked_servers[which], call, [("authorization", f"{scheme} t")])
    assert response.status_code == 200, report(call, response, f"'{scheme} t' refused")


@pytest.mark.parametrize("which", ["lm", "image"])
@pytest.mark.parametrize("given_header", [None, "Bearer u", "Basic t", "t", "Bearer", ""])
def test_a_wrong_token_is_a_shaped_401(
    locked_servers: dict[str, Any], which: str, given_header: str | None
) -> None:
    call = Call("GET", "/v1/models")
    headers = [] if given_header is None else [("authorization", given_header)]
    response = exercise(locked_servers[which], call, headers)
    assert response.status_code == 401, report(call, response, "not 401")


@pytest.mark.parametrize("size", ["٣x٣", "١٦x١٦", "１６x１６", "²x²", "𝟙𝟞x𝟙𝟞"])
def test_non_ascii_digits_in_size_are_a_400(servers: dict[str, Any], size: str) -> None:
    body = {"prompt": "a star", "size": size, "num_inference_steps": 1}
    call = json_call("/v1/images/generations", body)
    response = exercise(servers["image"], call)
    assert response.status_code == 400, report(call, response, "not 400")
