"""The generator's mistakes: what it draws instead of what was asked.

The number of mistakes per image is Poisson with a hazard that grows with the prompt's
:func:`complexity` (linearly, plus a small quadratic term: many entities at once collapse faster
than a few), so "a red circle" is almost always right and four groups with counts are mostly
wrong. Each mistake is one of the kinds real text-to-image models make, picked among
those that apply to the prompt in proportion to the configured weights:

- miscount: a group gets one more or one fewer (two, sometimes, for groups of four or more)
- binding: two coloured groups swap colours
- position: a relation is drawn the wrong way round ("next to": one group above the other)
- missing: a whole group is left out
- wrong colour: a coloured group is drawn in an unrequested colour
- size: a sized group is drawn at the ordinary size, its size word ignored
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from nodes.backends.shapeworld.config import ShapeWorldConfig
from nodes.backends.shapeworld.spec import Group, Relation, SceneSpec, complexity
from nodes.backends.shapeworld.vocab import COLOURS, INVERSE_RELATION, NEXT_TO


@dataclass
class DrawPlan:
    """What will actually be drawn: the groups (count 0 = left out), colours all chosen."""

    groups: list[Group]
    relations: list[Relation]
    mistakes: list[str] = field(default_factory=list)


def hazard(spec: SceneSpec, config: ShapeWorldConfig, blueprint: bool = False) -> float:
    """Expected number of mistakes when drawing ``spec``."""
    excess = complexity(spec) - 1
    rate = config.base_hazard + config.hazard_per_complexity * excess
    rate += config.hazard_curvature * excess**2
    return rate * (config.blueprint_hazard_scale if blueprint else 1.0)


def _poisson(rate: float, rng: random.Random) -> int:
    # Knuth's method: fine for the small rates used here.
    limit, k, product = math.exp(-rate), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


def plan_drawing(
    spec: SceneSpec, rng: random.Random, config: ShapeWorldConfig, blueprint: bool = False
) -> DrawPlan:
    colours = [g.colour or rng.choice(COLOURS) for g in spec.groups]
    plan = DrawPlan(
        groups=[replace(g, colour=c) for g, c in zip(spec.groups, colours, strict=True)],
        relations=list(spec.relations),
    )
    for _ in range(_poisson(hazard(spec, config, blueprint), rng)):
        _make_mistake(spec, plan, rng, config)
    return plan


def _make_mistake(
    spec: SceneSpec, plan: DrawPlan, rng: random.Random, config: ShapeWorldConfig
) -> None:
    coloured = [i for i, g in enumerate(spec.groups) if g.colour is not None]
    present = [i for i, g in enumerate(plan.groups) if g.count > 0]
    options = [("miscount", config.miscount_weight, present)]
    if len(coloured) >= 2:
        options.append(("binding", config.binding_weight, coloured))
    if plan.relations:
        options.append(("position", config.position_weight, present))
    if len(present) >= 2:
        options.append(("missing", config.missing_weight, present))
    if coloured:
        options.append(("wrong colour", config.wrong_colour_weight, coloured))
    sized = [i for i in present if plan.groups[i].size is not None]
    if sized:
        options.append(("size", config.size_weight, sized))
    options = [o for o in options if o[1] > 0 and o[2]]
    if not options:
        return
    kind, _, candidates = rng.choices(options, weights=[o[1] for o in options])[0]
    groups = plan.groups
    if kind == "miscount":
        # Big groups are miscounted more often.
        i = rng.choices(candidates, weights=[groups[j].count for j in candidates])[0]
        n = groups[i].count
        step = 2 if n >= 4 and rng.random() < config.big_miscount_rate else 1
        new = n + step * rng.choice((-1, 1))
        if new < 1:  # leaving a group out is the 'missing' mistake, not a miscount
            new = n + step
        groups[i] = replace(groups[i], count=new)
    elif kind == "binding":
        i, j = rng.sample(candidates, 2)
        groups[i], groups[j] = (
            replace(groups[i], colour=groups[j].colour),
            replace(groups[j], colour=groups[i].colour),
        )
    elif kind == "position":
        k = rng.randrange(len(plan.relations))
        rel = plan.relations[k]
        plan.relations[k] = replace(rel, relation=_misplaced(rel.relation, rng))
    elif kind == "missing":
        i = rng.choice(candidates)
        groups[i] = replace(groups[i], count=0)
    elif kind == "size":
        i = rng.choice(candidates)
        groups[i] = replace(groups[i], size=None)
    else:
        i = rng.choice(candidates)
        used = {g.colour for g in groups}
        groups[i] = replace(groups[i], colour=rng.choice([c for c in COLOURS if c not in used]))
    plan.mistakes.append(kind)


def _misplaced(relation: str, rng: random.Random) -> str:
    """The relation actually drawn for a mistaken ``relation``: the opposite direction, or for
    "next to" (which has no opposite) one group above the other. Stacked in the top and bottom
    halves, the two share no row, so the mistake is never adjacent by accident (side by side in
    the left and right halves, the inner cells can come close enough)."""
    if relation == NEXT_TO:
        return rng.choice(("above", "below"))
    return INVERSE_RELATION[relation]
