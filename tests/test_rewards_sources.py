"""Reward sources: the VLM judge's one-request path, GvU through a server, and the glue.

- The judge's one scored request per image gives the two-request ``score_text`` value on
  ``atelier serve lm`` (tiny VLM), counted at the server: 4 requests for the first image (it
  teaches the answer tokens), then 1 per image; a multi-token answer or one outside the top k
  takes the exact path and says so.
- Against a vLLM-shaped fake: the one request pins every sampling field vLLM would take from
  ``generation_config.json``, and a server that ignores ``return_tokens_as_token_ids`` or
  refuses ``top_logprobs`` sends the judge to the exact path for good.
- GvU through the server equals a transformers forward pass computed here: the log-softmax of
  the logits at the prompt tokens' positions given the image, geometric mean.
- ``score_final_images`` stores a source's values by name once; the decision trainer's
  composite and complexity penalty use them as R_o.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from typing import Any

import pytest
from PIL import Image

from nodes.backends.base import ChatMessage, NextTokenScorer, ScoredText
from nodes.backends.vlm_judge import VLMJudge, YesNoScorer
from training.rewards.sources import (
    CheckerReward,
    FunctionReward,
    GvUReward,
    ImageReward,
    JudgeReward,
    RewardValue,
    WeightedReward,
    build_reward_source,
    score_final_images,
)

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models and servers

COLOURS = [(220, 20, 20), (20, 200, 40), (30, 40, 210), (240, 220, 30), (120, 30, 160)]
TEXTS = ["two red circles", "a green square", "three blue stars", "a yellow star", "a circle"]


def images() -> list[Image.Image]:
    out = []
    for index, colour in enumerate(COLOURS):
        image = Image.new("RGB", (32, 32), (250, 250, 250))
        image.paste(colour, (4 + index, 4, 20 + 2 * index, 24))
        out.append(image)
    return out


class Counting:
    """An ASGI wrapper counting the requests per path that reach the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.paths: Counter[str] = Counter()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.paths[scope["path"]] += 1
        await self.app(scope, receive, send)

    def chats(self) -> int:
        return self.paths["/v1/chat/completions"]


@pytest.fixture(scope="module")
def counted_vlm(vlm_service):
    """``atelier serve lm`` for the tiny VLM behind a request counter."""
    from nodes.backends.servers.http_common import BackgroundServer
    from nodes.backends.servers.lm_server import create_lm_app

    counter = Counting(create_lm_app(vlm_service))
    server = BackgroundServer(counter).start()
    yield server, counter
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models.vlm)


def single_token_answers(server_url: str, tokenizer: Any, conversations: list) -> list[str]:
    """Words that are one token of the tiny VLM's tokenizer and among the 20 most likely first
    tokens for every conversation (asked of the server directly, most likely first)."""
    import httpx

    from nodes.backends.wire import messages_payload

    common: list[int] | None = None
    for messages in conversations:
        body = httpx.post(
            f"{server_url}/v1/chat/completions",
            json={
                "messages": messages_payload(messages),
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 20,
                "return_tokens_as_token_ids": True,
            },
            timeout=60,
        ).json()
        first = body["choices"][0]["logprobs"]["content"][0]
        ids = [int(e["token"].removeprefix("token_id:")) for e in first["top_logprobs"]]
        common = ids if common is None else [i for i in common if i in ids]
    words = []
    for token in common or []:
        text = tokenizer.decode([token])
        if (
            text.isalpha()
            and token not in tokenizer.all_special_ids
            and tokenizer(text, add_special_tokens=False).input_ids == [token]
        ):
            words.append(text)
    return words


async def judge_all(judge: VLMJudge, pairs: list) -> list[Any]:
    return [await judge.judge(image, text) for image, text in pairs]


async def test_the_judge_makes_one_request_per_image_with_the_two_request_value(
    counted_vlm, tokenizer
):
    from nodes.backends.clients.openai_client import OpenAIChatClient

    server, counter = counted_vlm
    pairs = list(zip(images(), TEXTS, strict=True))
    probe = VLMJudge(OpenAIChatClient(server.url))
    words = single_token_answers(
        server.url, tokenizer, [probe.messages(image, text) for image, text in pairs]
    )
    assert len(words) >= 2, "the tiny VLM's top 20 share fewer than two one-token words"
    yes, no = words[0], words[-1]

    client = OpenAIChatClient(server.url, model="tiny-vlm")
    fast = VLMJudge(client, yes=yes, no=no)
    exact = VLMJudge(client, yes=yes, no=no, top_logprobs=0)  # always score_text: the old path
    assert isinstance(client, NextTokenScorer)

    before = counter.chats()
    verdicts = await judge_all(fast, pairs)
    sent = counter.chats() - before
    assert sent == 4 + (len(pairs) - 1)  # 2 score_text (2 requests each), then 1 per image
    assert fast.scorer.answer_ids == (
        tokenizer(yes, add_special_tokens=False).input_ids[0],
        tokenizer(no, add_special_tokens=False).input_ids[0],
    )
    assert "score_text of each answer: the first question" in verdicts[0].detail
    assert all("one request" in v.detail for v in verdicts[1:])

    before = counter.chats()
    references = await judge_all(exact, pairs)
    assert counter.chats() - before == 4 * len(pairs)
    for verdict, reference in zip(verdicts, references, strict=True):
        assert verdict.score == pytest.approx(reference.score, abs=1e-6)
        assert verdict.correct == reference.correct
    # The log-probs themselves, not only their ratio.
    for image, text in pairs[1:]:
        one = await fast.scorer.score(fast.messages(image, text))
        two = await exact.scorer.score(exact.messages(image, text))
        assert one.one_request and not two.one_request
        assert one.log_yes == pytest.approx(two.log_yes, abs=1e-5)
        assert one.log_no == pytest.approx(two.log_no, abs=1e-5)
    await client.aclose()
    await probe.model.aclose()


async def test_answers_outside_the_top_k_or_of_several_tokens_take_the_exact_path(
    counted_vlm, tokenizer
):
    from nodes.backends.clients.openai_client import OpenAIChatClient

    server, counter = counted_vlm
    pairs = list(zip(images(), TEXTS, strict=True))[:3]
    client = OpenAIChatClient(server.url, model="tiny-vlm")
    words = single_token_answers(
        server.url, tokenizer, [VLMJudge(client).messages(image, t) for image, t in pairs]
    )
    yes, no = words[0], words[1]
    exact = await judge_all(VLMJudge(client, yes=yes, no=no, top_logprobs=0), pairs)

    # k = 1: at most one answer is the most likely token, so no image has both in its top k.
    narrow = VLMJudge(client, yes=yes, no=no, top_logprobs=1)
    before = counter.chats()
    verdicts = await judge_all(narrow, pairs)
    assert counter.chats() - before == 4 + (len(pairs) - 1) * (1 + 4)
    assert all("not in the first token's top 1" in v.detail for v in verdicts[1:])
    assert [v.score for v in verdicts] == pytest.approx([v.score for v in exact], abs=1e-12)

    # The tiny tokenizer has no "Yes": two tokens, so every image takes the exact path.
    assert len(tokenizer("Yes", add_special_tokens=False).input_ids) > 1
    default = VLMJudge(client)
    before = counter.chats()
    verdicts = await judge_all(default, pairs)
    assert counter.chats() - before == 4 * len(pairs)
    assert default.scorer.answer_ids is None
    assert all("'Yes' is " in v.detail and " tokens" in v.detail for v in verdicts)
    await client.aclose()


async def test_the_in_process_model_reads_the_same_first_token_log_probs(vlm_service, tokenizer):
    from nodes.backends.engines.lm_inprocess import InProcessChatModel

    model = InProcessChatModel(vlm_service)
    assert isinstance(model, NextTokenScorer)
    image, text = images()[0], TEXTS[0]
    messages = VLMJudge(model).messages(image, text)
    top = await model.next_token_logprobs(messages, 20)
    assert len(top.logprobs) == 20
    words = [
        (token, word)
        for token in sorted(top.logprobs, key=top.logprobs.__getitem__, reverse=True)
        if (word := tokenizer.decode([token])).isalpha()
        and tokenizer(word, add_special_tokens=False).input_ids == [token]
    ]
    assert len(words) >= 2
    for token, word in words[:2]:
        scored = await model.score_text(messages, word)
        assert scored.token_ids == (token,) and scored.at_generation_start is True
        assert scored.logprobs[0] == pytest.approx(top.logprobs[token], abs=1e-5)
    judged = await VLMJudge(model, yes=words[0][1], no=words[1][1]).judge(image, text)
    assert "score_text of each answer: the first question" in judged.detail


# --- a vLLM-shaped fake ---------------------------------------------------------------------

VOCAB = {"Yes": 7, "No": 8, "Maybe": 9}
FIRST_TOKEN = {7: -0.4, 8: -1.3, 9: -2.5, 3: -3.0}
"""log p of the first reply token (what both the top-k and the prompt log-probs report)."""
GENERATION_CONFIG = {"repetition_penalty": 1.05, "temperature": 1e-06, "top_k": 1, "top_p": 0.001}
"""Qwen2.5-VL-7B-Instruct's generation_config.json: vLLM applies it to omitted fields."""


def fake_vllm(log: list[dict], *, token_ids: bool = True, max_logprobs: int = 20) -> Any:
    """vLLM's chat shapes over a toy template ([1] + 5 per message + [11] for the generation
    prompt; a final assistant text's words by ``VOCAB``): ``prompt_logprobs`` keyed by id
    strings with null first, ``top_logprobs`` spelled ``token_id:<id>`` when asked (unless
    ``token_ids`` is False: an older server), and a 400 past ``--max-logprobs``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        log.append(body)
        if (body.get("top_logprobs") or 0) > max_logprobs:
            message = f"Requested top logprobs of {body['top_logprobs']} > {max_logprobs}"
            return JSONResponse({"error": {"message": message}}, status_code=400)
        messages = body["messages"]
        ids = [1]
        continued = body.get("continue_final_message") and messages[-1]["role"] == "assistant"
        context = messages[:-1] if continued else messages
        ids += [5] * 5 * len(context)
        ids.append(11)  # the assistant header
        if continued:
            ids += [VOCAB[w] for w in messages[-1]["content"].split()]
        as_ids = body.get("return_tokens_as_token_ids") and token_ids

        def entry(token: int, value: float) -> dict:
            name = (
                f"token_id:{token}"
                if as_ids
                else next((w for w, i in VOCAB.items() if i == token), "x")
            )
            return {"token": name, "logprob": value, "bytes": list(name.encode())}

        ranked = sorted(FIRST_TOKEN.items(), key=lambda kv: -kv[1])
        content = [entry(*ranked[0])]
        content[0]["top_logprobs"] = [entry(t, v) for t, v in ranked[: body.get("top_logprobs")]]
        response = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Yes"},
                    "logprobs": {"content": content} if body.get("logprobs") else None,
                    "finish_reason": "length",
                    "token_ids": [ranked[0][0]],
                }
            ],
            "prompt_token_ids": ids,
            "prompt_logprobs": None,
        }
        if body.get("prompt_logprobs") is not None:
            header = ids.index(11)
            response["prompt_logprobs"] = [None] + [
                {str(t): {"logprob": FIRST_TOKEN.get(t, -0.7) if p == header + 1 else -0.7}}
                for p, t in enumerate(ids[1:], 1)
            ]
        return JSONResponse(response)

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def vllm_effective(body: dict) -> dict:
    """What vLLM samples with: an omitted (or null) field from the generation config."""
    neutral = {"repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0}
    out = {
        key: GENERATION_CONFIG.get(key, default) if body.get(key) is None else body[key]
        for key, default in neutral.items()
    }
    out["top_k"] = 0 if out["top_k"] == -1 else out["top_k"]
    return out


async def test_the_one_request_pins_vllm_sampling_and_reads_tokens_by_id():
    from nodes.backends.clients.openai_client import OpenAIChatClient
    from nodes.backends.servers.http_common import BackgroundServer

    log: list[dict] = []
    red = images()[0]
    with BackgroundServer(fake_vllm(log)) as server:
        client = OpenAIChatClient(server.url, model="m", extra_body={"top_k": 5})
        judge = VLMJudge(client)
        first = await judge.judge(red, "a red square")
        assert len(log) == 4 and judge.scorer.answer_ids == (7, 8)
        second = await judge.judge(red, "a blue square")
        await client.aclose()
    expected = 1 / (1 + math.exp(-1.3 + 0.4))
    assert first.score == pytest.approx(expected, abs=1e-12)
    assert second.score == pytest.approx(expected, abs=1e-12) and "one request" in second.detail
    [one] = log[4:]
    assert one["max_tokens"] == 1 and one["logprobs"] is True and one["top_logprobs"] == 20
    assert one["return_tokens_as_token_ids"] is True
    # Greedy with every other field neutral, whatever the model's generation config says
    # (extra_body's top_k does not leak in): the log-probs are the raw ones.
    assert vllm_effective(one) == {
        "repetition_penalty": 1.0,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
    }


@pytest.mark.parametrize("server", ["no token ids", "max-logprobs 5"])
async def test_a_server_without_top_k_by_id_sends_the_judge_to_the_exact_path(server):
    from nodes.backends.clients.openai_client import OpenAIChatClient
    from nodes.backends.servers.http_common import BackgroundServer

    log: list[dict] = []
    options = {"token_ids": False} if server == "no token ids" else {"max_logprobs": 5}
    red = images()[0]
    with BackgroundServer(fake_vllm(log, **options)) as app:
        client = OpenAIChatClient(app.url, model="m")
        judge = VLMJudge(client)
        verdicts = [await judge.judge(red, f"shape {i}") for i in range(3)]
        await client.aclose()
    # Learn (4), the failed one request then the exact path (1 + 4), then the exact path only.
    assert len(log) == 4 + 5 + 4
    assert judge.scorer.answer_ids is None and "top-k log-probs failed" in verdicts[2].detail
    expected = 1 / (1 + math.exp(-1.3 + 0.4))
    assert [v.score for v in verdicts] == pytest.approx([expected] * 3, abs=1e-12)


# --- GvU through the server equals a forward pass -------------------------------------------


def gvu_by_hand(model: Any, processor: Any, image: Image.Image, prompt: str, instruction: str):
    """exp(mean log p(prompt token | image, instruction, earlier prompt tokens)) from one
    transformers forward pass over the tiny VLM's ChatML rendering, written out here."""
    import torch

    prefix = f"<|im_start|>user\n<image>{instruction}<|im_end|>\n<|im_start|>assistant\n"
    encode = {"images": [image], "return_tensors": "pt", "add_special_tokens": False}
    full = processor(text=[prefix + prompt], **encode)
    head = processor(text=[prefix], **encode)["input_ids"][0]
    ids = full["input_ids"][0]
    start = len(head)
    assert ids[:start].tolist() == head.tolist() and len(ids) > start
    with torch.no_grad():
        logits = model(**full).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)  # row j predicts token j + 1
    prompt_logprobs = logprobs[start - 1 : len(ids) - 1].gather(1, ids[start:, None])[:, 0]
    return math.exp(prompt_logprobs.double().mean().item()), len(ids) - start


async def test_gvu_through_atelier_serve_lm_equals_the_forward_pass(lm_server, tiny_models):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from nodes.backends.clients.openai_client import OpenAIChatClient

    torch.set_num_threads(1)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_models.vlm, dtype=torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(tiny_models.vlm)
    client = OpenAIChatClient(lm_server.url)
    reward = GvUReward(client)
    assert isinstance(reward, ImageReward) and reward.name == "gvu"
    values = await asyncio.gather(
        *(reward.score(image, text) for image, text in zip(images(), TEXTS, strict=True))
    )
    await client.aclose()
    for (image, text), got in zip(zip(images(), TEXTS, strict=True), values, strict=True):
        expected, tokens = gvu_by_hand(model, processor, image, text, reward.instruction)
        assert got.details["tokens"] == tokens
        assert got.value == pytest.approx(expected, rel=1e-5)
        assert 0 < got.value < 1
    assert len({round(v.value, 9) for v in values}) == len(values)  # the image and text matter


# --- the glue: stored by name, used by the trainers -----------------------------------------


class FixedScorer:
    """score_text answers given log-probs per text (no model)."""

    model_id = "fixed"

    def __init__(self, logprobs: dict[str, tuple[float, ...]]) -> None:
        self.logprobs = logprobs

    async def chat(self, request: Any) -> Any:  # pragma: no cover - never called
        raise NotImplementedError

    async def score_text(self, messages: Any, text: str, image: Any = None) -> ScoredText:
        values = self.logprobs[text]
        return ScoredText(tuple(range(len(values))), values, self.model_id)


async def test_sources_compose_and_functions_are_sources():
    image = images()[0]
    gvu = GvUReward(FixedScorer({"a red square": (math.log(0.5), math.log(0.125))}))
    assert (await gvu.score(image, "a red square")).value == pytest.approx(0.25, abs=1e-15)

    async def redness(img: Image.Image, prompt: str) -> float:
        return img.getpixel((10, 10))[0] / 255

    judge = JudgeReward.vlm(FixedScorer({"Yes": (-0.2,), "No": (-1.2, -0.3)}))
    mixed = WeightedReward([(gvu, 2.0), (FunctionReward(redness, "redness"), 0.5), (judge, 1.0)])
    value, details = await mixed.score(image, "a red square")
    p_yes = 1 / (1 + math.exp(-1.5 + 0.2))
    assert value == pytest.approx(2 * 0.25 + 0.5 * 220 / 255 + p_yes, abs=1e-12)
    assert details["vlm_yes"]["value"] == pytest.approx(p_yes, abs=1e-12)
    assert details["redness"]["weight"] == 0.5
    assert "FixedScorer gives no top-k log-probs" in details["vlm_yes"]["detail"]
    assert FunctionReward(lambda i, p: (1.0, {"why": "x"}), "f").name == "f"
    assert await FunctionReward(lambda i, p: (1.0, {"why": "x"}), "f").score(
        image, ""
    ) == RewardValue(1.0, {"why": "x"})
    with pytest.raises(ValueError, match="one of checker, judge, gvu"):
        build_reward_source("clip")
    assert isinstance(build_reward_source("checker"), CheckerReward)
    assert build_reward_source("gvu", judge=judge.judge).model is judge.judge.model
    assert isinstance(build_reward_source("judge", model=FixedScorer({})).judge, VLMJudge)


@pytest.fixture(scope="module")
def shapeworld_run(tmp_path_factory):
    from agent_graph.presets import shapeworld_tasks
    from nodes.state import Budget
    from policies.mode import LearnedModePolicy
    from storage.store import TrajectoryStore
    from training.decisions.sampling import collect

    store = TrajectoryStore(f"sqlite:///{tmp_path_factory.mktemp('sources') / 's.db'}")
    router = LearnedModePolicy(seed=3)
    run_id, _ = asyncio.run(
        collect(
            store, shapeworld_tasks(1, 4, seed=7), mode_policy=router, budget=Budget(max_rounds=2)
        )
    )
    yield store, run_id, router
    store.close()


def test_final_images_are_scored_once_and_drive_the_decision_reward(shapeworld_run):
    from nodes.backends.shapeworld.checker import ShapeWorldChecker
    from training.decisions.groups import read_groups
    from training.decisions.trainer import GRPOConfig, shaped_rewards
    from training.images.rewards import score_run
    from training.rewards.composite import apply_complexity_penalty

    store, run_id, router = shapeworld_run
    finals = [s for s in store.trajectories(run=run_id, status="succeeded") if s.final_image]
    assert len(finals) >= 4
    checker = asyncio.run(score_final_images(store, run_id, CheckerReward(), concurrency=3))
    for summary in finals:  # the checker now equals the graph's judgement then
        assert checker[summary.id] == summary.score
    # A "gvu" from a scripted scorer: per prompt, a known geometric mean.
    means = {s.prompt: 0.1 + 0.8 * (i % 3) / 2 for i, s in enumerate(finals)}
    scorer = FixedScorer({p: (math.log(m),) * 3 for p, m in means.items()})
    gvu = asyncio.run(score_final_images(store, run_id, GvUReward(scorer)))
    assert gvu == {s.id: pytest.approx(means[s.prompt], abs=1e-12) for s in finals}
    rows = len(store.rewards())
    assert score_run(store, run_id, GvUReward(FixedScorer({}))) == gvu  # kept, not recomputed
    assert len(store.rewards()) == rows
    # Another instruction is another reward: scored again, stored as the latest value (the
    # trajectories' summaries, which training reads, follow it), and then kept in its turn.
    other = FixedScorer({p: (math.log(m / 2),) * 3 for p, m in means.items()})
    rescored = score_run(store, run_id, GvUReward(other, instruction="Describe the picture."))
    assert rescored == {s.id: pytest.approx(means[s.prompt] / 2, abs=1e-12) for s in finals}
    assert len(store.rewards()) == rows + len(finals)
    for summary in finals:
        assert store.trajectory(summary.id).rewards["gvu"] == pytest.approx(rescored[summary.id])
    again = GvUReward(FixedScorer({}), instruction="Describe the picture.")
    assert score_run(store, run_id, again) == rescored
    assert len(store.rewards()) == rows + len(finals)
    gvu = asyncio.run(score_final_images(store, run_id, GvUReward(scorer)))  # back, rescored
    rows = len(store.rewards())
    red = score_run(store, run_id, lambda image, prompt: image.getpixel((0, 0))[0], "corner")
    assert red == {s.id: store.get(s.final_image).getpixel((0, 0))[0] for s in finals}
    one = store.rewards(name="gvu", trajectory_ids=[finals[0].id])  # what scoring reads back
    assert one == [r for r in store.rewards(name="gvu") if r.trajectory_id == finals[0].id]
    assert len(one) == 3 and store.rewards(name="gvu", trajectory_ids=[]) == []
    stored = {r.trajectory_id: r for r in store.rewards(name="gvu")}
    assert stored[finals[0].id].details["tokens"] == 3
    assert ShapeWorldChecker().model_id in store.rewards(name="checker")[0].source

    groups = read_groups(store, run_id, "mode", policy=router.name, version=router.version)
    config = GRPOConfig(outcome_reward="gvu", complexity_eps=0.05)
    for group in groups:
        members = group.members
        expected = apply_complexity_penalty(
            [gvu[m.trajectory_id] for m in members],
            [store.trajectory(m.trajectory_id).image_count for m in members],
            0.05,
        )
        assert shaped_rewards(group, config) == pytest.approx(expected, abs=1e-12)


def test_score_run_inside_an_event_loop_points_to_the_async_form(shapeworld_run):
    from training.images.rewards import score_run

    store, run_id, _ = shapeworld_run

    async def inside() -> None:
        score_run(store, run_id, lambda image, prompt: 1.0, "one")

    with pytest.raises(RuntimeError, match="await score_final_images"):
        asyncio.run(inside())


def test_the_scorer_learns_once_even_when_asked_concurrently():
    class Both(FixedScorer):
        model_id = "both"
        asked = 0

        async def score_text(self, messages: Any, text: str, image: Any = None) -> ScoredText:
            self.asked += 1
            await asyncio.sleep(0.01)
            token = {"Yes": 7, "No": 8}[text]
            return ScoredText((token,), (-0.5 if text == "Yes" else -1.0,), "both", True)

        async def next_token_logprobs(self, messages: Any, k: int) -> Any:
            from nodes.backends.base import NextTokenLogprobs

            return NextTokenLogprobs({7: -0.5, 8: -1.0})

    model = Both({})
    scorer = YesNoScorer(model)
    answers = asyncio.run(_gather(scorer, [[ChatMessage("user", f"q{i}")] for i in range(6)]))
    assert model.asked == 2  # one question learnt the tokens; the others waited, then 1 each
    assert sum(a.one_request for a in answers) == 5
    assert {round(a.p_yes, 12) for a in answers} == {round(1 / (1 + math.exp(-0.5)), 12)}


async def _gather(scorer: YesNoScorer, conversations: list) -> list:
    return await asyncio.gather(*(scorer.score(m) for m in conversations))
