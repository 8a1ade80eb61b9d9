"""Reciprocal rank fusion and maximal marginal relevance: ranking arithmetic only."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["maximal_marginal_relevance", "reciprocal_rank_fusion"]

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
