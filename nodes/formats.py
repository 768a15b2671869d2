"""Text formats the nodes read and write: R3 reflections and decomposition plans.

Parsers never raise on model output: a malformed output is reported as such (``well_formed``
False) together with the best reading of it, so the graph records it and carries on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

STOP_PHRASE = "No further edit needed"
"""R3's termination signal, recognised case-insensitively (see :func:`says_stop` for the rule)."""

_STOP_RE = re.compile(r"no\s+further\s+edits?\s+(?:(?:is|are)\s+)?needed", re.IGNORECASE)
"""The stop phrase's accepted wordings: case, spacing, "edit(s)", "is/are needed"."""
_REFLECTION_RE = re.compile(r"^\s*<think>(?P<thought>.*?)</think>(?P<rest>.*)$", re.DOTALL)
_THINK_TAG_RE = re.compile(r"</?think>")
_WRAPPING = "*_`\"'\u201c\u201d\u2018\u2019"
"""Markdown emphasis, code ticks and straight or curly quotes, stripped from both ends."""
_LEADING = _WRAPPING + "#>-"
"""Also stripped from the start: markdown heading, block-quote and bullet marks."""
_TRAILING = _WRAPPING + ".!"
_BOUNDARY_RE = re.compile(r"[.!?:\n]")
"""Where a sentence ends (with or without a space after it). Commas and semicolons do not end
one, so "Make the star red; no further edit needed" is one sentence, an instruction."""


@dataclass(frozen=True)
class ParsedReflection:
    thought: str
    """The reasoning before ``</think>`` ('' when there is no think block)."""
    instruction: str
    """The edit instruction: the answer part when it is not a stop ('' when it is, or empty)."""
    stop: bool
    """The answer part says R3's stop phrase (:func:`says_stop`)."""
    well_formed: bool
    """Exactly R3's format: one non-empty think block, then either the bare stop phrase (case,
    spacing and a final ``.``/``!`` aside) or one single-line instruction."""


def _bare(text: str) -> str:
    """``text`` without surrounding whitespace, markdown emphasis, code ticks, quotes, heading
    or bullet marks and trailing ``.``/``!`` (inner text and line breaks kept)."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip().lstrip(_LEADING).rstrip(_TRAILING)
    return text


def is_stop_phrase(text: str) -> bool:
    """True when ``text`` is only the stop phrase, ignoring case, spacing, markdown emphasis,
    quotes, code ticks and trailing punctuation ("**No further edit needed.**" is)."""
    return bool(_STOP_RE.fullmatch(_bare(text)))


def says_stop(answer: str) -> bool:
    """R3's stop rule, applied to a reflection's *answer part* (what follows the think block;
    the whole text when there is none): it stops iff the whole answer, its first sentence or
    its last sentence is the stop phrase (:func:`is_stop_phrase`: case, spacing, markdown
    emphasis, quotes, code ticks and final punctuation aside). Sentences end at ``.``, ``!``,
    ``?``, ``:`` or a line break. So "The image matches. No further edit needed." and "No
    further edit needed: the image matches." stop, while an instruction that merely mentions
    the phrase ("Make the star red; no further edit needed after that") does not, nor does a
    phrase buried in a clause ("It matches, so no further edit is needed.")."""
    if is_stop_phrase(answer):
        return True
    sentences = [s for s in _BOUNDARY_RE.split(_bare(answer)) if _bare(s)]
    return bool(sentences) and (is_stop_phrase(sentences[0]) or is_stop_phrase(sentences[-1]))


def _is_r3_stop(answer: str) -> bool:
    """The answer is R3's stop line as R3 writes it (case, spacing and a final ``.``/``!``
    aside): what a well-formed stop must be."""
    return bool(_STOP_RE.fullmatch(" ".join(answer.strip().rstrip(".!").split())))


def format_reflection(thought: str, instruction: str | None) -> str:
    """Render a reflection in R3's format; ``instruction=None`` means stop."""
    tail = f"{STOP_PHRASE}." if instruction is None else instruction.strip()
    return f"<think>{thought.strip()}</think>{tail}"


def parse_reflection(text: str) -> ParsedReflection:
    """Split a reflection into thought and answer, and apply :func:`says_stop` to the answer.

    The answer is what follows the think block. Output not in R3's format is read the same way:
    with a ``</think>`` (duplicate blocks, or a model whose chat template opened the block in
    the prompt) the answer is what follows the last one; with none (no think block, or one
    never closed) it is the whole text, tags removed. Such output is never well-formed; a
    non-stop answer is still kept as the instruction, so a forgiving editor may use it.
    """
    match = _REFLECTION_RE.match(text)
    if match is not None and not _THINK_TAG_RE.search(match["rest"]):
        thought, answer = match["thought"].strip(), match["rest"].strip()
        answer = answer if _bare(answer) else ""  # only emphasis marks or quotes: no answer
        if says_stop(answer):
            well_formed = bool(thought) and _is_r3_stop(answer)
            return ParsedReflection(thought, "", stop=True, well_formed=well_formed)
        # Exactly one instruction: a single line. Several lines mean several edits.
        well_formed = bool(thought) and bool(answer) and "\n" not in answer
        return ParsedReflection(thought, answer, stop=False, well_formed=well_formed)
    head, closed, tail = text.rpartition("</think>")
    thought = _THINK_TAG_RE.sub(" ", head).strip() if closed else ""
    answer = _THINK_TAG_RE.sub(" ", tail if closed else text).strip()
    answer = answer if _bare(answer) else ""
    stop = says_stop(answer)
    return ParsedReflection(thought, "" if stop else answer, stop, well_formed=False)


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
