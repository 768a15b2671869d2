"""An analyzer from any scoring chat model: SAIR's judge of intermediate texts on real servers.

The score is the yes-probability of one question per kind of text, the same measure as the
image judge ``nodes.backends.vlm_judge.VLMJudge``:

    score = P("Yes") / (P("Yes") + P("No"))

from ``score_text`` log-probs of the two answers (vLLM ``prompt_logprobs``, ``atelier serve
lm``, or an in-process engine). A reflection is asked about together with the image it looked
at, so the model must be a VLM for reflections; plans and decompositions are text only. SAIR
used Qwen3-VL-235B as its analyzer; any model works here, and how well its yes-probability
tracks correctness is for the user to check (ShapeWorld's checker-based analyzer,
``nodes.backends.shapeworld.analyzer``, is exact).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from PIL import Image

from nodes.backends.base import ChatMessage, ScoringChatModel
from nodes.backends.protocols import Analysis
from training.rewards.outcome import yes_probability

ANALYZER_SYSTEM = "You check the intermediate steps of an image-generation agent. Answer Yes or No."
QUESTIONS: Mapping[str, str] = {
    "plan": (
        'The user asked for: "{prompt}".\nThe agent planned the image as:\n{text}\n\n'
        "Does this plan describe exactly what the user asked for, nothing missing and nothing "
        "added? Answer Yes or No."
    ),
    "decompose": (
        'The user asked for: "{prompt}".\nThe agent split the work into these steps (JSON):\n'
        "{text}\n\nCarried out in order, do these steps produce exactly what the user asked "
        "for, each step building on the one before? Answer Yes or No."
    ),
    "reflect": (
        'The image should show: "{target}".\nLooking at this image, the agent wrote:\n{text}\n\n'
        "Is the agent right about the image: it says no further edit is needed only if the "
        "image shows that, and otherwise asks for one edit that fixes something really wrong "
        "in it? Answer Yes or No."
    ),
}
"""One yes/no question per node; ``{prompt}``, ``{text}`` and ``{target}`` are filled in."""


class VLMAnalyzer:
    """The analyzer role over a scoring chat model (see the module doc)."""

    def __init__(
        self,
        model: ScoringChatModel,
        *,
        system: str = ANALYZER_SYSTEM,
        questions: Mapping[str, str] = QUESTIONS,
        yes: str = "Yes",
        no: str = "No",
    ) -> None:
        self.model = model
        self.system = system
        self.questions = dict(questions)
        self.yes = yes
        self.no = no

    @property
    def model_id(self) -> str:
        return f"vlm-analyzer:{self.model.model_id}"

    async def analyze(
        self,
        prompt: str,
        node: str,
        text: str,
        image: Image.Image | None = None,
        *,
        target: str | None = None,
    ) -> Analysis:
        if node not in self.questions:
            raise ValueError(f"no analyzer question for node {node!r}")
        question = self.questions[node].format(prompt=prompt, text=text, target=target or prompt)
        images = (image,) if image is not None else ()
        messages = [ChatMessage("system", self.system), ChatMessage("user", question, images)]
        yes, no = await asyncio.gather(
            self.model.score_text(messages, self.yes), self.model.score_text(messages, self.no)
        )
        log_yes, log_no = sum(yes.logprobs), sum(no.logprobs)
        score = yes_probability(log_yes, log_no)
        return Analysis(score, f"log P(yes)={log_yes:.4f}, log P(no)={log_no:.4f}")
