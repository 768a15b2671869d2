"""Each recorded generation keeps its request: the chat messages exactly as sent (images as
image-store refs), the sampling fields as sent, and the prompt's token ids as the server encoded
them — so a text-policy trainer reads the very prompt the model saw and never re-tokenises.

Real parts throughout: the SQL store, ``atelier serve lm`` on loopback for the tiny text LM and
the tiny VLM, the reasoner graph; the prompt ids are checked against the server's own engine
encoding the *stored* messages (images loaded back from the store by their refs)."""

from __future__ import annotations

import json
from typing import Any

from agent_graph.runner import Runner
from nodes.backends.base import SamplingParams
from nodes.backends.clients.openai_client import OpenAIChatClient
from nodes.backends.lm_types import LMRequest, PromptMessage
from nodes.backends.wire import IMAGE_REF_PART, messages_payload
from nodes.common import NodeTrace, call_chat, derive_seed
from nodes.context import Backends, GraphSettings, ReasonerContext
from nodes.prompts import plan_messages
from nodes.state import Budget, Task
from policies.simple import FixedModePolicy, FollowReflectionStopPolicy
from tests.scripted import CountingPainter

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models and servers

MAX_TOKENS = 6


def stored_prompt(messages: list[dict[str, Any]], load_image: Any) -> list[PromptMessage]:
    """Stored messages back into the engine's prompt, images loaded by ref (as a trainer
    would: nothing else is needed)."""
    prompt = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            prompt.append(PromptMessage(message["role"], (content,)))
            continue
        parts = tuple(
            load_image(part["ref"]) if part["type"] == IMAGE_REF_PART else part["text"]
            for part in content
        )
        prompt.append(PromptMessage(message["role"], parts))
    return prompt


async def test_a_graph_run_records_each_request_as_sent_with_the_servers_prompt_ids(
    text_lm, lm_server, vlm_service, tmp_path
):
    from storage.recorder import SQLRecorder
    from storage.store import TrajectoryStore

    server, service = text_lm
    painter = CountingPainter()  # random blueprints: a painter that reads no prompt
    planner = OpenAIChatClient(server.url, model="tiny-lm")
    reflector = OpenAIChatClient(lm_server.url)  # the tiny VLM
    backends = Backends(
        planner=planner,
        reflector=reflector,
        decomposer=planner,
        generator=painter,
        editor=painter,
        judge=None,
    )
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.95)
    store = TrajectoryStore(f"sqlite:///{tmp_path}/requests.db")
    run = store.create_run("requests", {"mode": "reflect"})
    task = Task(prompt="a red circle", seed=3)
    try:
        async with SQLRecorder(store, run.id) as recorder:
            context = ReasonerContext(
                backends=backends,
                mode_policy=FixedModePolicy("reflect"),
                stop_policy=FollowReflectionStopPolicy(),
                images=store,
                settings=GraphSettings(width=64, height=64, sampling=sampling),
                recorder=recorder,
            )
            result = await Runner(context, budget=Budget(max_rounds=1)).run_one(task)
        assert result.status == "succeeded", result.error
        steps = store.trajectory(result.state.trajectory_id).steps
    finally:
        await planner.aclose()
        await reflector.aclose()

    # plan (text LM): the messages as the client sent them, the sampling fields it sent.
    plan = next(s for s in steps if s.node == "plan")
    [generation] = plan.generations
    assert generation.messages == messages_payload(plan_messages(task.prompt))
    assert generation.sampling == {
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": -1,  # pinned neutral: vLLM would fill an omitted one from generation_config
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "max_tokens": MAX_TOKENS,
        "logprobs": True,
        "return_token_ids": True,
        "seed": derive_seed(task.seed, 0, "plan"),
    }
    # The prompt ids are what the server's engine encodes for the stored messages.
    encoded = service.engine.encode(
        LMRequest(messages=stored_prompt(generation.messages, store.get), max_tokens=MAX_TOKENS)
    )
    assert generation.prompt_token_ids == tuple(encoded.input_ids)
    assert 0 < len(generation.token_ids) == len(generation.logprobs) <= MAX_TOKENS
    assert generation.text == service.engine.tokenizer.decode(
        list(generation.token_ids), skip_special_tokens=True
    )

    # reflect (VLM): the image part is the stored image's ref, never its bytes.
    reflect = next(s for s in steps if s.node == "reflect")
    [generation] = reflect.generations
    system, user = generation.messages
    assert system["role"] == "system" and isinstance(system["content"], str)
    image_part, text_part = user["content"]
    assert image_part == {"type": IMAGE_REF_PART, "ref": reflect.images_in[0].ref}
    assert text_part["type"] == "text" and text_part["text"].startswith("The target")
    assert "base64" not in json.dumps(generation.messages)
    encoded = vlm_service.engine.encode(
        LMRequest(messages=stored_prompt(generation.messages, store.get), max_tokens=MAX_TOKENS)
    )
    assert generation.prompt_token_ids == tuple(encoded.input_ids)
    assert generation.sampling["seed"] == derive_seed(task.seed, reflect.seq, "reflect")
    # The bulk read hands out the same.
    again = store.steps_many([reflect.trajectory_id])[reflect.trajectory_id]
    assert [g.messages for s in again for g in s.generations] == [
        g.messages for s in steps for g in s.generations
    ]
    store.close()


async def test_in_process_chat_reports_prompt_ids_and_sampling(vlm_service):
    from nodes.backends.base import ChatMessage
    from nodes.backends.engines.lm_inprocess import InProcessChatModel

    model = InProcessChatModel(vlm_service)
    trace = NodeTrace()
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "a blue square")]
    sampling = SamplingParams(max_tokens=4, top_k=5)
    generation = await call_chat(model, "plan", messages, sampling, 9, trace)
    assert generation.sampling == {
        "temperature": 1.0,
        "top_p": 1.0,
        "max_tokens": 4,
        "logprobs": True,
        "seed": 9,
        "top_k": 5,
    }
    assert generation.messages == messages_payload(messages)
    encoded = vlm_service.engine.encode(
        LMRequest(messages=[PromptMessage.from_chat(m) for m in messages], max_tokens=4)
    )
    assert generation.prompt_token_ids == tuple(encoded.input_ids)
