"""The full reasoner graph end to end through Atelier's HTTP servers with tiny random models,
recorded in the SQL store: every sampled text keeps the token ids and log-probs the server
returned, bit for bit."""

from __future__ import annotations

from agent_graph.runner import Runner
from nodes.backends.base import ChatRequest, SamplingParams, TextCompletion
from nodes.backends.clients.omni_client import OmniImageClient
from nodes.backends.clients.openai_client import OpenAIChatClient
from nodes.backends.vlm_judge import VLMJudge
from nodes.context import Backends, GraphSettings, ReasonerContext
from nodes.state import Budget, StopReason, Task
from policies.simple import FixedModePolicy, FollowReflectionStopPolicy

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models and servers


class Tap:
    """Passes chat calls through, keeping what the server answered."""

    def __init__(self, inner: OpenAIChatClient) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.completions: list[TextCompletion] = []

    async def chat(self, request: ChatRequest) -> TextCompletion:
        completion = await self.inner.chat(request)
        self.completions.append(completion)
        return completion


async def test_reflect_loop_runs_through_http_servers_and_is_recorded(
    lm_server, image_server, tmp_path
):
    from storage.recorder import SQLRecorder
    from storage.store import TrajectoryStore

    chat = OpenAIChatClient(lm_server.url)
    tap = Tap(chat)
    painter = OmniImageClient(image_server.url)
    backends = Backends(
        planner=tap,
        reflector=tap,
        decomposer=tap,
        generator=painter,
        editor=painter,
        judge=VLMJudge(chat),
    )
    settings = GraphSettings(
        width=64, height=64, steps=2, sampling=SamplingParams(max_tokens=10, temperature=1.0)
    )
    store = TrajectoryStore(f"sqlite:///{tmp_path}/a.db")
    run = store.create_run("tiny-http", {"world": "tiny-http", "mode": "reflect"})
    async with SQLRecorder(store, run.id) as recorder:
        context = ReasonerContext(
            backends=backends,
            mode_policy=FixedModePolicy("reflect"),
            stop_policy=FollowReflectionStopPolicy(),
            images=store,
            settings=settings,
            recorder=recorder,
        )
        result = await Runner(context, budget=Budget(max_rounds=2)).run_one(
            Task(prompt="a red circle", seed=11)
        )

    assert result.status == "succeeded", result.error
    state = result.state
    assert state.error is None
    # Random text is never R3's format: the graph records that and the budget ends the loop.
    assert state.stop_reason == StopReason.BUDGET and state.rounds == 2
    assert state.reflections and not any(r.well_formed for r in state.reflections)
    assert all(image.score is not None and 0 <= image.score <= 1 for image in state.images)
    nodes = [step.node for step in result.steps]
    assert nodes[:3] == ["plan", "draw", "reflect"] and nodes[-1] == "stop"

    traced = [g for step in result.steps for g in step.trace.generations]
    assert [g.role for g in traced] == ["plan", *["reflect"] * len(state.reflections)]
    assert len(traced) == len(tap.completions)
    for generation, completion in zip(traced, tap.completions, strict=True):
        assert generation.token_ids and len(generation.token_ids) == len(generation.logprobs)
        assert generation.token_ids == completion.token_ids
        assert generation.logprobs == completion.logprobs
        assert generation.model == "tiny-vlm"

    stored = [g for step in store.steps(result.trajectory_id) for g in step.generations]
    assert [(g.role, g.text) for g in stored] == [(g.role, g.text) for g in traced]
    for generation, completion in zip(stored, tap.completions, strict=True):
        assert generation.token_ids == completion.token_ids  # bit for bit through the store
        assert generation.logprobs == completion.logprobs
    images = [img for step in store.steps(result.trajectory_id) for img in step.images_out]
    assert len(images) == len(state.images) and all(i.width == 64 for i in images)
    assert store.get(state.final_image).size == (64, 64)
    store.close()
