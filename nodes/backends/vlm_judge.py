"""``VLMJudge``: a :class:`~nodes.backends.base.Judge` from any scoring chat model.

V = P("Yes") / (P("Yes") + P("No")) for the question "does this image show <text>?", from the
log-probs of the two answers (``score_text``): the VLM yes-probability judge of the design
notes, over HTTP (vLLM, ``atelier serve lm``) or in-process alike.
"""

from __future__ import annotations

import asyncio
import math

from PIL import Image

from nodes.backends.base import ChatMessage, Judgement, ScoringChatModel

JUDGE_SYSTEM = "You judge whether an image matches a description. Answer Yes or No."
JUDGE_QUESTION = 'Does this image show: "{text}"? Answer Yes or No.'


class VLMJudge:
    def __init__(
        self,
        model: ScoringChatModel,
        *,
        system: str = JUDGE_SYSTEM,
        question: str = JUDGE_QUESTION,
        yes: str = "Yes",
        no: str = "No",
        threshold: float = 0.5,
    ) -> None:
        self.model = model
        self.system = system
        self.question = question
        self.yes = yes
        self.no = no
        self.threshold = threshold

    @property
    def model_id(self) -> str:
        return f"vlm-judge:{self.model.model_id}"

    async def judge(self, image: Image.Image, text: str) -> Judgement:
        messages = [
            ChatMessage("system", self.system),
            ChatMessage("user", self.question.format(text=text), images=(image,)),
        ]
        yes, no = await asyncio.gather(
            self.model.score_text(messages, self.yes), self.model.score_text(messages, self.no)
        )
        log_yes, log_no = sum(yes.logprobs), sum(no.logprobs)
        top = max(log_yes, log_no)
        p_yes = math.exp(log_yes - top) / (math.exp(log_yes - top) + math.exp(log_no - top))
        return Judgement(
            score=p_yes,
            correct=p_yes >= self.threshold,
            detail=f"log P(yes)={log_yes:.4f}, log P(no)={log_no:.4f}",
        )
