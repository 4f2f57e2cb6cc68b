"""D_large and D_ctrl: the examples quantization breaks most, and a seeded control set.

As in the paper: rank examples by their error averaged over methods; D_large is the top fraction,
de-duplicated greedily in rank order (an example whose n-gram Jaccard similarity to an already kept
one exceeds the threshold is dropped); D_ctrl is drawn at random (seeded) from the lowest-error
part, as many examples as D_large kept. N-grams are over token ids (the model's own segmentation,
start token excluded), so the rule reads the same for any language.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from qbreak.correlate import jaccard, method_errors
from qbreak.errors import QbreakError
from qbreak.io import SELECTION_SCHEMA


def ngrams(tokens: Sequence[int], n: int) -> set[tuple[int, ...]]:
    """The set of n-grams of a token sequence (the whole sequence when it is shorter than n)."""
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


@dataclass(frozen=True)
class Duplicate:
    """A candidate dropped because it resembles an already kept one."""

    index: int
    duplicate_of: int
    similarity: float


def dedup_greedy(
    texts: Sequence[Sequence[int]], n: int = 5, threshold: float = 0.1
) -> tuple[list[int], list[Duplicate]]:
    """Walk `texts` in order; keep one unless its n-gram Jaccard to a kept one exceeds `threshold`.

    Returns (indices kept, duplicates dropped with the most similar kept index).
    """
    kept: list[int] = []
    kept_grams: list[set[tuple[int, ...]]] = []
    dropped: list[Duplicate] = []
    for index, tokens in enumerate(texts):
        grams = ngrams(tokens, n)
        similarities = [jaccard(grams, other) for other in kept_grams]
        best = int(np.argmax(similarities)) if similarities else -1
        if similarities and similarities[best] > threshold:
            dropped.append(Duplicate(index, kept[best], float(similarities[best])))
        else:
            kept.append(index)
            kept_grams.append(grams)
    return kept, dropped


@dataclass(frozen=True)
class SelectionConfig:
    """The analysis.* keys that define D_large and D_ctrl."""

    methods: Sequence[str] | None = None
    top_fraction: float = 0.1
    n_large: int | None = None
    ctrl_pool_fraction: float = 0.5
    dedup_ngram: int = 5
    dedup_threshold: float = 0.1
    seed: int = 0


def mean_errors(errors: pa.Table, methods: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted example ids, error averaged over `methods` — all methods when None)."""
    ids, per_method = method_errors(errors)
    available = [m.method for m in per_method]
    chosen = list(methods) if methods else available
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise QbreakError(f"config key analysis.methods: '{unknown[0]}' is not a configured method {available}")
    return ids, np.mean([m.error for m in per_method if m.method in chosen], axis=0)


def select_examples(errors: pa.Table, examples: pa.Table, model: str, config: SelectionConfig) -> pa.Table:
    """Every example with its set (large / ctrl / duplicate / other), mean error and rank (SELECTION_SCHEMA)."""
    ids, score = mean_errors(errors, config.methods)
    n = len(ids)
    order = np.lexsort((ids, -score))  # rank 1 = largest mean error; ties by example id
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)

    tokens = dict(zip(examples.column("example_id").to_pylist(), examples.column("input_ids").to_pylist(), strict=True))
    missing = [i for i in ids.tolist() if i not in tokens]
    if missing:
        raise QbreakError(f"examples table has no example {missing[0]} of the errors table")
    candidates = order[: max(1, math.ceil(config.top_fraction * n))]
    kept, dropped = dedup_greedy(
        [tokens[int(ids[i])][1:] for i in candidates], config.dedup_ngram, config.dedup_threshold
    )
    large = [int(candidates[i]) for i in kept][: config.n_large]

    pool = order[n - max(1, math.floor(config.ctrl_pool_fraction * n)) :]
    pool = np.setdiff1d(pool, candidates)  # never a top example, even with pool fractions near 1
    if len(pool) < len(large):
        raise QbreakError(
            f"config key analysis.ctrl_pool_fraction: the bottom {len(pool)} examples cannot supply a D_ctrl "
            f"of {len(large)} (D_large's size)"
        )
    ctrl = np.random.default_rng(config.seed).choice(np.sort(pool), size=len(large), replace=False)

    sets = np.full(n, "other", dtype=object)
    sets[large] = "large"
    sets[ctrl] = "ctrl"
    duplicate_of: list[int | None] = [None] * n
    similarity: list[float | None] = [None] * n
    for dup in dropped:
        index = int(candidates[dup.index])
        sets[index] = "duplicate"
        duplicate_of[index] = int(ids[candidates[dup.duplicate_of]])
        similarity[index] = dup.similarity
    return pa.table(
        {
            "example_id": ids.astype(np.int32),
            "model": [model] * n,
            "set": sets.tolist(),
            "mean_error": score,
            "rank": rank.astype(np.int32),
            "duplicate_of": duplicate_of,
            "similarity": similarity,
        },
        schema=SELECTION_SCHEMA,
    )
