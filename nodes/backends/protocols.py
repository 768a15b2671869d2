"""The analyzer role: a judge of the graph's intermediate texts, used by training, not by nodes.

The Self-Adaptive Interleaved Reasoner (SAIR) rewards reasoning step by step:
R_s = (1/T) Σ_t Analyzer(text_t), one analyzer score per intermediate text (a plan, a
reflection, a decomposition). :class:`Analyzer` is that role's protocol. It sits beside the
node-facing protocols of ``nodes.backends.base`` (in the same import layer) so that every
backend part can implement it: ShapeWorld's checker-based analyzer
(``nodes.backends.shapeworld.analyzer``) and, over any scoring chat model, the VLM analyzer of
``training.rewards.analyzer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

ANALYZED_NODES = ("plan", "decompose", "reflect")
"""The nodes whose text output is an intermediate text (the final image is the outcome)."""


@dataclass(frozen=True)
class Analysis:
    """An analyzer's verdict on one intermediate text."""

    score: float
    """In [0, 1]: how right the text is (1 = entirely)."""
    reason: str = ""
    """One short sentence saying why (stored with the score, for whoever inspects it)."""
    parts: tuple[float, ...] = ()
    """Scores of the text's parts where it has several (a decomposition's sub-tasks)."""


@runtime_checkable
class Analyzer(Protocol):
    """Scores one intermediate text of a trajectory in [0, 1].

    ``node`` is the node that wrote ``text`` (``plan``: a blueprint of ``prompt``;
    ``decompose``: its sub-tasks; ``reflect``: a reflection on ``image`` checked against
    ``target``, the prompt or a sub-task's expectation, default ``prompt``).
    """

    model_id: str

    async def analyze(
        self,
        prompt: str,
        node: str,
        text: str,
        image: Image.Image | None = None,
        *,
        target: str | None = None,
    ) -> Analysis: ...
