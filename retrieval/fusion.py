"""Fusion of ranked lists and maximal marginal relevance: ranking arithmetic only.

Two fusions are offered. Reciprocal rank fusion uses ranks alone, so it needs
no care about what the scores of each list mean. A convex combination of
scores rescaled to [0, 1] keeps how far apart the candidates of each list
are: a dense hit far ahead of the rest stays far ahead.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["convex_fusion", "maximal_marginal_relevance", "reciprocal_rank_fusion"]

K = TypeVar("K", bound=Hashable)


def reciprocal_rank_fusion(
    rankings: Mapping[str, Sequence[K]],
    weights: Mapping[str, float],
    rrf_k: int = 60,
) -> list[tuple[K, float]]:
    """Fuse ranked lists: each item scores ``sum(weight / (rrf_k + rank))``.

    Ranks start at 1. Ties keep the order of first appearance, so fusing one
    list with itself changes nothing. Returns ``(item, score)`` best first.
    """
    scores: dict[K, float] = {}
    for name, ranking in rankings.items():
        weight = weights.get(name, 1.0)
        if weight <= 0:
            continue
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + weight / (rrf_k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])


def convex_fusion(
    scored: Mapping[str, Sequence[tuple[K, float]]],
    weights: Mapping[str, float],
) -> list[tuple[K, float]]:
    """Fuse scored lists by a weighted sum of min-max rescaled scores.

    Within each list the best score becomes 1 and the worst 0 (a list whose
    scores are all equal scores 1 throughout); an item missing from a list
    gets 0 from it. Scores are divided by the sum of the weights, so they lie
    in [0, 1]. Ties keep the order of first appearance. Returns
    ``(item, score)`` best first.
    """
    total = sum(max(weights.get(name, 1.0), 0.0) for name in scored)
    scores: dict[K, float] = {}
    for name, ranking in scored.items():
        weight = weights.get(name, 1.0)
        if weight <= 0 or not ranking:
            continue
        values = [score for _, score in ranking]
        low, high = min(values), max(values)
        span = high - low
        for item, score in ranking:
            scaled = (score - low) / span if span > 0 else 1.0
            scores[item] = scores.get(item, 0.0) + weight * scaled / (total or 1.0)
    return sorted(scores.items(), key=lambda pair: -pair[1])


def maximal_marginal_relevance(
    query: npt.NDArray[np.float32],
    candidates: npt.NDArray[np.float32],
    k: int,
    lambda_: float,
) -> list[int]:
    """Pick ``k`` candidate rows that are relevant to the query but unlike each other.

    Vectors are L2-normalised rows. Each step takes the row maximising
    ``lambda * sim(query, row) - (1 - lambda) * max sim(row, picked)``;
    ``lambda_ = 1`` keeps plain relevance order. Returns row indexes in pick order.
    """
    n = candidates.shape[0]
    if n == 0 or k <= 0:
        return []
    relevance = candidates @ query
    picked: list[int] = [int(np.argmax(relevance))]
    redundancy = candidates @ candidates[picked[0]]
    available = np.ones(n, dtype=bool)
    available[picked[0]] = False
    while len(picked) < min(k, n):
        gain = lambda_ * relevance - (1 - lambda_) * redundancy
        gain[~available] = -np.inf
        best = int(np.argmax(gain))
        picked.append(best)
        available[best] = False
        redundancy = np.maximum(redundancy, candidates @ candidates[best])
    return picked
