"""The oracle bound of the learning benchmark, against hand computations."""

from __future__ import annotations

import math

import pytest

from training.evaluate import oracle_accuracy

# Unit 1: direct (0.5 accuracy, 1 image), reflect (0.8, 2), decompose (1.0, 4).
# Unit 2: direct (1.0, 1) and decompose (1.0, 2): decompose never pays there.
UNITS = [[(0.5, 1.0), (0.8, 2.0), (1.0, 4.0)], [(1.0, 1.0), (1.0, 2.0)]]


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        (1.0, (0.5 + 1.0) / 2),  # 2 images in all: the cheapest option everywhere
        (1.5, (0.8 + 1.0) / 2),  # 3: unit 1 buys direct → reflect (+0.3 for 1 image)
        (2.0, (0.9 + 1.0) / 2),  # 4: then half of reflect → decompose (+0.2 for 2 images)
        (3.0, 1.0),  # 6: everything bought (5 images suffice)
    ],
)
def test_oracle_buys_the_best_accuracy_per_image_first(images, expected):
    assert oracle_accuracy(UNITS, images) == pytest.approx(expected, abs=1e-12)


def test_oracle_mixes_modes_past_a_dominated_one():
    # reflect (0.55, 2) lies under the chord from direct (0.5, 1) to decompose (1.0, 3):
    # with 2 images, half direct + half decompose gives 0.75, better than reflect's 0.55.
    unit = [(0.5, 1.0), (0.55, 2.0), (1.0, 3.0)]
    assert oracle_accuracy([unit], 2.0) == pytest.approx(0.75, abs=1e-12)
    assert math.isnan(oracle_accuracy([unit], 0.9))  # even the cheapest needs 1 image
