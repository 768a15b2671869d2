"""The calibration claims of ShapeWorld, measured through the real graph on a fixed seed set.

Direct is right on simple prompts and poor on complex ones; reflect-refine fixes much of the
middle; decompose wins on the most complex. Numbers, not "it ran".
"""

from __future__ import annotations

import asyncio

import pytest

from agent_graph.demo import run_demo

pytestmark = pytest.mark.slow  # see pyproject's markers: make test-fast skips it

SIMPLE = ("single_object", "colors")
MIDDLE = ("two_objects", "counting", "color_count", "attribute_binding", "position")
COMPLEX = ("position_count", "multi_count")


@pytest.fixture(scope="module")
def report():
    return asyncio.run(run_demo(per_category=24, seed=0))


def mean_accuracy(report, categories, mode):
    return sum(report.cell(c, mode).accuracy for c in categories) / len(categories)


def test_the_demo_set_is_large_and_covers_every_category(report):
    assert report.cell("all", "direct").n >= 200
    assert set(report.categories) == {*SIMPLE, *MIDDLE, *COMPLEX}
    for mode in report.modes:
        assert report.cell("all", mode).failed == 0


def test_direct_is_right_on_simple_prompts_and_poor_on_complex_ones(report):
    for category in SIMPLE:
        assert report.cell(category, "direct").accuracy >= 0.9
    for category in COMPLEX:
        assert report.cell(category, "direct").accuracy <= 0.35
    assert report.cell("all", "direct").mean_images == 1.0


def test_reflect_fixes_much_of_the_middle(report):
    gain = mean_accuracy(report, MIDDLE, "reflect") - mean_accuracy(report, MIDDLE, "direct")
    assert gain >= 0.25
    for category in MIDDLE:
        assert (
            report.cell(category, "reflect").accuracy
            >= report.cell(category, "direct").accuracy + 0.1
        )
    # On simple prompts the reflector mostly stops at once: little extra cost, no harm.
    for category in SIMPLE:
        assert (
            report.cell(category, "reflect").accuracy
            >= report.cell(category, "direct").accuracy - 0.05
        )
        assert report.cell(category, "reflect").mean_images <= 1.25


def test_decompose_wins_on_the_most_complex(report):
    for category in COMPLEX:
        decompose = report.cell(category, "decompose").accuracy
        assert decompose >= report.cell(category, "reflect").accuracy + 0.25
        assert decompose >= report.cell(category, "direct").accuracy + 0.5


def test_rule_based_router_trades_accuracy_for_images(report):
    auto, reflect = report.cell("all", "auto"), report.cell("all", "reflect")
    decompose = report.cell("all", "decompose")
    assert auto.accuracy >= reflect.accuracy + 0.05
    assert auto.mean_images < decompose.mean_images
    assert set(report.mode_mix["auto"]) == {"direct", "reflect", "decompose"}
