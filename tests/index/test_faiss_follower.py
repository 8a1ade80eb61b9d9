"""Readers of a FAISS index that another process writes: read-only opens and followers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from index.config import FaissConfig
from index.vectors import FaissVectorIndex
from index.vectors.follower import FollowingIndex
from ingestion.errors import IndexBackendError

DIM = 8


def _vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _write(index: FaissVectorIndex, start: int, n: int, seed: int) -> np.ndarray:
    vectors = _vectors(n, seed)
    index.upsert(np.arange(start, start + n, dtype=np.int64), vectors)
    index.flush()
    return vectors


@pytest.fixture
def writer(tmp_path: Path):
    index = FaissVectorIndex(tmp_path / "docs-g1", dim=DIM)
    yield index
    index.close()


def test_a_reader_opens_beside_the_writer_and_sees_the_last_flush(writer, tmp_path):
    _write(writer, 1, 20, seed=1)
    writer.upsert(np.array([100], dtype=np.int64), _vectors(1, 9))  # not flushed

    reader = FaissVectorIndex(tmp_path / "docs-g1", dim=DIM, read_only=True)

    assert reader.count() == 20, "a reader must see committed vectors only"
    assert 100 not in set(reader.ids().tolist())
    reader.close()


def test_a_reader_refuses_writes(writer, tmp_path):
    reader = FaissVectorIndex(tmp_path / "docs-g1", dim=DIM, read_only=True)
    with pytest.raises(IndexBackendError, match="read-only"):
        reader.upsert(np.array([1], dtype=np.int64), _vectors(1, 2))
    with pytest.raises(IndexBackendError, match="read-only"):
        reader.delete([1])
    with pytest.raises(IndexBackendError, match="read-only"):
        reader.flush()


def test_a_reader_of_a_missing_folder_is_empty(tmp_path):
    reader = FaissVectorIndex(tmp_path / "nothing-g1", dim=DIM, read_only=True)
    assert reader.count() == 0
    assert not (tmp_path / "nothing-g1").exists(), "a reader must not create files"


def test_a_follower_picks_up_new_commits(writer, tmp_path):
    _write(writer, 1, 10, seed=1)
    follower = FollowingIndex(tmp_path / "docs-g1", dim=DIM, check_seconds=0)
    assert follower.count() == 10

    vectors = _write(writer, 11, 5, seed=2)
    writer.delete([1, 2])
    writer.flush()
    follower.search(vectors[:1], 1)  # a search notices the new version
    deadline = time.monotonic() + 10
    while follower.count() != 13 and time.monotonic() < deadline:
        time.sleep(0.01)

    assert follower.count() == 13, "the follower should load the newest commit"
    hits = follower.search(vectors[:1], 1)[0]
    assert hits[0].id == 11, hits


def test_a_follower_survives_compactions_and_hnsw_switch(tmp_path):
    writer = FaissVectorIndex(
        tmp_path / "docs-g1", dim=DIM, config=FaissConfig(exact_max_vectors=50)
    )
    follower = FollowingIndex(tmp_path / "docs-g1", dim=DIM, check_seconds=0)
    for round_ in range(6):
        _write(writer, 1, 40, seed=round_)  # rewrites every id: dead rows pile up
        _write(writer, 1000 + 40 * round_, 40, seed=100 + round_)
        assert follower.refresh(), "every flush is a new version"
        assert follower.count() == writer.count()
        assert sorted(follower.ids().tolist()) == sorted(writer.ids().tolist())
    writer.close()
