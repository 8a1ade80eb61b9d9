"""The contract every ``VectorIndex`` backend keeps (see ``index/vectors/base.py``).

One suite runs against every backend through the ``open_index`` fixture; the
tests at the end check what only FAISS promises (commit at flush, crash
safety, compaction, the switch to HNSW).
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from index.config import FaissConfig, QdrantConfig
from index.vectors import FaissVectorIndex, Hit, VectorIndex, open_vector_index
from index.vectors.base import IdArray, VectorArray
from ingestion.errors import ConfigError, IndexBackendError

DIM = 16
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Backend:
    """A backend under test and the guarantees it documents."""

    id: str
    kind: Literal["faiss", "qdrant"]
    faiss: FaissConfig | None = None
    qdrant: QdrantConfig | None = None
    persistent: bool = True
    durable_before_flush: bool = False


BACKENDS = [
    Backend("faiss-exact", "faiss", faiss=FaissConfig()),
    Backend("faiss-hnsw", "faiss", faiss=FaissConfig(exact_max_vectors=0)),
    Backend("qdrant-disk", "qdrant", qdrant=QdrantConfig(), durable_before_flush=True),
    Backend(
        "qdrant-memory", "qdrant", qdrant=QdrantConfig(in_memory=True), persistent=False
    ),
]


class Opener:
    """Opens indexes of one backend under one folder, and closes them all at the end."""

    def __init__(self, backend: Backend, location: Path) -> None:
        self.backend = backend
        self.location = location
        self._opened: list[VectorIndex] = []

    def __call__(self, dim: int = DIM, name: str = "docs-g1") -> VectorIndex:
        index = open_vector_index(
            self.backend.kind,
            location=self.location,
            name=name,
            dim=dim,
            faiss=self.backend.faiss,
            qdrant=self.backend.qdrant,
        )
        self._opened.append(index)
        return index

    def close_all(self) -> None:
        for index in self._opened:
            index.close()


@pytest.fixture(params=BACKENDS, ids=lambda backend: backend.id)
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param


@pytest.fixture
def open_index(backend: Backend, tmp_path: Path) -> Iterator[Opener]:
    opener = Opener(backend, tmp_path)
    yield opener
    opener.close_all()


@pytest.fixture(
    params=[b for b in BACKENDS if b.persistent], ids=lambda backend: backend.id
)
def stored_backend(request: pytest.FixtureRequest) -> Backend:
    """The backends whose indexes outlive their client."""
    return request.param


@pytest.fixture
def open_stored(stored_backend: Backend, tmp_path: Path) -> Iterator[Opener]:
    opener = Opener(stored_backend, tmp_path)
    yield opener
    opener.close_all()


def unit_vectors(n: int, seed: int, dim: int = DIM) -> VectorArray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def id_range(start: int, stop: int) -> IdArray:
    return np.arange(start, stop, dtype=np.int64)


def hit_ids(hits: list[Hit]) -> list[int]:
    return [hit.id for hit in hits]


def filled(
    opener: Opener, n: int = 200, seed: int = 0
) -> tuple[VectorIndex, VectorArray]:
    index = opener()
    vectors = unit_vectors(n, seed)
    index.upsert(id_range(1, n + 1), vectors)
    return index, vectors


# -- the shared contract ----------------------------------------------------------


def test_an_upserted_vector_is_its_own_nearest_neighbour(open_index: Opener) -> None:
    index, vectors = filled(open_index)

    hits = index.search(vectors[41], k=5)[0]

    assert hits[0].id == 42, hits
    assert hits[0].score == pytest.approx(1.0, abs=1e-5), hits
    assert [hit.score for hit in hits] == sorted((h.score for h in hits), reverse=True)


def test_scores_are_cosine_similarities(open_index: Opener) -> None:
    index = open_index(dim=2)
    index.upsert(id_range(1, 3), np.array([[1, 0], [0.6, 0.8]], dtype=np.float32))

    hits = index.search(np.array([[1, 0]], dtype=np.float32), k=2)[0]

    assert hit_ids(hits) == [1, 2], hits
    assert [hit.score for hit in hits] == pytest.approx([1.0, 0.6], abs=1e-5), hits


def test_upsert_of_an_existing_id_replaces_its_vector(open_index: Opener) -> None:
    index, vectors = filled(open_index)
    replacement = unit_vectors(1, seed=99)

    index.upsert(np.array([7]), replacement)

    assert index.count() == 200
    assert index.search(replacement, k=1)[0][0].id == 7
    old_hits = index.search(vectors[6], k=3)[0]
    assert all(h.id != 7 or h.score < 0.99 for h in old_hits), old_hits


def test_duplicate_ids_in_one_batch_keep_the_last_vector(open_index: Opener) -> None:
    index = open_index()
    vectors = unit_vectors(2, seed=3)

    index.upsert(np.array([5, 5]), vectors)

    assert index.count() == 1
    assert index.search(vectors[1], k=1)[0][0].score == pytest.approx(1.0, abs=1e-5)


def test_a_deleted_id_is_absent(open_index: Opener) -> None:
    index, vectors = filled(open_index)

    index.delete(np.array([42, 43]))

    assert index.count() == 198
    assert 42 not in hit_ids(index.search(vectors[41], k=10)[0])
    assert not {42, 43} & set(index.ids().tolist())


def test_deleting_a_missing_id_is_not_an_error(open_index: Opener) -> None:
    index, _ = filled(open_index, n=10)

    index.delete([1000, 2000])
    index.delete([])

    assert index.count() == 10


def test_allowed_ids_restrict_results_and_still_return_k(open_index: Opener) -> None:
    index, vectors = filled(open_index, n=500)
    allowed = id_range(300, 340)

    hits = index.search(vectors[:3], k=10, allowed_ids=allowed)

    for row in hits:
        assert len(row) == 10, row
        assert set(hit_ids(row)) <= set(allowed.tolist()), row


def test_allowed_ids_with_fewer_than_k_present_return_those(open_index: Opener) -> None:
    index, vectors = filled(open_index, n=50)

    hits = index.search(vectors[0], k=10, allowed_ids=np.array([3, 4, 999]))[0]

    assert sorted(hit_ids(hits)) == [3, 4], hits


def test_a_deleted_id_is_not_returned_even_when_allowed(open_index: Opener) -> None:
    index, vectors = filled(open_index, n=50)
    index.delete([3])

    hits = index.search(vectors[2], k=5, allowed_ids=np.array([3, 4]))[0]

    assert hit_ids(hits) == [4], hits


def test_searching_an_empty_index_returns_empty_lists(open_index: Opener) -> None:
    index = open_index()
    queries = unit_vectors(3, seed=1)

    assert index.search(queries, k=5) == [[], [], []]
    assert index.search(queries, k=5, allowed_ids=np.array([1, 2])) == [[], [], []]


def test_an_empty_allowed_list_returns_empty_lists(open_index: Opener) -> None:
    index, vectors = filled(open_index, n=10)

    assert index.search(vectors[:2], k=3, allowed_ids=np.array([], dtype=np.int64)) == [
        [],
        [],
    ]


def test_several_queries_are_answered_at_once(open_index: Opener) -> None:
    index, vectors = filled(open_index)

    hits = index.search(vectors[[10, 20, 30]], k=4)

    assert [row[0].id for row in hits] == [11, 21, 31], hits
    assert all(len(row) == 4 for row in hits), hits


def test_k_larger_than_the_index_returns_every_vector(open_index: Opener) -> None:
    index, vectors = filled(open_index, n=5)

    hits = index.search(vectors[0], k=50)[0]

    assert sorted(hit_ids(hits)) == [1, 2, 3, 4, 5], hits


def test_ids_lists_exactly_the_live_ids(open_index: Opener) -> None:
    index, _ = filled(open_index, n=30)
    index.delete([2, 4, 6])
    index.upsert(np.array([4, 100]), unit_vectors(2, seed=5))

    expected = (set(range(1, 31)) - {2, 6}) | {100}
    ids = index.ids()

    assert ids.dtype == np.int64
    assert sorted(ids.tolist()) == sorted(expected)
    assert index.count() == len(expected)


def test_flushed_state_survives_close_and_reopen(
    open_stored: Opener, stored_backend: Backend
) -> None:
    index, vectors = filled(open_stored)
    index.delete([1])
    index.upsert(np.array([2]), unit_vectors(1, seed=7))
    index.flush()
    index.close()

    reopened = open_stored()

    assert reopened.count() == 199
    assert sorted(reopened.ids().tolist()) == list(range(2, 201))
    assert reopened.search(vectors[100], k=1)[0][0].id == 101
    assert reopened.search(unit_vectors(1, seed=7), k=1)[0][0].id == 2


def test_writes_after_the_last_flush_follow_the_documented_durability(
    open_stored: Opener, stored_backend: Backend
) -> None:
    """FAISS forgets unflushed writes; Qdrant local keeps every returned write."""
    index, _ = filled(open_stored, n=20)
    index.flush()
    index.upsert(id_range(21, 31), unit_vectors(10, seed=8))
    index.delete([1])
    index.close()

    reopened = open_stored()

    if stored_backend.durable_before_flush:
        assert sorted(reopened.ids().tolist()) == list(range(2, 31))
    else:
        assert sorted(reopened.ids().tolist()) == list(range(1, 21))


def test_reopening_with_another_dimension_is_refused(
    open_stored: Opener, stored_backend: Backend
) -> None:
    index, _ = filled(open_stored, n=5)
    index.flush()
    index.close()

    with pytest.raises(IndexBackendError, match="dimension 16, not 32"):
        open_stored(dim=32)


def test_vectors_or_queries_of_another_dimension_are_refused(
    open_index: Opener,
) -> None:
    index, _ = filled(open_index, n=5)

    with pytest.raises(IndexBackendError, match="dimension"):
        index.upsert(np.array([9]), unit_vectors(1, seed=0, dim=DIM + 1))
    with pytest.raises(IndexBackendError, match="dimension"):
        index.search(unit_vectors(1, seed=0, dim=DIM - 1), k=1)


def test_ids_that_are_not_positive_are_refused(open_index: Opener) -> None:
    index = open_index()

    with pytest.raises(IndexBackendError, match="positive"):
        index.upsert(np.array([0]), unit_vectors(1, seed=0))


def test_a_closed_index_refuses_work(open_index: Opener) -> None:
    index, vectors = filled(open_index, n=5)
    index.close()
    index.close()

    with pytest.raises(IndexBackendError, match="closed"):
        index.search(vectors[0], k=1)


def test_drop_removes_the_index(open_index: Opener, backend: Backend) -> None:
    index, _ = filled(open_index, n=5)
    index.flush()

    index.drop()

    assert not (open_index.location / "docs-g1").exists()
    if backend.persistent:
        assert open_index().count() == 0


def test_the_factory_refuses_bad_names_and_kinds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="name"):
        open_vector_index("faiss", location=tmp_path, name="../escape", dim=4)
    with pytest.raises(ConfigError, match="location"):
        open_vector_index("faiss", location=None, name="docs-g1", dim=4)
    with pytest.raises(ConfigError, match="kind"):
        open_vector_index("annoy", location=tmp_path, name="docs-g1", dim=4)  # type: ignore[arg-type]


# -- FAISS only ---------------------------------------------------------------------


def open_faiss(folder: Path, **config: int) -> FaissVectorIndex:
    return FaissVectorIndex(folder, dim=DIM, config=FaissConfig(**config))


def data_files(folder: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(prefix))


def test_faiss_switches_to_hnsw_as_it_grows_and_reopens_so(tmp_path: Path) -> None:
    index = open_faiss(tmp_path / "g", exact_max_vectors=50)
    vectors = unit_vectors(80, seed=2)
    index.upsert(id_range(1, 41), vectors[:40])
    assert index.mode == "exact"

    index.upsert(id_range(41, 81), vectors[40:])
    assert index.mode == "hnsw"
    index.flush()
    index.close()
    reopened = open_faiss(tmp_path / "g", exact_max_vectors=50)

    assert reopened.mode == "hnsw"
    assert reopened.search(vectors[60], k=1)[0][0].id == 61
    assert data_files(tmp_path / "g", "graph-"), "the graph was not written at flush"
    reopened.close()


def test_faiss_compacts_once_a_fifth_of_rows_are_dead(tmp_path: Path) -> None:
    index = open_faiss(tmp_path / "g", exact_max_vectors=0)
    vectors = unit_vectors(100, seed=4)
    index.upsert(id_range(1, 101), vectors)
    index.flush()
    index.delete(id_range(1, 51))

    index.flush()

    folder = tmp_path / "g"
    assert data_files(folder, "dead-") == [], "a compacted index has no dead rows"
    assert len(data_files(folder, "seg-")) == 1
    index.close()
    reopened = open_faiss(folder, exact_max_vectors=0)
    assert sorted(reopened.ids().tolist()) == list(range(51, 101))
    assert reopened.search(vectors[70], k=1)[0][0].id == 71
    reopened.close()


def test_faiss_merges_segments_so_many_flushes_leave_few_files(tmp_path: Path) -> None:
    folder = tmp_path / "g"
    index = open_faiss(folder)
    vectors = unit_vectors(2000, seed=6)
    for start in range(0, 2000, 10):
        index.upsert(id_range(start + 1, start + 11), vectors[start : start + 10])
        index.flush()
    index.close()

    segments = data_files(folder, "seg-")
    reopened = open_faiss(folder)

    assert len(segments) < 2 * 8, segments
    assert reopened.count() == 2000
    assert reopened.search(vectors[1234], k=1)[0][0].id == 1235
    reopened.close()


def test_faiss_keeps_few_files_when_small_and_large_flushes_alternate(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "g"
    index = open_faiss(folder)
    vectors = unit_vectors(4 * (7 * 10 + 5000), seed=11)
    sizes = ([10] * 7 + [5000]) * 4
    start = 0
    for size in sizes:
        index.upsert(
            id_range(start + 1, start + size + 1), vectors[start : start + size]
        )
        index.flush()
        start += size
    index.close()

    segments = data_files(folder, "seg-")
    reopened = open_faiss(folder)

    assert len(segments) <= 8, segments
    assert reopened.count() == start
    assert reopened.search(vectors[12_345], k=1)[0][0].id == 12_346
    reopened.close()


def test_faiss_rebuilds_a_missing_graph_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "g"
    index = open_faiss(folder, exact_max_vectors=0)
    vectors = unit_vectors(100, seed=9)
    index.upsert(id_range(1, 101), vectors)
    index.flush()
    index.close()
    for name in data_files(folder, "graph-"):
        (folder / name).unlink()

    with caplog.at_level(logging.WARNING, logger="index.vectors.faiss"):
        reopened = open_faiss(folder, exact_max_vectors=0)

    assert "rebuilt" in caplog.text
    assert reopened.search(vectors[5], k=1)[0][0].id == 6
    reopened.close()


def test_faiss_hnsw_filters_return_k_for_broad_and_narrow_filters(
    tmp_path: Path,
) -> None:
    index = open_faiss(tmp_path / "g", exact_max_vectors=0)
    vectors = unit_vectors(6000, seed=10)
    index.upsert(id_range(1, 6001), vectors)
    index.delete(id_range(1, 200))
    # 5000 allowed ids is more than the exact-filter floor: the graph is walked
    # with a selector. 30 allowed ids is searched exactly over those vectors.
    broad, narrow = id_range(1, 5001), id_range(3000, 3030)

    for allowed in (broad, narrow):
        hits = index.search(vectors[:20], k=10, allowed_ids=allowed)
        allowed_live = set(allowed.tolist()) - set(range(1, 200))
        for row in hits:
            assert len(row) == 10, row
            assert set(hit_ids(row)) <= allowed_live, row
    index.close()


def test_a_second_open_of_one_faiss_index_is_refused(tmp_path: Path) -> None:
    index = open_faiss(tmp_path / "g")

    with pytest.raises(IndexBackendError, match="already open"):
        open_faiss(tmp_path / "g")
    index.close()


# -- crash safety ---------------------------------------------------------------------

CRASH_DIM = 8
CRASH_CONFIG = {"exact_max_vectors": 200}
CRASH_RUNS = 30
CRASH_STEPS_PER_RUN = 40

CRASH_WRITER = """
import sys, time
from pathlib import Path
from index.config import FaissConfig
from index.vectors.faiss import FaissVectorIndex
from tests.index.test_vector_contract import CRASH_CONFIG, CRASH_DIM, crash_step

folder, start, stop = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
index = FaissVectorIndex(folder, dim=CRASH_DIM, config=FaissConfig(**CRASH_CONFIG))
print("open", flush=True)
for step in range(start, stop):
    upsert_ids, vectors, delete_ids = crash_step(step)
    index.upsert(upsert_ids, vectors)
    index.delete(delete_ids)
    index.flush()
    print(step, flush=True)
time.sleep(60)
"""


def crash_step(step: int) -> tuple[IdArray, VectorArray, IdArray]:
    """The writes of one step of the crash writer: 30 new ids, 10 replaced, 5 deleted."""
    rng = np.random.default_rng(step)
    new = id_range(30 * (step - 1) + 1, 30 * step + 1)
    earlier = id_range(1, 30 * (step - 1) + 1)
    replaced = rng.choice(earlier, size=min(10, earlier.size), replace=False)
    deleted = rng.choice(earlier, size=min(5, earlier.size), replace=False)
    upsert_ids = np.concatenate([new, replaced])
    return upsert_ids, unit_vectors(upsert_ids.size, seed=step, dim=CRASH_DIM), deleted


class CrashModel:
    """The expected contents after each step, computed like the writer does."""

    def __init__(self) -> None:
        self.step = 0
        self.vectors: dict[int, VectorArray] = {}

    def advanced(self) -> CrashModel:
        model = CrashModel()
        model.step, model.vectors = self.step + 1, dict(self.vectors)
        upsert_ids, vectors, delete_ids = crash_step(model.step)
        model.vectors.update(zip(upsert_ids.tolist(), vectors, strict=True))
        for id_ in delete_ids.tolist():
            model.vectors.pop(id_, None)
        return model


def matches(index: FaissVectorIndex, model: CrashModel, rng: random.Random) -> bool:
    """Whether the index holds exactly the model's ids, with the model's vectors."""
    if sorted(index.ids().tolist()) != sorted(model.vectors):
        return False
    sample = rng.sample(sorted(model.vectors), min(40, len(model.vectors)))
    for id_ in sample:
        hits = index.search(model.vectors[id_], k=1, allowed_ids=np.array([id_]))[0]
        if hits[0].score < 0.9999:
            return False
    return True


def run_writer_until_killed(folder: Path, start: int, rng: random.Random) -> int:
    """Run the writer from ``start``, SIGKILL it at a random moment; last step it reported.

    The moment is drawn once the writer has opened the index, so that kills
    land among its writes and flushes rather than in interpreter start-up.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stop = str(start + CRASH_STEPS_PER_RUN)
    command = [sys.executable, "-c", CRASH_WRITER, str(folder), str(start), stop]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO
    ) as writer:
        assert writer.stdout is not None
        first = writer.stdout.readline()
        try:
            writer.wait(timeout=rng.uniform(0.0, 0.4))
        except subprocess.TimeoutExpired:
            writer.kill()
        out, err = writer.communicate()
    assert first == b"open\n", f"the writer failed to open the index: {err.decode()}"
    assert writer.returncode == -9, f"the writer ended by itself: {err.decode()}"
    reported = [int(line) for line in out.decode().split()]
    return reported[-1] if reported else start - 1


@pytest.mark.slow
def test_faiss_reopens_in_a_flushed_state_after_sigkill_at_random_moments(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "crash"
    rng = random.Random(1234)
    model = CrashModel()
    steps_seen = []

    for _ in range(CRASH_RUNS):
        reported = run_writer_until_killed(folder, model.step + 1, rng)
        while model.step < reported:
            model = model.advanced()
        index = FaissVectorIndex(
            folder, dim=CRASH_DIM, config=FaissConfig(**CRASH_CONFIG)
        )
        try:
            if not matches(index, model, rng):
                model = model.advanced()
                assert matches(index, model, rng), (
                    f"after a kill at step {reported}, the index matches neither "
                    f"the state after step {reported} nor after step {reported + 1}"
                )
        finally:
            index.close()
        steps_seen.append(model.step)

    assert steps_seen[-1] > CRASH_RUNS, (
        f"the writer made too little progress: {steps_seen}"
    )
