"""Format rewards R_f: 1 when a text output follows its required format, else 0.

The parsers are the graph's own (``nodes.formats``), so "well formed" means exactly what the
nodes accept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodes.formats import parse_reflection, parse_subtasks


def reflection_format_reward(text: str) -> float:
    """R3: r_format = 1 if the reflection is ``<think>…</think>`` then exactly one instruction (or
    the stop phrase), else 0."""
    return 1.0 if parse_reflection(text).well_formed else 0.0


def blueprint_format_reward(text: str) -> float:
    """R3's r_format of the reason stage's text, the blueprint: 1 if the plan node can use it
    (any non-empty text: the graph asks for no other format, and replaces an empty blueprint
    with the prompt), else 0."""
    return 1.0 if text.strip() else 0.0


def plan_format_reward(text: str) -> float:
    """r_format = 1 if the decomposition is a valid JSON plan (``{"steps": [{instruction,
    expect}, …]}``, non-empty), else 0."""
    return 1.0 if parse_subtasks(text)[1] else 0.0


def trajectory_format_reward(state: Mapping[str, Any]) -> float:
    """SAIR's binary R_f for a whole trajectory (a state dict): 1 if every reflection text
    and the decomposition (if any) are well formed, else 0. A trajectory with no formatted
    output (direct mode) has nothing malformed: 1."""
    for reflection in state.get("reflections", ()):
        if not reflection_format_reward(reflection["text"]):
            return 0.0
    return 0.0 if state.get("subtasks_well_formed") is False else 1.0
