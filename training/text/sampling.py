"""Sample completions of prompts from a chat server and record each as a one-step trajectory.

``collect`` samples ``group_size`` completions per prompt with temperature 1 and top-p 1 (so the
server's raw log-probs are exactly the sampling policy's) and records each as a one-step
trajectory (node ``planner``) through :class:`storage.recorder.SQLRecorder`: the generation's
token ids and log-probs are stored bit-exact. The completions of one prompt share a
``group_id``; the chat's system prompt goes into the run's config.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent_graph.ids import time_ordered_id
from agent_graph.recording import StepRecord
from nodes.backends.base import ChatMessage, SamplingParams
from nodes.common import NodeTrace, call_chat, derive_seed
from nodes.state import ReasonerState, Task
from storage.recorder import SQLRecorder

if TYPE_CHECKING:
    from storage.records import GenerationInfo, StepInfo
    from storage.store import TrajectoryStore

DEFAULT_SYSTEM = "You are a planner. Write a short plan for the picture."


def prompt_messages(prompt: str, system: str = DEFAULT_SYSTEM) -> list[Any]:
    """The chat a completion answers: a system turn and the prompt as the user turn."""
    return [ChatMessage("system", system), ChatMessage("user", prompt)]


def recorded_completion(trajectory_id: str, steps: Sequence[StepInfo]) -> GenerationInfo:
    """The trajectory's sampled completion (its first step's first generation)."""
    if not steps or not steps[0].generations:
        raise ValueError(f"trajectory {trajectory_id} has no recorded generation")
    return steps[0].generations[0]


async def collect(
    client: Any,
    store: TrajectoryStore,
    prompts: Sequence[str],
    *,
    group_size: int = 8,
    max_tokens: int = 16,
    system: str = DEFAULT_SYSTEM,
    seed: int = 0,
    name: str | None = None,
) -> str:
    """Sample ``group_size`` completions of every prompt from ``client`` (a chat model with
    token ids and log-probs, e.g. ``OpenAIChatClient``) concurrently, and record each as a
    one-step trajectory in ``store``. Returns the run id."""

    config = {"kind": "lora-sampling", "system": system, "max_tokens": max_tokens, "seed": seed}
    run = store.create_run(name or "lora-sampling", config)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens, logprobs=True)
    group_tag = uuid.uuid4().hex[:8]

    async def sample(recorder: Any, index: int, prompt: str, k: int) -> None:
        task = Task(
            prompt=prompt,
            group_id=f"{group_tag}-{index}",
            sample_index=k,
            seed=derive_seed(seed, index, k),
        )
        state = ReasonerState(trajectory_id=time_ordered_id(), task=task)
        await recorder.start_trajectory(state)
        trace = NodeTrace()
        started_at, started = time.time(), time.perf_counter()
        await call_chat(
            client, "planner", prompt_messages(prompt, system), sampling, task.seed, trace
        )
        await recorder.record_step(
            StepRecord(
                trajectory_id=state.trajectory_id,
                seq=0,
                node="planner",
                started_at=started_at,
                latency_s=time.perf_counter() - started,
                state_before=state.model_dump(mode="json"),
                update={"step_count": 1},
                trace=trace,
            )
        )
        await recorder.finish_trajectory(state.trajectory_id, "succeeded", state, None)

    async with SQLRecorder(store, run.id) as recorder:
        await asyncio.gather(
            *(
                sample(recorder, i, prompt, k)
                for i, prompt in enumerate(prompts)
                for k in range(group_size)
            )
        )
    return run.id
