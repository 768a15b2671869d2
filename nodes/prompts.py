"""Prompt templates of the text roles. Plain strings a reader can audit in one screen.

The reflection template follows R3: compare the image with the target, then either say the
stop phrase or give exactly one editing instruction after a ``<think>`` block.
"""

from __future__ import annotations

from nodes.backends.base import ChatMessage
from nodes.formats import STOP_PHRASE

PLAN_SYSTEM = (
    "You are the planner of an image generator. Expand the user's request into a precise "
    "blueprint: every object with its count, colour and position, and the layout of the scene. "
    "Answer with the blueprint only."
)

DECOMPOSE_SYSTEM = (
    "You split a complex image request into ordered steps. The first step draws part of the "
    "scene; each next step is one edit that adds to it. For every step give the instruction and "
    "what the image should show after it. Answer with JSON: "
    '{"steps": [{"instruction": "...", "expect": "..."}]}'
)

REFLECT_SYSTEM = (
    "You check a generated image against its target description. Think inside <think>...</think>: "
    "state the target, describe what the image shows, and compare. Then, if the image matches, "
    f'answer exactly "{STOP_PHRASE}." Otherwise give exactly one editing instruction that fixes '
    "the most important difference."
)


def plan_messages(prompt: str) -> list[ChatMessage]:
    return [ChatMessage("system", PLAN_SYSTEM), ChatMessage("user", prompt)]


def decompose_messages(prompt: str) -> list[ChatMessage]:
    return [ChatMessage("system", DECOMPOSE_SYSTEM), ChatMessage("user", prompt)]


def reflect_messages(target: str, image, ref: str | None = None) -> list[ChatMessage]:
    """``ref``: the image's store reference, which the step records in place of the pixels."""
    return [
        ChatMessage("system", REFLECT_SYSTEM),
        ChatMessage(
            "user",
            f"The target description is: {target}",
            images=(image,),
            image_refs=() if ref is None else (ref,),
        ),
    ]
