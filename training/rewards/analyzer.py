"""An analyzer from any scoring chat model: SAIR's judge of intermediate texts on real servers.

The score is the yes-probability of one question per kind of text, the same measure as the
image judge ``nodes.backends.vlm_judge.VLMJudge``:

    score = P("Yes") / (P("Yes") + P("No"))

read as the judge reads it (``nodes.backends.vlm_judge.YesNoScorer``): from one request's
first-token top log-probs when each answer is one token, else from ``score_text`` of each
answer (vLLM ``prompt_logprobs``, ``atelier serve lm``, or an in-process engine). A reflection
is asked about together with the image it looked at, so the model must be a VLM for
reflections; plans and decompositions are text only. SAIR
used Qwen3-VL-235B as its analyzer; any model works here, and how well its yes-probability
tracks correctness is for the user to check (ShapeWorld's checker-based analyzer,
``nodes.backends.shapeworld.analyzer``, is exact).
"""

from __future__ import annotations

from collections.abc import Mapping

from PIL import Image

from nodes.backends.base import ChatMessage, ScoringChatModel
from nodes.backends.protocols import Analysis
from nodes.backends.vlm_judge import TOP_LOGPROBS, YesNoScorer

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
        top_logprobs: int = TOP_LOGPROBS,
    ) -> None:
        self.model = model
        self.system = system
        self.questions = dict(questions)
        self.yes = yes
        self.no = no
        self.scorer = YesNoScorer(model, yes=yes, no=no, top_logprobs=top_logprobs)

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
        answer = await self.scorer.score(messages)
        return Analysis(answer.p_yes, answer.detail)
