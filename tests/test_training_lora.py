"""LoRA text policies end to end on the tiny random-weight LM: completions sampled from the
``lm`` server over HTTP and recorded in the store → GRPO on a LoRA adapter from the stored
token ids and log-probs → the adapter saved (peft, safetensors) and loaded by the server at run
time → the high-reward completions became more likely; each version registered in the store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from training.text.groups import best_members, read_groups
from training.text.loop import grpo_round
from training.text.rewards import score_run, target_fraction
from training.text.sampling import collect
from training.text.trainer import LORA_TARGETS, LoRAConfig, LoRATrainer
from training.versions import save_version

if TYPE_CHECKING:
    from nodes.backends.engines.tiny_models import TinyModels

pytest_plugins = ("tests.tiny_models",)  # the session fixtures: tiny models

PROMPTS = ["two red circles", "a blue square above a star", "three green triangles", "an image"]
GROUP_SIZE = 8
TOKENS = 12


@pytest.fixture(scope="module")
def text_lm_server(text_lm: Any) -> Any:
    return text_lm[0]


def word_tokens(tokenizer: Any) -> set[int]:
    """The target set: tokens that are whole space-led words (" red", " circle", ...)."""
    words = set()
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if text.startswith(" ") and text[1:].isalpha() and len(text) >= 4:
            words.add(token_id)
    return words


async def mean_logprob(client: Any, pairs: list) -> float:
    """Mean over completions of their mean per-token log-prob, scored by the server."""
    values = []
    for group, member in pairs:
        scored = await client.score_text(list(group.messages), member.text)
        values.append(scored.mean_logprob)
    return sum(values) / len(values)


# The server's peft notes that the adapter has a LoRA on the tied ``lm_head`` (intended).
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
async def test_grpo_lora_raises_the_logprob_of_high_reward_completions(
    text_lm_server, tiny_models: TinyModels, tmp_path: Path
):
    import torch

    from nodes.backends.clients.openai_client import OpenAIChatClient
    from storage.store import TrajectoryStore

    client = OpenAIChatClient(text_lm_server.url, model="tiny-lm")
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'lora.db'}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest (see tests.tiny_models)
    try:
        # lm_head too (an adapter vLLM would not load, ``atelier serve lm`` does): with tiny tied
        # embeddings the final RMSNorm bounds how far the decoder's layers alone move a logit.
        targets = (*LORA_TARGETS, "lm_head")
        config = LoRAConfig(lr=1e-2, epochs=8, minibatch_size=16, target_modules=targets)
        trainer = LoRATrainer(tiny_models.lm, config)
        targets = word_tokens(trainer.engine.tokenizer)
        assert 20 < len(targets) < 80
        reward = target_fraction(targets, trainer.engine.stop_ids)

        # 1-2. Sample G completions per prompt over HTTP (temperature 1, top-p 1), record them
        # with the SQLRecorder, reward them in the store.
        run_id = await collect(client, store, PROMPTS, group_size=GROUP_SIZE, max_tokens=TOKENS)
        assert len(score_run(store, run_id, reward)) == len(PROMPTS) * GROUP_SIZE
        # 3. Groups from the stored ids and log-probs (bit-exact, never re-tokenised).
        groups = read_groups(store, run_id)
        assert len(groups) == len(PROMPTS)
        assert all(len(g.members) == GROUP_SIZE for g in groups)
        for group in groups:
            for m in group.members:
                assert 0 < len(m.token_ids) == len(m.logprobs) <= TOKENS
                assert m.reward == reward(m.text, m.token_ids)
        # 4-5. GRPO on the LoRA parameters.
        result = trainer.train(groups)
        metrics = result.metrics
        # Before the first update, the recomputed log-probs are the server's sampling log-probs.
        assert metrics["first_max_abs_log_ratio"] < 1e-5
        assert metrics["first_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert metrics["groups_used"] >= 3 and metrics["steps"] == len(result.history) == 8 * 2
        assert result.history[-1]["ratio_mean"] != pytest.approx(1.0, abs=1e-3)  # it moved
        # 6. Save in peft's layout, registered as the next version; the server loads it.
        adapter = save_version(trainer, store, tmp_path / "adapter-1", metrics)
        assert (adapter / "adapter_model.safetensors").exists()
        assert (adapter / "adapter_config.json").exists()
        (registered,) = store.policy_versions(name="planner")
        assert (registered.version, registered.path) == ("1", str(adapter))
        assert registered.metadata["optimizer_steps"] == 16
        await client.load_adapter("policy", str(adapter))
        policy = client.with_adapter("policy")
        assert await client.models() == ["tiny-lm", "policy"]

        # The highest- and lowest-reward completions of each group, scored by the server
        # (score_text over HTTP) without and with the adapter.
        best = best_members(groups)
        worst = [(g, min(g.members, key=lambda m: m.reward)) for g in groups]
        assert min(c.reward for _, c in best) > max(c.reward for _, c in worst)
        base_best = await mean_logprob(client, best)
        base_worst = await mean_logprob(client, worst)
        tuned_best = await mean_logprob(policy, best)
        tuned_worst = await mean_logprob(policy, worst)
        print(
            f"best {base_best:.3f} -> {tuned_best:.3f}, worst {base_worst:.3f} -> {tuned_worst:.3f}"
        )
        assert tuned_best - base_best > 0.25  # nats per token (measured: +0.38 to +0.58)
        assert tuned_worst - base_worst < -0.1  # (measured: -0.22 to -0.31)

        # One more round, on-policy: sampled from the served adapter, whose log-probs are the
        # trainer's own (ratio 1 before the update again), then replaced in place.
        round_ = await grpo_round(
            policy, store, trainer, PROMPTS, reward, tmp_path / "adapter-2",
            group_size=GROUP_SIZE, max_tokens=TOKENS, seed=1,
        )  # fmt: skip
        assert round_.result.metrics["first_max_abs_log_ratio"] < 1e-5
        assert [v.version for v in store.policy_versions(name="planner")] == ["1", "2"]
        await client.load_adapter("policy", str(round_.path), inplace=True)
    finally:
        torch.set_num_threads(threads)

    # Unloading restores the base model's log-probs.
    await client.unload_adapter("policy")
    assert await client.models() == ["tiny-lm"]
    assert await mean_logprob(client, best) == pytest.approx(base_best, abs=1e-6)
    await client.aclose()
    store.close()


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
async def test_a_stale_batch_is_checked_under_the_weights_that_sampled_it(
    text_lm_server, tiny_models: TinyModels, tmp_path: Path
):
    """An asynchronous loop trains on groups an older version sampled: the alignment check then
    runs under that version's weights (``sampled_with``: its adapter directory, or None for the
    base model), swapped in and out without touching the trainer's own."""
    from nodes.backends.clients.openai_client import OpenAIChatClient
    from storage.store import TrajectoryStore

    client = OpenAIChatClient(text_lm_server.url, model="tiny-lm")
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'stale.db'}")
    trainer = LoRATrainer(tiny_models.lm, LoRAConfig(lr=1e-2, epochs=2, minibatch_size=16))
    reward = target_fraction(word_tokens(trainer.engine.tokenizer), trainer.engine.stop_ids)

    async def sample(model: Any, seed: int) -> list:
        run_id = await collect(
            model, store, PROMPTS, group_size=GROUP_SIZE, max_tokens=TOKENS, seed=seed
        )
        score_run(store, run_id, reward)
        return read_groups(store, run_id)

    by_base, also_by_base = await sample(client, 0), await sample(client, 1)
    assert trainer.train(by_base).metrics["first_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    first = save_version(trainer, store, tmp_path / "adapter-1", {})
    # The trainer is at version 1 now: base samples are not its own.
    with pytest.raises(ValueError, match="recomputed log-prob"):
        trainer.train(also_by_base)
    stale = trainer.train(also_by_base, sampled_with=None)  # checked under the base model
    assert stale.metrics["first_max_abs_log_ratio"] > 1e-4  # π_θ differs from π_old: off-policy
    save_version(trainer, store, tmp_path / "adapter-2", {})

    await client.load_adapter("v1", str(first))
    by_first = await sample(client.with_adapter("v1"), 2)
    with pytest.raises(ValueError, match="recomputed log-prob"):
        trainer.train(by_first)  # sampled by version 1, the trainer is at 2
    own = [p.detach().clone() for p in trainer.parameters]
    with trainer.sampled_weights(first):
        swapped = [p.detach().clone() for p in trainer.parameters]
    assert any(not a.equal(b) for a, b in zip(swapped, own, strict=True))
    assert all(a.equal(b) for a, b in zip(trainer.parameters, own, strict=True))  # restored
    result = trainer.train(by_first, sampled_with=first)
    assert result.metrics["steps"] > 0
    with pytest.raises(ValueError, match="not an adapter of this trainer"):
        other = LoRATrainer(
            tiny_models.lm, LoRAConfig(target_modules=("q_proj",), epochs=1, minibatch_size=16)
        )
        with other.sampled_weights(first):
            pass
    store.close()
