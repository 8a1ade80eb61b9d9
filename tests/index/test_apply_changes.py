"""Stream changes written to a generation: idempotent, ordered, crash-safe.

These tests use the real catalog (SQLite and PostgreSQL), the FAISS index
and the real embedding model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from index.catalog import Catalog, Generation
from index.generations import generation_for_ingest, verify_generation
from index.sync import ChangeReport, apply_changes
from index.vectors import open_vector_index
from index.vectors.base import VectorIndex
from ingestion.config import ChunkingConfig
from ingestion.embedding import CachedEmbedder
from ingestion.pipeline import Pipeline
from ingestion.streaming.events import Change, Delivery, parse_event

SOURCE = "tickets"


@dataclass
class World:
    catalog: Catalog
    index: VectorIndex
    generation: Generation
    pipeline: Pipeline
    position: int = 0

    def change(self, body: dict[str, Any], *, position: int | None = None) -> Change:
        """A change as the consumer hands it over; positions grow by default."""
        if position is None:
            self.position += 1
            position = self.position
        delivery = Delivery(
            f"{position}-0",
            json.dumps(body).encode(),
            0.0,
            position=f"{position:015d}-{0:010d}",
        )
        return parse_event(delivery, source=SOURCE)

    def upsert(self, key: str, content: str, **kw: Any) -> Change:
        return self.change({"op": "upsert", "key": key, "content": content}, **kw)

    def delete(self, key: str, **kw: Any) -> Change:
        return self.change({"op": "delete", "key": key}, **kw)

    def apply(self, *changes: Change) -> ChangeReport:
        return apply_changes(
            list(changes), self.pipeline, self.catalog, self.index, self.generation
        )

    def live(self) -> dict[str, list[str]]:
        """The live chunk texts of each document, in order."""
        ids = self.catalog.all_vector_ids(self.generation.id)
        by_doc: dict[str, list[tuple[int, str]]] = {}
        for record in self.catalog.live_chunks(
            self.generation.id, ids.tolist()
        ).values():
            by_doc.setdefault(record.doc_id, []).append((record.seq, record.text))
        return {doc: [t for _, t in sorted(chunks)] for doc, chunks in by_doc.items()}

    def verify(self) -> list[str]:
        return verify_generation(self.catalog, self.index, self.generation)


@pytest.fixture
def world(catalog_url: str, tmp_path: Path, real_embedder: Any) -> Iterator[World]:
    catalog = Catalog(catalog_url)
    pipeline = Pipeline(
        CachedEmbedder(real_embedder, catalog),
        ChunkingConfig(max_tokens=64, overlap_tokens=8),
        max_document_bytes=100_000,
    )
    generation = generation_for_ingest(
        catalog, "docs", "faiss", pipeline.describe, pipeline.fingerprint()
    )
    index = open_vector_index(
        "faiss",
        location=tmp_path / "indexes",
        name=generation.index_name,
        dim=real_embedder.dim,
    )
    yield World(catalog, index, generation, pipeline)
    index.close()
    catalog.close()


def _text(world: World, key: str) -> str:
    return " ".join(world.live()[f"{SOURCE}:{key}"])


def test_added_documents_become_live(world: World) -> None:
    report = world.apply(
        world.upsert("t/1", "The printer on floor three is on fire."),
        world.upsert("t/2", "The VPN drops every evening at six."),
    )

    assert (report.added, report.changed, report.deleted) == (2, 0, 0), report
    assert report.chunks_written >= 2 and report.errors == {}
    assert "printer on floor three" in _text(world, "t/1")
    assert "VPN drops" in _text(world, "t/2")
    assert world.verify() == []


def test_an_update_replaces_the_old_chunks(world: World) -> None:
    world.apply(world.upsert("t/1", "The printer on floor three is on fire."))

    report = world.apply(world.upsert("t/1", "The printer was replaced on Monday."))

    assert (report.added, report.changed) == (0, 1), report
    assert world.live() == {f"{SOURCE}:t/1": ["The printer was replaced on Monday."]}
    assert world.verify() == []


def test_a_delete_removes_the_document_and_its_vectors(world: World) -> None:
    world.apply(world.upsert("t/1", "Printer on fire."), world.upsert("t/2", "VPN."))

    report = world.apply(world.delete("t/1"), world.delete("never-existed"))

    assert report.deleted == 1, report
    assert list(world.live()) == [f"{SOURCE}:t/2"]
    assert len(world.index.ids()) == len(
        world.catalog.all_vector_ids(world.generation.id)
    )
    assert world.verify() == []


def test_applying_the_same_batch_twice_changes_nothing(world: World) -> None:
    batch = [
        world.upsert("t/1", "The printer on floor three is on fire."),
        world.upsert("t/2", "The VPN drops every evening at six."),
        world.delete("t/3"),
    ]
    world.apply(*batch)
    before = world.live()
    vectors = sorted(world.index.ids().tolist())

    again = world.apply(*batch)

    assert (again.added, again.changed, again.deleted, again.chunks_written) == (
        0,
        0,
        0,
        0,
    ), again
    assert again.unchanged == 2
    assert world.live() == before
    assert sorted(world.index.ids().tolist()) == vectors
    assert world.verify() == []


def test_an_older_upsert_than_the_indexed_one_is_ignored(world: World) -> None:
    world.apply(world.upsert("t/1", "Second version.", position=20))

    report = world.apply(world.upsert("t/1", "First version.", position=10))

    assert report.stale == 1 and report.changed == 0, report
    assert _text(world, "t/1") == "Second version."


def test_an_older_delete_than_the_indexed_upsert_is_ignored(world: World) -> None:
    world.apply(world.upsert("t/1", "Written after the delete.", position=20))

    report = world.apply(world.delete("t/1", position=10))

    assert report.stale == 1 and report.deleted == 0, report
    assert _text(world, "t/1") == "Written after the delete."
    assert world.verify() == []


def test_the_same_content_at_a_newer_position_only_moves_the_version(
    world: World,
) -> None:
    world.apply(world.upsert("t/1", "Same text.", position=10))
    world.apply(world.upsert("t/1", "Same text.", position=30))

    report = world.apply(world.upsert("t/1", "Older text.", position=20))

    assert report.stale == 1, "the version moved to the newer position"
    assert _text(world, "t/1") == "Same text."


def test_a_document_that_fails_to_parse_is_returned_and_the_rest_written(
    world: World,
) -> None:
    good = world.upsert("t/1", "The printer on floor three is on fire.")
    empty = world.upsert("t/2", "   ")
    odd = world.change(
        {"op": "upsert", "key": "t/3", "content": "x", "media_type": "image/x-odd"}
    )

    report = world.apply(good, empty, odd)

    assert set(report.errors) == {empty.delivery.message_id, odd.delivery.message_id}
    assert "empty" in report.errors[empty.delivery.message_id]
    assert report.added == 1
    assert list(world.live()) == [f"{SOURCE}:t/1"]
    states = world.catalog.document_states(world.generation.id, SOURCE)
    assert states[f"{SOURCE}:t/2"].status == "failed"
    assert world.verify() == []


def test_a_failed_update_keeps_the_last_good_version_live(world: World) -> None:
    world.apply(world.upsert("t/1", "The last good text."))

    report = world.apply(world.upsert("t/1", ""))

    assert len(report.errors) == 1
    assert _text(world, "t/1") == "The last good text."
    assert world.verify() == []


def test_a_mixed_history_ends_in_the_latest_state(world: World) -> None:
    for round_ in range(3):
        world.apply(
            *(world.upsert(f"k{i}", f"Round {round_} of ticket {i}.") for i in range(6))
        )
    world.apply(world.delete("k0"), world.delete("k5"), world.upsert("k1", "Final."))

    live = world.live()

    assert sorted(live) == [f"{SOURCE}:k{i}" for i in range(1, 5)]
    assert live[f"{SOURCE}:k1"] == ["Final."]
    assert live[f"{SOURCE}:k3"] == ["Round 2 of ticket 3."]
    assert world.verify() == []
