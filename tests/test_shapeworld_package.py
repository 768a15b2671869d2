"""ShapeWorld's package surface: light imports, one backend per role, a working round trip."""

from __future__ import annotations

import subprocess
import sys

from nodes.backends.base import (
    ChatMessage,
    ChatModel,
    ChatRequest,
    EditRequest,
    ImageEditor,
    ImageGenerator,
    ImageRequest,
    Judge,
)
from nodes.backends.shapeworld import ShapeWorldConfig, make_shapeworld
from nodes.formats import parse_reflection


def test_import_does_not_pull_heavy_dependencies() -> None:
    code = (
        "import sys, nodes.backends.shapeworld\n"
        "heavy = [m for m in ('torch', 'transformers', 'scipy', 'diffusers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_role_implements_its_protocol() -> None:
    sw = make_shapeworld()
    for role in ("planner", "reflector", "decomposer"):
        assert isinstance(getattr(sw, role), ChatModel)
    assert isinstance(sw.generator, ImageGenerator)
    assert isinstance(sw.editor, ImageEditor)
    assert isinstance(sw.judge, Judge)
    ids = [getattr(sw, r).model_id for r in ("planner", "reflector", "decomposer")]
    ids += [sw.generator.model_id, sw.editor.model_id, sw.judge.model_id]
    assert len(set(ids)) == 6 and all(i.startswith("shapeworld-") for i in ids)


def test_config_documents_and_validates_its_fields() -> None:
    for name, field in ShapeWorldConfig.model_fields.items():
        assert field.description, f"{name} has no one-line doc"
    config = ShapeWorldConfig.noiseless()
    assert config.base_hazard == config.edit_failure_rate == config.reflector_miss_rate == 0
    try:
        ShapeWorldConfig(edit_failure_rate=1.5)
    except ValueError:
        pass
    else:
        raise AssertionError("a rate above 1 must be rejected")


async def test_draw_see_edit_round_trip() -> None:
    """The example from the package docstring, plus one reflect-and-edit round."""
    sw = make_shapeworld(ShapeWorldConfig.noiseless())
    prompt = "two red circles above a blue star"
    image = await sw.generator.generate(ImageRequest(prompt=prompt, seed=5))
    assert (await sw.judge.judge(image, prompt)).correct
    image = await sw.editor.edit(EditRequest(image, "Remove one red circle.", seed=5))
    verdict = await sw.judge.judge(image, prompt)
    assert verdict.score == 4 / 5 and not verdict.correct  # only the count of circles fails
    request = ChatRequest(messages=(ChatMessage("user", "", (image,)),), fields={"target": prompt})
    reflection = parse_reflection((await sw.reflector.chat(request)).text)
    image = await sw.editor.edit(EditRequest(image, reflection.instruction, seed=6))
    assert (await sw.judge.judge(image, prompt)).correct
