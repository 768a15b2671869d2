"""SFT with SAIR's selective loss masking, from a recorded escalate run in ShapeWorld.

The text roles are ShapeWorld's, wrapped to return token ids as a served model does: one id per
word (a stable hash into the tiny LM's vocabulary), so the stored ids are not what a tokenizer
would make of the text. Which generations are targets is checked per stage against the recorded
path, by rules written out here independently of ``training.text.sft``; the masked loss gives
context tokens exactly zero gradient; SFT on the tiny LM lowers the NLL of its targets."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from agent_graph.presets import shapeworld_context, shapeworld_tasks
from agent_graph.rollout import rollout
from nodes.backends.base import ChatRequest, TextCompletion
from nodes.common import derive_seed
from nodes.state import Budget
from storage.store import TrajectoryStore
from training.text.sft import (
    SFTExample,
    read_sft_examples,
    select_targets,
    sft_loss,
    target_counts,
)

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models

TASKS = shapeworld_tasks(2, 1, 2)  # 18 prompts: some end in each of the three stages


def word_id(word: str) -> int:
    return 16 + derive_seed("word", word) % 256


class IdChat:
    """A ShapeWorld role that also returns token ids (one per word) and, with ``prompt_ids``,
    the prompt's ids, as a served model returns them."""

    def __init__(self, inner: Any, *, prompt_ids: bool) -> None:
        self.inner, self.prompt_ids = inner, prompt_ids

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    async def chat(self, request: ChatRequest) -> TextCompletion:
        completion = await self.inner.chat(request)
        ids = tuple(word_id(w) for w in completion.text.split())
        prompt = tuple(word_id(w) for m in request.messages for w in m.text.split())
        return dataclasses.replace(
            completion,
            token_ids=ids,
            logprobs=tuple(-1.0 for _ in ids),
            prompt_token_ids=prompt if self.prompt_ids else None,
        )


async def record(store: TrajectoryStore, *, with_ids: bool = True) -> str:
    context = shapeworld_context("escalate")
    if with_ids:
        b = context.backends
        backends = dataclasses.replace(
            b,
            planner=IdChat(b.planner, prompt_ids=True),  # prompt: the stored prompt ids
            reflector=IdChat(b.reflector, prompt_ids=True),
            decomposer=IdChat(b.decomposer, prompt_ids=False),  # prompt: the stored messages
        )
        context = dataclasses.replace(context, backends=backends)
    outcome = await rollout(store, TASKS, context=context, budget=Budget(), name="sft")
    assert {r.status for r in outcome.results} == {"succeeded"}
    return outcome.run_id


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    store = TrajectoryStore(f"sqlite:///{tmp_path_factory.mktemp('sft')}/runs.db")
    run_id = asyncio.run(record(store))
    yield store, run_id
    store.close()


# --- which generations are targets ----------------------------------------------------------


def expected_targets(detail: Any) -> set[tuple[int, str, str]]:
    """(step, stage, role) of the targets, read off the recorded path by SAIR's rule: the plan
    and the accepting verdict if direct drawing sufficed; the last diagnosis (the rejection
    whose edit made the final image) and the accepting verdict if reflection fixed it; the
    decomposition and each verdict on a sub-task image (and a diagnosis whose edit was then
    accepted) if it escalated to multi-step. Nothing of a trajectory the judge failed."""
    if not detail.correct:
        return set()
    steps = detail.steps
    nodes = [s.node for s in steps]

    def verdict(i: int) -> dict:
        return steps[i].update["reflections"][0]

    if verdict(2)["accept"]:
        return {(0, "direct", "plan"), (2, "direct", "verdict")}
    if "decompose" not in nodes:
        last_edit = max(i for i, n in enumerate(nodes) if n == "refine")
        diagnosis = max(i for i in range(last_edit) if nodes[i] == "reflect")
        final = max(i for i, n in enumerate(nodes) if n == "reflect")
        assert verdict(final)["accept"]
        return {(diagnosis, "reflect", "diagnosis"), (final, "reflect", "verdict")}
    start = nodes.index("decompose")
    final_image = len(detail.final_state["images"]) - 1
    accepted = {
        verdict(i)["image_index"] for i in range(start, len(steps)) if nodes[i] == "reflect"
    }
    accepted = {x for x in accepted if any(
        nodes[i] == "reflect" and verdict(i)["accept"] and verdict(i)["image_index"] == x
        for i in range(start, len(steps))
    )}  # fmt: skip
    out = {(start, "decompose", "subtasks")}
    for i in range(start + 1, len(steps)):
        if nodes[i] != "reflect":
            continue
        if verdict(i)["accept"]:
            out.add((i, "decompose", "verdict"))
        elif nodes[i + 1] == "refine" and "subtasks_done" not in steps[i + 1].update:
            made = len(steps[i + 1].state_before["images"])
            if made in accepted or made == final_image:
                out.add((i, "decompose", "diagnosis"))
    return out


def test_targets_per_stage_follow_the_recorded_path(recorded):
    store, run_id = recorded
    per_stage = {"direct": 0, "reflect": 0, "decompose": 0}
    for summary in store.trajectories(run=run_id, limit=None):
        detail = store.trajectory(summary.id)
        assert [s.seq for s in detail.steps] == list(range(len(detail.steps)))
        got = {(t.step_seq, t.stage, t.role) for t in select_targets(detail)}
        assert got == expected_targets(detail), [s.node for s in detail.steps]
        if got:
            per_stage[detail.final_state["stage"]] += 1
    assert all(per_stage.values()), per_stage  # every stage succeeded somewhere

    examples = read_sft_examples(store, run_id)
    counts = target_counts(examples)
    assert set(counts) == {
        ("direct", "plan"), ("direct", "verdict"), ("reflect", "diagnosis"),
        ("reflect", "verdict"), ("decompose", "subtasks"), ("decompose", "verdict"),
    } | ({("decompose", "diagnosis")} & set(counts))  # fmt: skip
    # Never a target: the direct stage's plan once escalated, or any rejection that failed.
    for example in examples:
        if example.stage != "direct":
            assert example.node != "plan"
        if example.node == "reflect" and example.role == "verdict":
            assert "No further edit needed" in example.text
    only_reflect = read_sft_examples(store, run_id, stages=["reflect"])
    assert only_reflect == [e for e in examples if e.stage == "reflect"]
    assert {e.node for e in read_sft_examples(store, run_id, nodes=["decompose"])} == {"decompose"}


def test_without_correct_only_the_reflectors_acceptance_decides(recorded):
    store, run_id = recorded
    for summary in store.trajectories(run=run_id, limit=None):
        detail = store.trajectory(summary.id)
        targets = select_targets(detail, correct_only=False)
        assert bool(targets) == (detail.final_state["stop_reason"] == "accepted")
        if detail.correct and targets:
            assert targets == select_targets(detail)


def test_examples_carry_the_stored_ids_and_request(recorded):
    store, run_id = recorded
    examples = read_sft_examples(store, run_id)
    assert examples
    for example in examples:
        step = next(s for s in store.steps(example.trajectory_id) if s.seq == example.step_seq)
        [generation] = step.generations
        assert example.target_ids == generation.token_ids  # stored, never re-tokenised
        assert example.target_ids == tuple(word_id(w) for w in example.text.split())
        assert example.target_source == "stored"
        assert list(example.messages) == generation.messages
        assert example.prompt_token_ids == generation.prompt_token_ids
        assert (example.prompt_token_ids is not None) == (example.node != "decompose")
    # Stored ids win: an encoder is used only for generations stored without ids.
    again = read_sft_examples(store, run_id, encode_missing=lambda text: [1, 2, 3])
    assert again == examples


def test_text_stored_without_ids_needs_an_explicit_encoder(tmp_path):
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'plain.db'}")
    run_id = asyncio.run(record(store, with_ids=False))  # ShapeWorld's roles: text only
    with pytest.raises(ValueError, match="no completion token ids"):
        read_sft_examples(store, run_id)
    examples = read_sft_examples(store, run_id, encode_missing=lambda t: [len(t)])
    assert examples and {e.target_source for e in examples} == {"encoded"}
    assert all(e.target_ids == (len(e.text),) for e in examples)
    store.close()


# --- the masked loss --------------------------------------------------------------------------


def test_sft_loss_is_the_mean_nll_of_the_target_tokens():
    import torch

    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, float("-inf")]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    assert sft_loss(logprobs, mask).item() == pytest.approx((1 + 3 + 5) / 3)
    with pytest.raises(ValueError, match="no target token"):
        sft_loss(logprobs, torch.zeros_like(mask))


def test_masked_tokens_get_exactly_zero_gradient():
    import torch

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=generator, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 7), generator=generator)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 1, 0]])
    logprobs = torch.log_softmax(logits, -1).gather(2, tokens[..., None])[..., 0]
    sft_loss(logprobs, mask).backward()
    masked = ~mask.bool()
    assert torch.equal(logits.grad[masked], torch.zeros_like(logits.grad[masked]))
    assert (logits.grad[mask.bool()].abs().sum(-1) > 0).all()
    # The same as a loss over the target tokens alone.
    alone = -torch.log_softmax(logits, -1).gather(2, tokens[..., None])[..., 0][mask.bool()]
    assert sft_loss(logprobs, mask).item() == pytest.approx(alone.mean().item())


# --- on the tiny LM -----------------------------------------------------------------------------


def rows_of(examples: list[SFTExample], trainer: Any) -> list[tuple[list[int], list[int], Any]]:
    from training.text.sft import example_rows

    return example_rows(trainer, examples)


def mean_nll(trainer: Any, rows: list[tuple[list[int], list[int]]]) -> tuple[float, Any]:
    """Token-mean NLL of the rows' targets, and their per-token log-probs."""
    import torch

    with torch.no_grad():
        logp, mask = trainer.logprobs(rows)
    return sft_loss(logp, mask).item(), logp[mask.bool()]


@pytest.mark.models
def test_context_tokens_of_a_failed_attempt_get_zero_gradient_through_the_model(
    recorded, tiny_models
):
    """A failed rejection's tokens as context before a target: d loss / d (their logits) is
    exactly 0, and the loss and LoRA gradient equal those with the failure as prompt."""
    import torch

    from training.text.trainer import LoRATrainer

    store, run_id = recorded
    examples = read_sft_examples(store, run_id)
    target = next(e for e in examples if e.node == "reflect" and e.role == "diagnosis")
    chosen = {(e.trajectory_id, e.step_seq) for e in examples}
    failed = next(  # a rejection that is not a target: the edit it asked for did not fix it
        s.generations[0]
        for t in store.trajectories(run=run_id, limit=None)
        for s in store.steps(t.id)
        if s.node == "reflect"
        and not s.update["reflections"][0]["accept"]
        and (t.id, s.seq) not in chosen
    )
    trainer = LoRATrainer(tiny_models.lm)
    prompt, context, completion = (
        list(target.prompt_token_ids),
        list(failed.token_ids),
        list(target.target_ids),
    )
    ids = torch.tensor([prompt + context + completion])
    logits = trainer.model(input_ids=ids).logits
    logits.retain_grad()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None])[..., 0]
    mask = torch.zeros_like(logp)
    mask[0, len(prompt) + len(context) - 1 :] = 1  # position t predicts token t + 1
    sft_loss(logp, mask).backward()
    grads = logits.grad[0]
    failed_positions = slice(len(prompt) - 1, len(prompt) + len(context) - 1)
    assert torch.equal(grads[failed_positions], torch.zeros_like(grads[failed_positions]))
    assert grads[len(prompt) + len(context) - 1 : -1].abs().sum() > 0

    def loss_and_grads(rows: list, mask: Any | None = None) -> tuple[float, list]:
        trainer.optimizer.zero_grad(set_to_none=True)
        logp, row_mask = trainer.logprobs(rows)
        loss = sft_loss(logp, row_mask if mask is None else mask)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in trainer.parameters]

    as_prompt = loss_and_grads([(prompt + context, completion)])
    masked = torch.tensor([[0.0] * len(context) + [1.0] * len(completion)])
    as_masked_completion = loss_and_grads([(prompt, context + completion)], masked)
    assert as_prompt[0] == pytest.approx(as_masked_completion[0], rel=1e-5)
    for a, b in zip(as_prompt[1], as_masked_completion[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.models
def test_sft_on_the_tiny_lm_lowers_the_nll_of_the_stored_targets(recorded, tiny_models, tmp_path):
    import torch

    from training.text.sft import train_sft
    from training.text.trainer import LORA_TARGETS, LoRAConfig, LoRATrainer
    from training.versions import save_version

    store, run_id = recorded
    # The text roles (reflect prompts hold an image: a vision-language model's examples).
    examples = read_sft_examples(store, run_id, nodes=["plan", "decompose"])
    assert {e.node for e in examples} == {"plan", "decompose"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest (see tests.tiny_models)
    try:
        # lm_head too (as in test_training_lora): with tiny tied embeddings the final RMSNorm
        # bounds how far the decoder's layers alone move a logit (measured: -0.2 nats without).
        config = LoRAConfig(lr=3e-3, target_modules=(*LORA_TARGETS, "lm_head"))
        trainer = LoRATrainer(tiny_models.lm, config, name="escalate-sft")
        rows = rows_of(examples, trainer)
        # The targets are the stored ids, not the text re-tokenised by the model's tokenizer.
        tokenizer = trainer.engine.tokenizer
        retokenised = [tokenizer.encode(e.text, add_special_tokens=False) for e in examples]
        assert [row[1] for row in rows] == [list(e.target_ids) for e in examples]
        assert all(r != list(e.target_ids) for r, e in zip(retokenised, examples, strict=True))
        # Decompose prompts: the stored messages encoded as the server encodes them; plan
        # prompts: the stored prompt ids.
        for (prompt, _, _), example in zip(rows, examples, strict=True):
            if example.prompt_token_ids is not None:
                assert prompt == list(example.prompt_token_ids)
            else:
                assert prompt == trainer.prompt_ids(example.messages)

        before, before_logp = mean_nll(trainer, rows)
        # One minibatch of them all: full-batch steps, the same whatever order they are read
        # in (small noisy minibatches at a high rate sometimes spike on this random model).
        result = train_sft(trainer, examples, epochs=20, minibatch_size=16)
        after, after_logp = mean_nll(trainer, rows)
        print(f"target NLL {before:.3f} -> {after:.3f}, {result.metrics}")
        assert after < before - 1.5  # nats per target token (measured: 6.0 -> 3.6)
        assert (after_logp > before_logp).float().mean() > 0.9  # nearly all (measured: 0.96)
        assert result.version == trainer.version == "1"
        assert len(examples) <= 16
        assert result.metrics["steps"] == len(result.history) == 20
        assert result.metrics["last_loss"] < result.metrics["first_loss"]
        # Saved and registered like a GRPO version.
        path = save_version(trainer, store, tmp_path / "sft-1", {**result.metrics, "sft": 1})
        (registered,) = store.policy_versions(name="escalate-sft")
        assert (registered.version, registered.path) == ("1", str(path))
    finally:
        torch.set_num_threads(threads)
