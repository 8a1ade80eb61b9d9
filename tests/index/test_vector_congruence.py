"""FAISS (exact and HNSW) and Qdrant return the same top results for the same data.

The data is clustered like real embeddings: a Gaussian mixture on the unit
sphere in 384 dimensions, with queries drawn the same way but not from the
data. Exact backends must agree with a float64 brute-force search up to ties;
HNSW must reach recall@10 of at least 0.95.

Qdrant runs in local mode in memory: its search is the same as on disk, where
every point is committed to SQLite one by one (slow, and no part of ranking;
the contract suite covers Qdrant on disk).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from index.config import FaissConfig, QdrantConfig
from index.vectors import Hit, VectorIndex, open_vector_index
from index.vectors.base import IdArray, VectorArray

DIM = 384
N_VECTORS = 6000
N_QUERIES = 30
K = 10
# Scores closer than this are ties: float32 backends may order them either way.
TIE = 1e-4


def clustered(n: int, centres: VectorArray, rng: np.random.Generator) -> VectorArray:
    """Points near random centres, normalised: within-cluster cosine about 0.5."""
    picks = rng.integers(0, centres.shape[0], size=n)
    noise = rng.normal(scale=1.0 / np.sqrt(DIM), size=(n, DIM))
    points = centres[picks] + noise
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[IdArray, VectorArray, VectorArray]:
    rng = np.random.default_rng(2024)
    centres = rng.normal(size=(60, DIM))
    centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(
        np.float32
    )
    ids = np.arange(1, N_VECTORS + 1, dtype=np.int64) * 7
    return ids, clustered(N_VECTORS, centres, rng), clustered(N_QUERIES, centres, rng)


@pytest.fixture(scope="module")
def indexes(
    data: tuple[IdArray, VectorArray, VectorArray],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, VectorIndex]]:
    ids, vectors, _ = data
    location = tmp_path_factory.mktemp("congruence")
    opened = {
        "faiss-exact": open_vector_index(
            "faiss", location=location, name="exact", dim=DIM, faiss=FaissConfig()
        ),
        "faiss-hnsw": open_vector_index(
            "faiss",
            location=location,
            name="hnsw",
            dim=DIM,
            faiss=FaissConfig(exact_max_vectors=0),
        ),
        "qdrant-local": open_vector_index(
            "qdrant",
            location=None,
            name="qdrant",
            dim=DIM,
            qdrant=QdrantConfig(in_memory=True),
        ),
    }
    for index in opened.values():
        index.upsert(ids, vectors)
    yield opened
    for index in opened.values():
        index.close()


class Searches:
    """Search results per backend and filter, computed once.

    Qdrant local mode checks an id filter point by point: a broad one is slow.
    """

    def __init__(
        self,
        data: tuple[IdArray, VectorArray, VectorArray],
        indexes: dict[str, VectorIndex],
    ) -> None:
        self._data = data
        self._indexes = indexes
        self._done: dict[tuple[str, str], list[list[Hit]]] = {}

    def __call__(self, backend: str, filter_name: str) -> list[list[Hit]]:
        key = (backend, filter_name)
        if key not in self._done:
            ids, vectors, queries = self._data
            allowed = allowed_ids(ids, filter_name)
            if backend == "brute-force":
                self._done[key] = brute_force(ids, vectors, queries, allowed)
            else:
                index = self._indexes[backend]
                self._done[key] = index.search(queries, K, allowed_ids=allowed)
        return self._done[key]


@pytest.fixture(scope="module")
def searches(
    data: tuple[IdArray, VectorArray, VectorArray], indexes: dict[str, VectorIndex]
) -> Searches:
    return Searches(data, indexes)


def brute_force(
    ids: IdArray, vectors: VectorArray, queries: VectorArray, allowed: IdArray | None
) -> list[list[Hit]]:
    """The exact top ``K`` in float64."""
    keep = np.ones(ids.size, dtype=bool) if allowed is None else np.isin(ids, allowed)
    scores = queries.astype(np.float64) @ vectors[keep].astype(np.float64).T
    kept_ids = ids[keep]
    order = np.argsort(-scores, axis=1)[:, :K]
    return [
        [Hit(int(kept_ids[j]), float(scores[q, j])) for j in row]
        for q, row in enumerate(order)
    ]


def assert_same_up_to_ties(expected: list[Hit], got: list[Hit], what: str) -> None:
    """Same scores rank by rank; same ids except among hits tied with the last."""
    assert len(got) == len(expected), (
        f"{what}: {len(got)} hits, expected {len(expected)}"
    )
    np.testing.assert_allclose(
        [hit.score for hit in got],
        [hit.score for hit in expected],
        atol=TIE,
        err_msg=what,
    )
    boundary = expected[-1].score + TIE
    clear_expected = {hit.id for hit in expected if hit.score > boundary}
    clear_got = {hit.id for hit in got if hit.score > boundary}
    assert clear_got == clear_expected, f"{what}: top ids differ beyond ties"


FILTERS = {
    "unfiltered": None,
    # A tenth of the ids: few enough that HNSW searches them exactly.
    "narrow": slice(0, N_VECTORS, 10),
    # Five in six ids: HNSW walks its graph with a selector.
    "broad": slice(0, 5000),
}


def allowed_ids(ids: IdArray, name: str) -> IdArray | None:
    chosen = FILTERS[name]
    return None if chosen is None else ids[chosen]


@pytest.mark.parametrize("filter_name", FILTERS)
@pytest.mark.parametrize("backend", ["faiss-exact", "qdrant-local"])
def test_exact_backends_agree_with_brute_force_up_to_ties(
    searches: Searches, backend: str, filter_name: str
) -> None:
    expected = searches("brute-force", filter_name)
    got = searches(backend, filter_name)

    for q, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert_same_up_to_ties(want, have, f"{backend}, {filter_name}, query {q}")


@pytest.mark.parametrize("filter_name", FILTERS)
def test_faiss_and_qdrant_return_the_same_top_results(
    searches: Searches, filter_name: str
) -> None:
    faiss_hits = searches("faiss-exact", filter_name)
    qdrant_hits = searches("qdrant-local", filter_name)

    for q, (want, have) in enumerate(zip(faiss_hits, qdrant_hits, strict=True)):
        assert_same_up_to_ties(want, have, f"qdrant vs faiss, {filter_name}, query {q}")


@pytest.mark.parametrize("filter_name", FILTERS)
def test_hnsw_recall_at_10_is_at_least_095(
    data: tuple[IdArray, VectorArray, VectorArray], searches: Searches, filter_name: str
) -> None:
    ids, _, _ = data
    allowed = allowed_ids(ids, filter_name)

    expected = searches("brute-force", filter_name)
    got = searches("faiss-hnsw", filter_name)

    found = sum(
        len({h.id for h in want} & {h.id for h in have})
        for want, have in zip(expected, got, strict=True)
    )
    recall = found / (K * len(expected))
    assert recall >= 0.95, f"HNSW recall@10 with {filter_name} filter is {recall:.3f}"
    if allowed is not None:
        allowed_set = set(allowed.tolist())
        assert all(h.id in allowed_set for row in got for h in row)
