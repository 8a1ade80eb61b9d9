"""Incremental sync: only what changed is written, and nothing is ever lost.

These tests use the real catalog, the real vector backends and the real
files connector, with the hashing fake in place of the embedding model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index.catalog import Catalog, Generation
from index.generations import generation_for_ingest, verify_generation
from index.sync import SyncReport, recover, sync_source
from index.vectors import open_vector_index
from index.vectors.base import VectorIndex
from ingestion.config import ChunkingConfig
from ingestion.connectors.files import FilesConfig, FilesSource
from ingestion.embedding import CachedEmbedder
from ingestion.errors import FingerprintMismatch
from ingestion.models import vector_id
from ingestion.pipeline import Pipeline
from ingestion.testing import HashEmbedder

DOCS = {
    "a.md": "# Alpha\n\nThe alpha team owns the build system and the release train.\n",
    "b.md": "# Beta\n\nBeta handles customer support escalations within two hours.\n",
    "c.txt": "Gamma keeps the lab inventory and orders chemicals every Monday.\n",
    "sub/d.html": "<html><head><title>Delta</title></head><body><h1>Delta</h1>"
    "<p>Delta runs the data retention reviews each quarter.</p></body></html>",
}


@dataclass
class World:
    root: Path
    catalog: Catalog
    index: VectorIndex
    generation: Generation
    embedder: HashEmbedder
    pipeline: Pipeline

    def sync(self, *, full: bool = False, **settings: Any) -> SyncReport:
        source = FilesSource(
            FilesConfig(
                name="notes",
                type="files",
                collection="docs",
                path=self.root,
                **settings,
            )
        )
        return sync_source(
            source,
            self.pipeline,
            self.catalog,
            self.index,
            self.generation,
            full=full,
            batch_chunks=2,
        )

    def live_doc_chunks(self) -> dict[str, set[str]]:
        ids = self.catalog.all_vector_ids(self.generation.id)
        by_doc: dict[str, set[str]] = {}
        for record in self.catalog.live_chunks(
            self.generation.id, ids.tolist()
        ).values():
            by_doc.setdefault(record.doc_id, set()).add(record.chunk_id)
        return by_doc

    def verify(self) -> list[str]:
        return verify_generation(self.catalog, self.index, self.generation)


def _write_docs(root: Path, docs: dict[str, str | bytes]) -> None:
    for name, content in docs.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


@pytest.fixture(params=["faiss", "qdrant"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    root = tmp_path / "notes"
    _write_docs(root, dict(DOCS))
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    embedder = HashEmbedder()
    pipeline = Pipeline(
        CachedEmbedder(embedder, catalog),
        ChunkingConfig(max_tokens=32, overlap_tokens=4),
        max_document_bytes=10_000,
    )
    generation = generation_for_ingest(
        catalog, "docs", request.param, pipeline.describe, pipeline.fingerprint()
    )
    index = open_vector_index(
        request.param,
        location=tmp_path / "indexes",
        name=generation.index_name,
        dim=embedder.dim,
    )
    yield World(root, catalog, index, generation, embedder, pipeline)
    index.close()
    catalog.close()


def test_the_first_sync_adds_every_document(world: World) -> None:
    report = world.sync()

    assert (report.status, report.added, report.failed) == ("ok", 4, 0), report
    assert set(world.live_doc_chunks()) == {f"notes:{name}" for name in DOCS}
    assert world.index.count() == report.chunks_written
    assert world.verify() == []


def test_a_second_sync_of_an_unchanged_source_writes_nothing(world: World) -> None:
    world.sync()
    before = world.live_doc_chunks()
    embedded = world.embedder.texts_embedded

    report = world.sync()

    assert (report.unchanged, report.added, report.changed, report.deleted) == (
        4,
        0,
        0,
        0,
    )
    assert report.chunks_written == 0
    assert world.embedder.texts_embedded == embedded, "nothing may be embedded again"
    assert world.live_doc_chunks() == before


def test_edits_additions_and_deletions_touch_exactly_those_documents(
    world: World,
) -> None:
    world.sync()
    before = world.live_doc_chunks()

    _write_docs(
        world.root, {"b.md": "# Beta\n\nBeta now answers escalations in one hour.\n"}
    )
    _write_docs(
        world.root, {"e.md": "# Epsilon\n\nEpsilon is a new team for firmware.\n"}
    )
    os.remove(world.root / "c.txt")
    report = world.sync()

    assert (report.added, report.changed, report.deleted, report.unchanged) == (
        1,
        1,
        1,
        2,
    ), report
    after = world.live_doc_chunks()
    assert after["notes:a.md"] == before["notes:a.md"], (
        "untouched documents keep their chunks"
    )
    assert after["notes:sub/d.html"] == before["notes:sub/d.html"]
    assert after["notes:b.md"].isdisjoint(before["notes:b.md"]), (
        "an edit replaces the chunks"
    )
    assert "notes:c.txt" not in after
    assert "notes:e.md" in after
    assert world.verify() == []
    assert world.index.count() == sum(len(c) for c in after.values()), "no orphans"


def test_touching_a_file_without_changing_it_is_not_a_change(world: World) -> None:
    world.sync()
    path = world.root / "a.md"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))

    report = world.sync()

    assert (report.changed, report.unchanged) == (0, 4), report


def test_documents_that_cannot_be_parsed_are_recorded_and_the_rest_go_on(
    world: World,
) -> None:
    _write_docs(
        world.root,
        {
            "binary.md": b"\x00\x01\x02PNG\x00\x00" * 50,
            "latin.md": "# Caf\xe9\n\nna\xefve text".encode("latin-1"),
            "empty.md": "",
            "huge.txt": "word " * 5_000,
        },
    )

    report = world.sync()

    failures = dict(report.failures)
    assert report.status == "ok"
    assert report.added == 4, "the good documents are all indexed"
    assert set(failures) == {
        "notes:binary.md",
        "notes:latin.md",
        "notes:empty.md",
        "notes:huge.txt",
    }
    assert "binary" in failures["notes:binary.md"]
    assert "UTF-8" in failures["notes:latin.md"]
    assert "empty" in failures["notes:empty.md"]
    assert "limit" in failures["notes:huge.txt"]
    assert world.verify() == []


def test_a_document_that_breaks_keeps_its_last_good_version(world: World) -> None:
    world.sync()
    good = world.live_doc_chunks()["notes:a.md"]

    _write_docs(world.root, {"a.md": b"\x00\x00binary now\x00"})
    report = world.sync()

    assert report.failed == 1, report
    assert world.live_doc_chunks()["notes:a.md"] == good


def test_a_source_that_cannot_be_listed_deletes_nothing(
    world: World, tmp_path: Path
) -> None:
    world.sync()
    before = world.live_doc_chunks()

    world.root.rename(tmp_path / "moved")
    report = world.sync()

    assert report.status == "failed" and report.error, report
    assert world.live_doc_chunks() == before, (
        "a failed listing must not delete documents"
    )


def test_a_full_sync_rewrites_vectors_lost_from_the_index(world: World) -> None:
    world.sync()
    lost = world.catalog.all_vector_ids(world.generation.id)[:2]
    world.index.delete(lost)
    world.index.flush()
    assert world.verify(), "verify must notice missing vectors"

    report = world.sync(full=True)

    assert report.status == "ok"
    assert world.verify() == []


def test_recovery_completes_a_write_that_was_interrupted(world: World) -> None:
    world.sync()
    # A run that died after writing vectors of a new version, before committing it.
    new_text = "# Alpha\n\nAlpha was rewritten but never committed.\n"
    _write_docs(world.root, {"a.md": new_text})
    prepared = world.pipeline.prepare(_source_doc(world, "a.md"), "interrupted-hash")
    world.catalog.stage_chunks(world.generation.id, prepared.chunks)
    ids = np.array([vector_id(c.chunk_id) for c in prepared.chunks], dtype=np.int64)
    world.index.upsert(ids, world.pipeline.embed(prepared.chunks))
    world.index.flush()
    assert world.verify(), "the interrupted write must be visible to verify"

    removed = recover(world.catalog, world.index, world.generation)
    report = world.sync()

    assert removed == len(ids)
    assert report.changed == 1
    assert world.verify() == []


def test_ingest_refuses_to_mix_chunks_of_another_pipeline(world: World) -> None:
    other = Pipeline(
        world.pipeline.embedder,
        ChunkingConfig(max_tokens=64, overlap_tokens=8),
        max_document_bytes=10_000,
    )
    with pytest.raises(
        FingerprintMismatch, match="ragline index build --collection docs"
    ):
        generation_for_ingest(
            world.catalog,
            "docs",
            world.generation.backend,
            other.describe,
            other.fingerprint(),
        )


def _source_doc(world: World, name: str):  # type: ignore[no-untyped-def]
    from ingestion.models import SourceDocument

    path = world.root / name
    return SourceDocument(
        source="notes",
        key=name,
        uri=path.as_uri(),
        content=path.read_bytes(),
        media_type="text/markdown",
    )


def test_new_source_settings_make_the_next_sync_read_everything_again(
    world: World,
) -> None:
    records = '{"id": 1, "body": "first body", "summary": "first summary"}\n'
    _write_docs(world.root, {"records.jsonl": records})
    world.sync(records={"text_field": "body"})

    report = world.sync(records={"text_field": "summary"})

    assert report.changed == 1, "the record's text comes from another field now"
    assert report.unchanged == 4, "the other files are read again but did not change"
    texts = {
        r.text
        for r in world.catalog.live_chunks(
            world.generation.id,
            world.catalog.all_vector_ids(world.generation.id).tolist(),
        ).values()
    }
    assert any("first summary" in t for t in texts), texts
