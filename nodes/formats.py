"""Text formats the nodes read and write: R3 reflections and decomposition plans.

Parsers never raise on model output: a malformed output is reported as such (``well_formed``
False) together with the best reading of it, so the graph records it and carries on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

STOP_PHRASE = "No further edit needed"
"""R3's termination signal, recognised case-insensitively."""

_STOP_RE = re.compile(r"no\s+further\s+edits?\s+(?:is\s+)?needed", re.IGNORECASE)
_REFLECTION_RE = re.compile(r"^\s*<think>(?P<thought>.*?)</think>(?P<rest>.*)$", re.DOTALL)


@dataclass(frozen=True)
class ParsedReflection:
    thought: str
    """The reasoning inside ``<think>…</think>`` ('' when absent)."""
    instruction: str
    """The edit instruction after the think block ('' when it is the stop phrase or missing)."""
    stop: bool
    """The model said R3's stop phrase."""
    well_formed: bool
    """Exactly R3's format: one think block, then either the stop phrase or one instruction."""


def is_stop_phrase(text: str) -> bool:
    """True when ``text`` is (only) the stop phrase, ignoring case, spacing and punctuation."""
    stripped = text.strip().strip(".!").strip()
    return bool(_STOP_RE.fullmatch(stripped))


def format_reflection(thought: str, instruction: str | None) -> str:
    """Render a reflection in R3's format; ``instruction=None`` means stop."""
    tail = f"{STOP_PHRASE}." if instruction is None else instruction.strip()
    return f"<think>{thought.strip()}</think>{tail}"


def parse_reflection(text: str) -> ParsedReflection:
    match = _REFLECTION_RE.match(text)
    if match is None or "<think>" in match["rest"] or "</think>" in match["rest"]:
        # Not R3's format. Still honour a stop phrase anywhere in it (a model that drops the
        # think block but clearly says stop should stop); otherwise keep the text as the
        # instruction so a forgiving editor may still use it.
        stop = bool(_STOP_RE.search(text))
        cleaned = re.sub(r"</?think>", " ", text).strip()
        return ParsedReflection("", "" if stop else cleaned, stop, well_formed=False)
    thought, rest = match["thought"].strip(), match["rest"].strip()
    if is_stop_phrase(rest):
        return ParsedReflection(thought, "", stop=True, well_formed=bool(thought))
    if not rest:
        return ParsedReflection(thought, "", stop=False, well_formed=False)
    # Exactly one instruction: a single line. Several lines mean several edits, not R3's format.
    single = "\n" not in rest
    return ParsedReflection(thought, rest, stop=False, well_formed=bool(thought) and single)


@dataclass(frozen=True)
class SubTask:
    instruction: str
    """What to do in this step ("Draw two red circles.", "Add a blue square above them.")."""
    expect: str
    """What the image should show after this step; the step's evaluation checks against it."""


SUBTASKS_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "steps": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "instruction": {"type": "string"},
                    "expect": {"type": "string"},
                },
                "required": ["instruction", "expect"],
            },
        }
    },
    "required": ["steps"],
}
"""JSON schema of a decomposition, passed to servers as ``response_format``."""


def format_subtasks(steps: list[SubTask]) -> str:
    payload = {"steps": [{"instruction": s.instruction, "expect": s.expect} for s in steps]}
    return json.dumps(payload)


def parse_subtasks(text: str) -> tuple[list[SubTask], bool]:
    """Parse a decomposition. Returns (steps, well_formed); steps is empty when unusable."""
    try:
        payload = json.loads(_strip_code_fence(text))
    except (json.JSONDecodeError, RecursionError):
        return [], False
    raw = payload.get("steps") if isinstance(payload, dict) else None
    if not isinstance(raw, list) or not raw:
        return [], False
    steps: list[SubTask] = []
    for item in raw:
        if not isinstance(item, dict):
            return [], False
        instruction, expect = item.get("instruction"), item.get("expect")
        if not isinstance(instruction, str) or not isinstance(expect, str):
            return [], False
        if not instruction.strip() or not expect.strip():
            return [], False
        steps.append(SubTask(instruction.strip(), expect.strip()))
    return steps, True


def _strip_code_fence(text: str) -> str:
    fenced = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, re.DOTALL)
    return fenced[1] if fenced else text
