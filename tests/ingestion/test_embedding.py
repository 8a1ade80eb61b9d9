"""The sentence-transformers embedder with the packaged model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from ingestion.config import EmbedderConfig
from ingestion.embedding import CachedEmbedder, SentenceTransformerEmbedder
from ingestion.errors import EmbeddingError


def test_vectors_are_normalised_float32_of_the_model_dimension(real_embedder) -> None:
    vectors = real_embedder.embed(["The on-call rotation lasts one week.", "Per diem"])

    assert vectors.shape == (2, 384)
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_similar_texts_score_higher_than_unrelated_ones(real_embedder) -> None:
    query, close, far = real_embedder.embed(
        [
            "how long is a shift",
            "A rotation lasts one week",
            "Chemicals go in the cabinet",
        ]
    )
    assert query @ close > query @ far


def test_token_counts_exclude_special_tokens(real_embedder) -> None:
    assert real_embedder.count_tokens(["hello world", ""]) == [2, 0]


def test_counting_while_encoding_in_another_thread_is_safe(real_embedder) -> None:
    texts = [f"sentence number {i} " * (1 + i % 40) for i in range(256)]
    errors: list[BaseException] = []

    def count() -> None:
        try:
            for _ in range(20):
                real_embedder.count_tokens(texts)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    counter = threading.Thread(target=count)
    counter.start()
    for _ in range(3):
        real_embedder.embed(texts)
    counter.join()

    assert errors == []


def test_a_model_that_is_not_on_disk_is_never_downloaded(tmp_path) -> None:
    with pytest.raises(EmbeddingError, match="never downloaded"):
        SentenceTransformerEmbedder(EmbedderConfig(model=str(tmp_path / "nothing")))


class _DictCache:
    def __init__(self) -> None:
        self.store: dict[tuple[str, str], np.ndarray] = {}

    def get_embeddings(self, model_id, hashes):
        return {
            h: self.store[(model_id, h)] for h in hashes if (model_id, h) in self.store
        }

    def put_embeddings(self, model_id, vectors):
        for h, v in vectors.items():
            self.store[(model_id, h)] = v


def test_the_cache_skips_texts_embedded_before(real_embedder) -> None:
    cached = CachedEmbedder(real_embedder, _DictCache())
    first = cached.embed(["alpha", "beta", "alpha"])

    second = cached.embed(["beta", "gamma"])

    assert (cached.computed, cached.reused) == (3, 2), (
        "a text is computed once, then reused"
    )
    assert np.array_equal(first[1], second[0])
