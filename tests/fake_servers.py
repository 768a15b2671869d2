"""A cheap loopback model server speaking Atelier's protocol subset, for fault and load tests.

One Starlette app serves the OpenAI chat API (``/v1/chat/completions``, ``/v1/models``) and the
vLLM-Omni image API (``/v1/images/generations``, ``/v1/images/edits``), answering every call
after ``latency_s`` with no model behind it:

- a plan (no ``response_format``, no image): a blueprint naming the prompt;
- a decomposition (``response_format`` set): two sub-tasks as JSON;
- a reflection (the request carries an image): an edit instruction or R3's stop phrase, chosen
  from the request's seed (``edit_percent`` of them edit), so a trajectory's path depends only
  on its seed — a resumed trajectory answers as the uninterrupted one would have;
- images: an 8×8 PNG whose colour comes from the seed (and the instruction, for edits), so
  different steps store different images.

``FakeModelServer`` keeps counts (requests per path, in flight now and at most), which tests use
to check what reached the server. ``python -m tests.fake_servers --port P`` serves it (uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
from collections import Counter
from typing import Any

from PIL import Image

STOP = "<think>The image matches the target.</think>No further edit needed."
EDIT = "<think>One shape is missing.</think>Add one more red circle on the left."
DECOMPOSITION = json.dumps(
    {
        "steps": [
            {"instruction": "Draw the main objects.", "expect": "the main objects"},
            {"instruction": "Add the remaining objects.", "expect": "the whole scene"},
        ]
    }
)


class FakeModelServer:
    """The app and its counters. ``app`` is an ASGI app (serve it with ``BackgroundServer``)."""

    def __init__(self, latency_s: float = 0.0, edit_percent: int = 0) -> None:
        self.latency_s = latency_s
        self.edit_percent = edit_percent
        self.requests: Counter[str] = Counter()
        self.in_flight = 0
        self.peak_in_flight = 0
        self.app = self._build()

    def _build(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, PlainTextResponse
        from starlette.routing import Route

        async def chat(request: Request) -> JSONResponse:
            async with self._counted("chat"):
                body = await request.json()
                await asyncio.sleep(self.latency_s)
                return JSONResponse(self.chat_answer(body))

        async def generations(request: Request) -> JSONResponse:
            async with self._counted("images.generations"):
                body = await request.json()
                await asyncio.sleep(self.latency_s)
                return JSONResponse({"created": 0, "data": [{"b64_json": _png(body)}]})

        async def edits(request: Request) -> JSONResponse:
            async with self._counted("images.edits"):
                form = await request.form()
                fields = {k: v for k, v in form.items() if isinstance(v, str)}
                await asyncio.sleep(self.latency_s)
                return JSONResponse({"created": 0, "data": [{"b64_json": _png(fields)}]})

        async def models(request: Request) -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

        async def health(request: Request) -> PlainTextResponse:
            return PlainTextResponse("")

        return Starlette(
            routes=[
                Route("/v1/chat/completions", chat, methods=["POST"]),
                Route("/v1/images/generations", generations, methods=["POST"]),
                Route("/v1/images/edits", edits, methods=["POST"]),
                Route("/v1/models", models),
                Route("/health", health),
            ]
        )

    def _counted(self, kind: str) -> _InFlight:
        self.requests[kind] += 1
        return _InFlight(self)

    def chat_answer(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        has_image = any(
            isinstance(m.get("content"), list)
            and any(part.get("type") == "image_url" for part in m["content"])
            for m in messages
        )
        seed = int(body.get("seed") or 0)
        if body.get("response_format"):
            text = DECOMPOSITION
        elif has_image:
            text = EDIT if (seed // 7) % 100 < self.edit_percent else STOP
        else:
            prompt = messages[-1].get("content") if messages else ""
            text = f"A blueprint of {prompt}"
        words = text.split()
        return {
            "id": "fake",
            "object": "chat.completion",
            "model": body.get("model") or "m",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "token_ids": list(range(1, len(words) + 1)),
                    "message": {"role": "assistant", "content": text},
                    "logprobs": {
                        "content": [
                            {"token": w, "logprob": -0.25, "bytes": None, "top_logprobs": []}
                            for w in words
                        ]
                    },
                }
            ],
        }


class _InFlight:
    def __init__(self, server: FakeModelServer) -> None:
        self.server = server

    async def __aenter__(self) -> None:
        self.server.in_flight += 1
        self.server.peak_in_flight = max(self.server.peak_in_flight, self.server.in_flight)

    async def __aexit__(self, *exc: object) -> None:
        self.server.in_flight -= 1


def _png(fields: dict[str, Any]) -> str:
    digest = hashlib.sha256(f"{fields.get('seed')}|{fields.get('prompt')}".encode()).digest()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), tuple(digest[:3])).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def serve(port: int, latency_s: float = 0.0, edit_percent: int = 0) -> None:
    """Serve in the foreground (a separate process: benchmarks, subprocess tests)."""
    import uvicorn

    app = FakeModelServer(latency_s, edit_percent).app
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", backlog=4096)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--edit-percent", type=int, default=0)
    args = parser.parse_args()
    serve(args.port, args.latency_ms / 1000, args.edit_percent)
