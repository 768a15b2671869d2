"""Sampling settings from a config reach the model, and requests that do not fit the model's
context are clamped or refused clearly (issue 12), with the tiny VLM (a 512-token context)
in-process and behind ``atelier serve lm`` on loopback."""

from __future__ import annotations

import logging

import httpx
import pytest

from nodes.backends.base import ChatMessage, ChatRequest, SamplingParams
from nodes.backends.config import ConfigError, build_backends, parse_config
from nodes.backends.lm_types import InvalidRequest, LMRequest, PromptMessage

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models and servers

CONTEXT = 512  # the tiny models' max_position_embeddings
PROMPT = "plan a red circle"
ROLES = {"planner": "a", "reflector": "a", "decomposer": "a", "generator": "w", "editor": "w"}


def lm_request(text: str = PROMPT, **fields) -> LMRequest:
    return LMRequest(messages=[PromptMessage("user", (text,))], seed=0, **fields)


def long_text(tokens_at_least: int) -> str:
    return "three red circles " * tokens_at_least  # at least one token per word


# --- the engine: context limits and the empty-batch error ---------------------------------------


def test_max_tokens_beyond_the_context_is_clamped_with_one_warning(vlm_service, caplog):
    engine = vlm_service.engine
    caplog.set_level(logging.WARNING, logger="nodes.backends.engines.transformers_lm")
    asked = 5003  # a value no other test asks for: the engine warns once per value
    first, second = engine.run_batch([lm_request(max_tokens=asked), lm_request(max_tokens=asked)])
    assert not isinstance(first, BaseException), first
    room = CONTEXT - len(first.prompt_token_ids)
    assert len(first.token_ids) <= room and len(second.token_ids) <= room
    if first.finish_reason == "length":
        assert len(first.token_ids) == room  # it generated up to the context, not beyond
    warnings = [r for r in caplog.records if "does not fit" in r.getMessage()]
    assert len(warnings) == 1  # once per requested value, not once per request
    assert f"max_tokens {asked}" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_a_prompt_longer_than_the_context_is_refused_and_its_batch_mates_are_served(
    vlm_service, caplog
):
    engine = vlm_service.engine
    caplog.set_level(logging.ERROR)
    too_long, fits = engine.run_batch(
        [lm_request(long_text(CONTEXT), max_tokens=4), lm_request(max_tokens=4)]
    )
    assert isinstance(too_long, InvalidRequest)
    assert "longer than the model's context (512 tokens)" in str(too_long)
    assert len(fits.token_ids) == 4
    # A batch whose every request is refused runs no forward pass, and logs no error
    # (it used to log "batch of 0 failed ... max() arg is an empty sequence").
    alone = engine.run_batch([lm_request(long_text(CONTEXT), max_tokens=4)])
    assert isinstance(alone[0], InvalidRequest)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_lm_server_answers_400_for_a_prompt_beyond_the_context(lm_server):
    chat = {"messages": [{"role": "user", "content": long_text(CONTEXT)}], "max_tokens": 4}
    async with httpx.AsyncClient(timeout=60) as http:
        reply = await http.post(lm_server.url + "/v1/chat/completions", json=chat)
        assert reply.status_code == 400
        assert "longer than the model's context" in reply.json()["error"]["message"]
        fits = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4000, "seed": 1}
        reply = await http.post(lm_server.url + "/v1/chat/completions", json=fits)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["total_tokens"] <= CONTEXT


# --- sampling settings from a config ------------------------------------------------------------


def sampling_config(url: str, backend: dict, roles: dict) -> dict:
    return {
        "backends": {
            "a": {"kind": "openai", "urls": [url], "sampling": backend},
            "w": {"kind": "shapeworld"},
        },
        "roles": {**ROLES, **roles},
    }


async def ask(model, max_tokens: int = 64, temperature: float = 1.0):
    request = ChatRequest(
        messages=(ChatMessage("user", PROMPT),),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=7),
    )
    return await model.chat(request)


async def test_backend_and_role_sampling_reach_the_server(lm_server):
    config = sampling_config(
        lm_server.url,
        {"max_tokens": 5, "temperature": 0.0},
        {"planner": {"backend": "a", "sampling": {"max_tokens": 3}}},
    )
    backends = build_backends(parse_config(config))
    planner, reflector = backends["planner"], backends["reflector"]
    assert planner is not reflector and reflector is backends["decomposer"]  # shared when alike
    plan, reflection = await ask(planner), await ask(reflector)
    assert len(plan.token_ids) == 3  # the role's max_tokens over the backend's
    assert len(reflection.token_ids) == 5  # the backend's, over the node's 64
    assert plan.token_ids == reflection.token_ids[:3]  # temperature 0 from the backend: greedy


async def test_top_k_and_repetition_penalty_from_a_config_change_the_sampling(lm_server):
    plain = build_backends(parse_config(sampling_config(lm_server.url, {}, {})))["planner"]
    greedy = await ask(plain, max_tokens=16, temperature=0.0)
    top_1 = build_backends(parse_config(sampling_config(lm_server.url, {"top_k": 1}, {})))
    sampled = await ask(top_1["planner"], max_tokens=16, temperature=1.0)
    assert sampled.token_ids == greedy.token_ids  # top_k = 1 samples the argmax
    assert len(set(greedy.token_ids)) < len(greedy.token_ids)  # a random model repeats itself
    penalised = build_backends(
        parse_config(
            sampling_config(lm_server.url, {"repetition_penalty": 1e4, "temperature": 0.0}, {})
        )
    )["planner"]
    varied = await ask(penalised, max_tokens=16)
    assert len(set(varied.token_ids)) == len(varied.token_ids)  # no token twice


async def test_in_process_backends_take_sampling_too(vlm_service):
    from nodes.backends.engines.lm_inprocess import InProcessChatModel
    from nodes.backends.overrides import SampledChatModel

    model = SampledChatModel(InProcessChatModel(vlm_service), {"max_tokens": 2, "top_k": 1})
    completion = await ask(model)
    greedy = await ask(InProcessChatModel(vlm_service), max_tokens=2, temperature=0.0)
    assert completion.token_ids == greedy.token_ids and len(completion.token_ids) == 2


@pytest.mark.parametrize(
    ("backend", "roles", "message"),
    [
        ({"max_tokens": 0}, {}, r"backends\.a\.sampling\.max_tokens: Input should be greater"),
        ({"temperature": -1}, {}, r"backends\.a\.sampling\.temperature: Input should be greater"),
        ({"top_p": 1.5}, {}, r"backends\.a\.sampling\.top_p: Input should be less"),
        ({"top_k": -2}, {}, r"backends\.a\.sampling\.top_k: Input should be greater"),
        ({"repetition_penalty": 0}, {}, r"sampling\.repetition_penalty: Input should be greater"),
        ({"max_token": 8}, {}, r"backends\.a\.sampling\.max_token: Extra inputs"),
        ({"seed": 3}, {}, r"backends\.a\.sampling: seed cannot be set here"),
        (
            {},
            {"planner": {"backend": "a", "sampling": {"temperature": "hot"}}},
            r"roles\.planner\.sampling\.temperature: Input should be a valid number",
        ),
        (
            {},
            {"generator": {"backend": "w", "sampling": {"max_tokens": 8}}},
            r"roles\.generator: sampling applies to chat roles",
        ),
    ],
)
def test_bad_sampling_settings_name_the_key(backend, roles, message):
    config = sampling_config("http://127.0.0.1:9", backend, roles)
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(config, source="my.toml")
    assert "str:" not in str(info.value) and "RoleSpec" not in str(info.value)


def test_image_sizes_from_a_config_are_checked():
    config = {
        "backends": {
            "a": {"kind": "shapeworld"},
            "p": {"kind": "omni", "urls": ["http://127.0.0.1:9"], "size": "64by64"},
        },
        "roles": {"planner": "a", **ROLES, "generator": "p", "editor": "p"},
    }
    with pytest.raises(ConfigError, match=r"backends\.p\.size: invalid size '64by64'"):
        parse_config(config)


def test_repetition_penalty_equals_transformers_logits_processor():
    # Checked against an independent implementation: transformers' own processor, which
    # penalises every token in input_ids (prompt and output so far).
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from nodes.backends.engines.transformers_lm import _penalised

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=generator, dtype=torch.float64) * 3
    seen = [3, 7, 7, 11, 42, 0]
    for penalty in (1.3, 0.7, 1.0):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.tensor([seen]), logits.clone().unsqueeze(0)
        )[0]
        got = _penalised(logits.clone(), penalty, set(seen)).double()
        assert torch.allclose(got, expected, atol=1e-6), penalty
    assert _penalised(logits, None, set(seen)) is logits  # no penalty: untouched
