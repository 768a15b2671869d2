"""``VLMJudge``: a :class:`~nodes.backends.base.Judge` from any scoring chat model.

V = P("Yes") / (P("Yes") + P("No")) for the question "does this image show <text>?", from the
log-probs of the two answers: the VLM yes-probability judge of the design notes, over HTTP
(vLLM, ``atelier serve lm``) or in-process alike.

How the two log-probs are read (:class:`YesNoScorer`, shared with the step-wise analyzer of
``training.rewards.analyzer``):

- **one request** per question where possible: the model's first-token top-k log-probs
  (:class:`~nodes.backends.base.NextTokenScorer`: ``max_tokens=1``, ``logprobs``,
  ``top_logprobs=k``), reading log P(yes) and log P(no) by token id at the first generated
  position. Valid when each answer is exactly one token of the model's tokenizer right after
  the generation prompt; that is learnt once, on the first question, from the exact path's
  token ids (``score_text``: the answer's tokens, and whether they start exactly where
  generation starts), so a tokenizer that splits "Yes", or a chat template whose assistant
  header merges with it, never takes the one-request path;
- **the exact path** otherwise: ``score_text`` of each answer (two requests each on HTTP),
  the sum of each answer's token log-probs. Taken for the first question (it teaches the answer
  tokens), for every question when an answer is more than one token or the model cannot give
  top-k log-probs, and for one question whose top k lacks an answer. The judgement's
  ``detail`` says which path gave the value, and why the exact one.

Both paths read the same logits: the one-request value equals the exact one up to float
rounding (``tests/test_rewards_sources.py`` checks it on ``atelier serve lm``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from nodes.backends.base import (
    BackendRequestError,
    ChatMessage,
    Judgement,
    NextTokenScorer,
    ScoredText,
    ScoringChatModel,
)
from nodes.backends.wire import WireFormatError

log = logging.getLogger(__name__)

JUDGE_SYSTEM = "You judge whether an image matches a description. Answer Yes or No."
JUDGE_QUESTION = 'Does this image show: "{text}"? Answer Yes or No.'
TOP_LOGPROBS = 20
"""k of the one-request path: vLLM's default ``--max-logprobs`` (a larger k is a 400 there)."""


def yes_probability_of(log_yes: float, log_no: float) -> float:
    """P(yes) / (P(yes) + P(no)) from the two log-probs, stable for any gap (the formula of
    ``training.rewards.outcome.yes_probability``, which also sums several spellings)."""
    if log_yes == -math.inf and log_no == -math.inf:
        raise ValueError("both answers have probability 0")
    diff = log_no - log_yes
    if diff > 0:
        e = math.exp(-diff)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(diff))


@dataclass(frozen=True)
class YesNo:
    """The two answers' log-probs and the path that read them."""

    log_yes: float
    log_no: float
    one_request: bool
    why_exact: str = ""
    """Why the exact path was taken (empty on the one-request path)."""

    @property
    def p_yes(self) -> float:
        return yes_probability_of(self.log_yes, self.log_no)

    @property
    def detail(self) -> str:
        values = f"log P(yes)={self.log_yes:.4f}, log P(no)={self.log_no:.4f}"
        if self.one_request:
            return f"{values} (one request: first-token top log-probs)"
        return f"{values} (score_text of each answer: {self.why_exact})"


class YesNoScorer:
    """log P(yes) and log P(no) as the reply to a conversation (see the module doc).

    ``top_logprobs``: k of the one-request path (0: always the exact path)."""

    def __init__(
        self,
        model: ScoringChatModel,
        *,
        yes: str = "Yes",
        no: str = "No",
        top_logprobs: int = TOP_LOGPROBS,
    ) -> None:
        self.model = model
        self.yes = yes
        self.no = no
        self.top_logprobs = top_logprobs
        self.answer_ids: tuple[int, int] | None = None
        """The (yes, no) token ids once learnt; None before, or when the answers do not
        qualify (then :attr:`why_exact` says why)."""
        self.why_exact: str | None = None
        if top_logprobs <= 0:
            self.why_exact = "top_logprobs = 0"
        elif not isinstance(model, NextTokenScorer):
            self.why_exact = f"{type(model).__name__} gives no top-k log-probs"
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )  # one per event loop: a judge may serve several asyncio.run calls

    async def score(self, messages: Sequence[ChatMessage]) -> YesNo:
        if self.why_exact is None and self.answer_ids is None:
            # The first question teaches the answer tokens; concurrent ones wait for it.
            loop = asyncio.get_running_loop()
            async with self._locks.setdefault(loop, asyncio.Lock()):
                if self.why_exact is None and self.answer_ids is None:
                    return await self._learn(messages)
        if self.answer_ids is None:
            return await self._exact(messages, self.why_exact or "")
        return await self._one_request(messages, self.answer_ids)

    async def _learn(self, messages: Sequence[ChatMessage]) -> YesNo:
        yes, no = await asyncio.gather(
            self.model.score_text(messages, self.yes), self.model.score_text(messages, self.no)
        )
        problems = [
            problem
            for answer, scored in ((self.yes, yes), (self.no, no))
            if (problem := _single_token_problem(answer, scored))
        ]
        if problems:
            self.why_exact = "; ".join(problems)
            log.info("yes/no scoring of %s: exact path (%s)", self.model.model_id, self.why_exact)
            why = self.why_exact
        else:
            self.answer_ids = (yes.token_ids[0], no.token_ids[0])
            why = "the first question, which shows both answers are one token"
        return YesNo(sum(yes.logprobs), sum(no.logprobs), one_request=False, why_exact=why)

    async def _one_request(self, messages: Sequence[ChatMessage], ids: tuple[int, int]) -> YesNo:
        assert isinstance(self.model, NextTokenScorer)
        try:
            top = await self.model.next_token_logprobs(messages, self.top_logprobs)
        except (WireFormatError, BackendRequestError) as error:
            if getattr(error, "status", None) not in (None, 400, 422):
                raise  # e.g. a 404 for an adapter not loaded: not about top-k log-probs
            # The server refuses or garbles top-k log-probs (k above its --max-logprobs, no
            # return_tokens_as_token_ids): it will for every question; use the exact path.
            self.answer_ids = None
            self.why_exact = f"top-k log-probs failed: {error}"
            log.warning("yes/no scoring of %s: exact path (%s)", self.model.model_id, error)
            return await self._exact(messages, self.why_exact)
        missing = [
            answer
            for answer, token in ((self.yes, ids[0]), (self.no, ids[1]))
            if token not in top.logprobs
        ]
        if missing:
            names = " and ".join(repr(a) for a in missing)
            return await self._exact(
                messages, f"{names} not in the first token's top {self.top_logprobs}"
            )
        return YesNo(top.logprobs[ids[0]], top.logprobs[ids[1]], one_request=True)

    async def _exact(self, messages: Sequence[ChatMessage], why: str) -> YesNo:
        yes, no = await asyncio.gather(
            self.model.score_text(messages, self.yes), self.model.score_text(messages, self.no)
        )
        return YesNo(sum(yes.logprobs), sum(no.logprobs), one_request=False, why_exact=why)


def _single_token_problem(answer: str, scored: ScoredText) -> str:
    """Why ``answer``'s scored tokens cannot be read at the first generated position ("" when
    they can: one token, starting exactly where generation starts)."""
    if len(scored.token_ids) != 1:
        return f"{answer!r} is {len(scored.token_ids)} tokens"
    aligned = getattr(scored, "at_generation_start", None)  # a scorer's own ScoredText-alike
    if aligned is None:
        return "the model does not say where the answer's token starts"
    if not aligned:
        return f"{answer!r} merges with the chat template's assistant header"
    return ""


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
        top_logprobs: int = TOP_LOGPROBS,
    ) -> None:
        self.model = model
        self.system = system
        self.question = question
        self.yes = yes
        self.no = no
        self.threshold = threshold
        self.scorer = YesNoScorer(model, yes=yes, no=no, top_logprobs=top_logprobs)

    @property
    def model_id(self) -> str:
        return f"vlm-judge:{self.model.model_id}"

    def messages(self, image: Image.Image, text: str) -> list[ChatMessage]:
        """The conversation the judge asks about (its reply is the answer)."""
        return [
            ChatMessage("system", self.system),
            ChatMessage("user", self.question.format(text=text), images=(image,)),
        ]

    async def judge(self, image: Image.Image, text: str) -> Judgement:
        answer = await self.scorer.score(self.messages(image, text))
        p_yes = answer.p_yes
        return Judgement(score=p_yes, correct=p_yes >= self.threshold, detail=answer.detail)
