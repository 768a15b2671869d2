"""R3 reflection format and decomposition JSON: exact cases and properties."""

from __future__ import annotations

import json

import pytest
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
    says_stop,
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


def test_a_stop_phrase_merely_mentioned_without_think_block_is_not_a_stop():
    # This test used to assert the opposite: without a think block the phrase counted anywhere
    # in the text (the bug of issue 15). Now the rule is the same with or without the block.
    parsed = parse_reflection("I think no further edit needed here")
    assert not parsed.stop and not parsed.well_formed
    assert parsed.instruction == "I think no further edit needed here"
    parsed = parse_reflection("I checked the image. No further edit needed.")
    assert parsed.stop and not parsed.well_formed and parsed.instruction == ""


# Realistic reflector outputs -> (stop, instruction, well_formed). One rule for all of them: the
# answer part (after the think block, else the whole text) stops iff it, its first sentence or
# its last sentence is the stop phrase once markdown emphasis, quotes, code ticks and final
# punctuation are stripped. Well-formed = R3's exact format (decorations are not).
REFLECTIONS = [
    # R3's own format
    ("<think>It matches.</think>No further edit needed.", True, "", True),
    ("<think>It matches.</think>no further edit needed", True, "", True),
    ("<think>It matches.</think>  No further edits needed! \n", True, "", True),
    ("<think>It matches.</think>No further edit is needed.", True, "", True),
    ("<think>It matches.</think>NO FURTHER EDITS ARE NEEDED", True, "", True),
    ("<think>One star only.</think>Add a red star.", False, "Add a red star.", True),
    # the measured bugs: stop phrases after a think block that were read as instructions
    ("<think>Done.</think>The image matches. No further edit needed.", True, "", False),
    ("<think>Done.</think>**No further edit needed.**", True, "", False),
    ('<think>Done.</think>"No further edit needed."', True, "", False),
    ("<think>Done.</think>`No further edit needed`", True, "", False),
    ("<think>Done.</think>\u201cNo further edit needed.\u201d", True, "", False),
    ("<think>Done.</think>*No further edit needed*.", True, "", False),
    ("<think>Done.</think>The image matches.No further edit needed.", True, "", False),
    ("<think>Done.</think>Answer: No further edit needed.", True, "", False),
    ("<think>Done.</think>No further edit needed: the image matches.", True, "", False),
    ("<think>Done.</think>No further edit needed. It matches the prompt.", True, "", False),
    ("<think>Done.</think>The image is correct.\n\n**No further edit needed.**", True, "", False),
    ("<think>Done.</think>No further edit needed.\nNo further edit needed.", True, "", False),
    # mentions of the phrase inside an instruction are instructions
    (
        "<think>Star is blue.</think>Make the star red; no further edit needed after that.",
        False,
        "Make the star red; no further edit needed after that.",
        True,
    ),
    (
        "Make the star red; no further edit needed after that",
        False,
        "Make the star red; no further edit needed after that",
        False,
    ),
    (
        "<think>Almost.</think>Add a circle so that no further edit is needed.",
        False,
        "Add a circle so that no further edit is needed.",
        True,
    ),
    (
        "<think>Hm.</think>It matches, so no further edit is needed.",
        False,
        "It matches, so no further edit is needed.",
        True,
    ),
    # no think block: the same rule on the whole text, never well-formed
    ("No further edit needed.", True, "", False),
    ("**No further edit needed.**", True, "", False),
    ("The image matches the prompt. No further edit needed.", True, "", False),
    ("Add a blue square.", False, "Add a blue square.", False),
    # a think block opened by the chat template (only its end is in the output)
    ("The image matches.</think>No further edit needed.", True, "", False),
    ("Two cats, not three.</think>Add one cat.", False, "Add one cat.", False),
    # a think block never closed: all of it is the answer
    ("<think>The image matches the target.No further edit needed.", True, "", False),
    # empty answers and answers that are only a think block
    ("", False, "", False),
    ("   ", False, "", False),
    ("<think>It matches.</think>", False, "", False),
    ("<think>It matches. No further edit needed.</think>", False, "", False),
    ("<think>It matches.</think>**  **", False, "", False),
    ('<think>It matches.</think>""', False, "", False),
    # several lines of instructions are not R3's one instruction
    ("<think>x</think>Add a dog.\nRemove a cat.", False, "Add a dog.\nRemove a cat.", False),
]


@pytest.mark.parametrize(("text", "stop", "instruction", "well_formed"), REFLECTIONS)
def test_realistic_reflections(text, stop, instruction, well_formed):
    parsed = parse_reflection(text)
    assert (parsed.stop, parsed.instruction, parsed.well_formed) == (
        stop,
        instruction,
        well_formed,
    )


def test_says_stop_is_the_rule_parse_reflection_applies():
    for text, stop, _, _ in REFLECTIONS:
        answer = text.rpartition("</think>")[2] if "</think>" in text else text
        assert says_stop(answer.replace("<think>", "")) is stop, text


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
            lambda s: (
                any(c.isalnum() for c in s) and "<" not in s and "\n" not in s and not says_stop(s)
            )
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
