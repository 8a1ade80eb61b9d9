"""The catalog's contract, run on SQLite and on the PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from index.catalog import Catalog, DocumentRecord
from ingestion.errors import CatalogError, GenerationError, NotFound
from ingestion.models import Chunk, make_chunk_id, vector_id


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    catalog = Catalog(catalog_url)
    yield catalog
    catalog.close()


def _chunks(doc_id: str, content_hash: str, n: int) -> list[Chunk]:
    return [
        Chunk(
            make_chunk_id(doc_id, content_hash, i),
            doc_id,
            i,
            f"text {i}",
            i * 10,
            i * 10 + 6,
        )
        for i in range(n)
    ]


def _record(doc_id: str, content_hash: str, chunk_count: int) -> DocumentRecord:
    return DocumentRecord(
        doc_id=doc_id,
        source="s",
        key=doc_id.split(":", 1)[1],
        uri=f"file:///{doc_id}",
        title="T",
        content_hash=content_hash,
        version="v1",
        modified_at=None,
        access_labels=("staff",),
        metadata={"lang": "en"},
        chunk_count=chunk_count,
    )


def _write(
    catalog: Catalog, gen_id: int, doc_id: str, content_hash: str, n: int
) -> list[int]:
    chunks = _chunks(doc_id, content_hash, n)
    catalog.stage_chunks(gen_id, chunks)
    retired = catalog.commit_documents(
        gen_id,
        [_record(doc_id, content_hash, n)],
        {doc_id: [c.chunk_id for c in chunks]},
    )
    catalog.purge_chunks(gen_id, retired, "deleting")
    return retired


def test_first_promotion_makes_the_generation_live(catalog: Catalog) -> None:
    generation = catalog.create_generation("docs", "fp1", {"m": 1}, "faiss")
    catalog.set_generation_state(generation.id, "ready")

    previous = catalog.promote("docs", generation.id)

    assert previous is None
    live = catalog.live_generation("docs")
    assert live is not None and live.id == generation.id, live
    assert live.state == "live"
    assert catalog.aliases() == {"docs": generation.id}


def test_promote_retires_the_old_generation_and_rollback_restores_it(
    catalog: Catalog,
) -> None:
    first = catalog.create_generation("docs", "fp1", {}, "faiss", state="ready")
    catalog.promote("docs", first.id)
    second = catalog.create_generation("docs", "fp2", {}, "faiss", state="ready")

    previous = catalog.promote("docs", second.id)
    assert previous is not None and previous.id == first.id
    assert catalog.generation(first.id).state == "retired"

    old, now = catalog.rollback("docs")
    assert (old.id, now.id) == (second.id, first.id)
    assert catalog.live_generation("docs").id == first.id  # type: ignore[union-attr]
    assert catalog.generation(second.id).state == "rolled_back"


def test_a_generation_still_building_cannot_be_promoted(catalog: Catalog) -> None:
    generation = catalog.create_generation("docs", "fp1", {}, "faiss")
    with pytest.raises(GenerationError, match="not ready"):
        catalog.promote("docs", generation.id)


def test_rollback_without_a_previous_generation_is_refused(catalog: Catalog) -> None:
    generation = catalog.create_generation("docs", "fp1", {}, "faiss", state="ready")
    catalog.promote("docs", generation.id)
    with pytest.raises(GenerationError, match="no previous generation"):
        catalog.rollback("docs")


def test_promoting_a_generation_of_another_collection_is_refused(
    catalog: Catalog,
) -> None:
    generation = catalog.create_generation("other", "fp1", {}, "faiss", state="ready")
    with pytest.raises(NotFound):
        catalog.promote("docs", generation.id)


def test_staged_chunks_stay_hidden_until_committed(catalog: Catalog) -> None:
    gen = catalog.create_generation("docs", "fp", {}, "faiss")
    chunks = _chunks("s:a", "h1", 3)
    ids = [vector_id(c.chunk_id) for c in chunks]

    catalog.stage_chunks(gen.id, chunks)
    assert catalog.live_chunks(gen.id, ids) == {}, "pending chunks must not be served"
    pending, deleting = catalog.interrupted_writes(gen.id)
    assert (sorted(pending), deleting) == (sorted(ids), [])

    catalog.commit_documents(
        gen.id, [_record("s:a", "h1", 3)], {"s:a": [c.chunk_id for c in chunks]}
    )
    live = catalog.live_chunks(gen.id, ids)
    assert sorted(live) == sorted(ids)
    assert live[ids[0]].access_labels == ("staff",)
    assert catalog.interrupted_writes(gen.id) == ([], [])
    assert catalog.integrity_problems(gen.id) == []


def test_a_changed_document_retires_its_old_chunks(catalog: Catalog) -> None:
    gen = catalog.create_generation("docs", "fp", {}, "faiss")
    _write(catalog, gen.id, "s:a", "h1", 3)
    old_ids = catalog.all_vector_ids(gen.id)

    new = _chunks("s:a", "h2", 2)
    catalog.stage_chunks(gen.id, new)
    retired = catalog.commit_documents(
        gen.id, [_record("s:a", "h2", 2)], {"s:a": [c.chunk_id for c in new]}
    )

    assert sorted(retired) == sorted(old_ids.tolist())
    pending, deleting = catalog.interrupted_writes(gen.id)
    assert (pending, sorted(deleting)) == ([], sorted(retired))
    catalog.purge_chunks(gen.id, retired, "deleting")
    assert sorted(catalog.all_vector_ids(gen.id).tolist()) == sorted(
        vector_id(c.chunk_id) for c in new
    )
    assert catalog.document_states(gen.id, "s")["s:a"].content_hash == "h2"
    assert catalog.integrity_problems(gen.id) == []


def test_deleting_a_document_hides_it_at_once(catalog: Catalog) -> None:
    gen = catalog.create_generation("docs", "fp", {}, "faiss")
    _write(catalog, gen.id, "s:a", "h1", 2)
    _write(catalog, gen.id, "s:b", "h1", 2)

    retired = catalog.begin_delete_documents(gen.id, ["s:a"])

    assert len(retired) == 2
    assert catalog.live_chunks(gen.id, retired) == {}
    assert set(catalog.document_states(gen.id, "s")) == {"s:b"}
    catalog.purge_chunks(gen.id, retired, "deleting")
    assert catalog.integrity_problems(gen.id) == []


def test_a_failure_keeps_the_last_good_version(catalog: Catalog) -> None:
    gen = catalog.create_generation("docs", "fp", {}, "faiss")
    _write(catalog, gen.id, "s:a", "h1", 2)

    catalog.record_failure(
        gen.id,
        doc_id="s:a",
        source="s",
        key="a",
        uri="u",
        error="broken",
        error_hash="h9",
    )
    catalog.record_failure(
        gen.id,
        doc_id="s:new",
        source="s",
        key="new",
        uri="u2",
        error="binary",
        error_hash="h3",
    )

    states = catalog.document_states(gen.id, "s")
    assert states["s:a"].status == "indexed" and states["s:a"].content_hash == "h1"
    assert states["s:a"].error_hash == "h9"
    assert states["s:new"].status == "failed"
    assert len(catalog.all_vector_ids(gen.id)) == 2
    assert catalog.failed_documents(gen.id, "s") == [
        ("s:a", "broken"),
        ("s:new", "binary"),
    ]


def test_integrity_problems_name_a_chunk_count_mismatch(catalog: Catalog) -> None:
    gen = catalog.create_generation("docs", "fp", {}, "faiss")
    chunks = _chunks("s:a", "h1", 3)
    catalog.stage_chunks(gen.id, chunks)
    catalog.commit_documents(
        gen.id, [_record("s:a", "h1", 5)], {"s:a": [c.chunk_id for c in chunks]}
    )

    problems = catalog.integrity_problems(gen.id)

    assert any("should have 5 live chunks but has 3" in p for p in problems), problems


def test_embeddings_are_cached_per_model(catalog: Catalog) -> None:
    vector = np.arange(4, dtype=np.float32)
    catalog.put_embeddings("m1", {"h": vector})
    catalog.put_embeddings("m1", {"h": vector})  # a second put is harmless

    assert np.array_equal(catalog.get_embeddings("m1", ["h", "x"])["h"], vector)
    assert catalog.get_embeddings("m2", ["h"]) == {}


def test_source_status_reports_the_last_successful_sync(catalog: Catalog) -> None:
    gen = catalog.create_generation("docs", "fp", {}, "faiss", state="ready")
    catalog.promote("docs", gen.id)
    catalog.register_source("s", "docs", "files", "cfg")
    _write(catalog, gen.id, "s:a", "h1", 1)
    run = catalog.start_run("s", gen.id, full=False)
    catalog.finish_run(run, status="ok", counts={"seen": 1, "added": 1})
    failed_run = catalog.start_run("s", gen.id, full=False)
    catalog.finish_run(failed_run, status="failed", counts={"seen": 0}, error="gone")

    [status] = catalog.source_status(catalog.aliases())

    assert status.documents == 1
    assert status.last_success_at is not None
    assert status.last_run is not None and status.last_run.status == "failed"
    assert status.last_run.error == "gone"


def test_a_run_left_running_by_a_dead_process_is_marked_interrupted(
    catalog: Catalog,
) -> None:
    gen = catalog.create_generation("docs", "fp", {}, "faiss")
    catalog.register_source("s", "docs", "files", "cfg")
    first = catalog.start_run("s", gen.id, full=False)
    catalog.start_run("s", gen.id, full=False)

    with catalog.engine.connect() as conn:
        from index.catalog import sync_runs

        status = (
            conn.execute(sync_runs.select().where(sync_runs.c.id == first))
            .first()
            .status
        )
    assert status == "interrupted"


def test_an_unreachable_database_gives_a_clear_error() -> None:
    with pytest.raises(CatalogError, match=r"catalog\.url") as info:
        Catalog(
            "postgresql+psycopg://ragline:secret@127.0.0.1:1/none?connect_timeout=2"
        )
    assert "secret" not in str(info.value), "the password must be masked"
