"""R3 reflection format and decomposition JSON: exact cases and properties."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from nodes.formats import (
    STOP_PHRASE,
    SubTask,
    format_reflection,
    format_subtasks,
    is_stop_phrase,
    parse_reflection,
    parse_subtasks,
)


def test_well_formed_edit():
    parsed = parse_reflection("<think>Only two cats.</think>Add two more cats.")
    assert parsed.thought == "Only two cats."
    assert parsed.instruction == "Add two more cats."
    assert parsed.well_formed and not parsed.stop


def test_well_formed_stop():
    parsed = parse_reflection("<think>Matches.</think>No further edit needed.")
    assert parsed.stop and parsed.well_formed and parsed.instruction == ""


def test_stop_phrase_variants():
    for text in (
        "no further edit needed",
        "No Further Edit Needed!",
        "No further edits needed",
        "  no   further edit is needed. ",
    ):
        assert is_stop_phrase(text), text
    for text in ("Add a cat. No further edit needed", "further edit needed", "No edit needed"):
        assert not is_stop_phrase(text), text


def test_malformed_variants():
    cases = {
        "Add a dog.": ("Add a dog.", False),  # no think block: instruction kept, flagged
        "<think>x</think>": ("", False),  # nothing after the thought
        "<think></think>Add a dog.": ("Add a dog.", False),  # empty thought
        "<think>x</think>Add a dog.\nRemove a cat.": ("Add a dog.\nRemove a cat.", False),
        "<think>x</think>Add <think>y</think>": (None, False),  # nested/duplicate tags
    }
    for text, (instruction, well_formed) in cases.items():
        parsed = parse_reflection(text)
        assert parsed.well_formed is well_formed, text
        assert not parsed.stop
        if instruction is not None:
            assert parsed.instruction == instruction, text


def test_stop_inside_malformed_output_is_honoured():
    parsed = parse_reflection("I think no further edit needed here")
    assert parsed.stop and not parsed.well_formed and parsed.instruction == ""


@given(st.text(max_size=300))
def test_parse_reflection_never_raises_and_is_consistent(text):
    parsed = parse_reflection(text)
    assert not (parsed.stop and parsed.instruction)
    if parsed.well_formed:
        assert parsed.thought and (parsed.stop or parsed.instruction)


@given(
    st.text(min_size=1, max_size=80).filter(lambda s: s.strip() and "<" not in s),
    st.one_of(
        st.none(),
        st.text(min_size=1, max_size=80).filter(
            lambda s: s.strip() and "<" not in s and "\n" not in s and not is_stop_phrase(s)
        ),
    ),
)
def test_format_then_parse_round_trips(thought, instruction):
    parsed = parse_reflection(format_reflection(thought, instruction))
    assert parsed.thought == thought.strip()
    assert parsed.well_formed
    if instruction is None:
        assert parsed.stop
    else:
        assert parsed.instruction == instruction.strip() and not parsed.stop


def test_stop_phrase_constant_is_r3s():
    assert STOP_PHRASE == "No further edit needed"


def test_subtasks_round_trip_and_code_fence():
    steps = [
        SubTask("Draw a red circle.", "a red circle"),
        SubTask("Add a blue square to the right.", "a red circle left of a blue square"),
    ]
    text = format_subtasks(steps)
    assert parse_subtasks(text) == (steps, True)
    assert parse_subtasks(f"```json\n{text}\n```") == (steps, True)


def test_subtasks_malformed():
    for text in (
        "",
        "nope",
        "[]",
        '{"steps": []}',
        '{"steps": "a"}',
        '{"steps": [1]}',
        '{"steps": [{"instruction": "x"}]}',
        '{"steps": [{"instruction": " ", "expect": "y"}]}',
        "[" * 5000,
    ):
        assert parse_subtasks(text) == ([], False), text


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_parse_subtasks_never_raises(payload):
    steps, ok = parse_subtasks(json.dumps(payload))
    assert ok == bool(steps)
