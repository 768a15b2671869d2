"""The traced sampler's prompt-embedding cache."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_the_prompt_embedding_cache_is_bounded_in_bytes(monkeypatch):
    import nodes.backends.flow.sampler as sampler_module
    from nodes.backends.flow.sampler import Conditioning, FlowSampler

    encoded: list[str] = []

    class Encoder:
        def encode(self, prompt: str, negative_prompt: str) -> Conditioning:
            encoded.append(prompt)
            one = torch.zeros(1, 8, 4)  # 128 bytes; the three others as many
            return Conditioning(one, one.clone(), one.clone(), one.clone())

    monkeypatch.setattr(sampler_module, "CONDITIONING_CACHE_BYTES", 3 * 512)
    flow = FlowSampler(Encoder())  # type: ignore[arg-type]
    for prompt in ("a", "b", "c", "a", "d", "b"):
        flow.conditioning(prompt, "")
    # Room for 3 prompts: "a" stayed (used again), "b" was evicted by "d" and encoded again.
    assert encoded == ["a", "b", "c", "d", "b"]
    assert flow._cond_bytes <= 3 * 512 and len(flow._cond_cache) == 3
