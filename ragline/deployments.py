"""The entrypoint of ragline's Prefect deployments.

Importing this module registers how the flows open a runtime (settings file
to assembled :class:`~ragline.runtime.Runtime`) and re-exports the flows.
Every deployment points at a flow of this file (``ragline/deployments.py:
ingest_source`` and so on), so a worker or runner process that loads the
flow has the opener registered before the flow runs.

The imports are absolute: Prefect may load this file as a script.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.config import FlowsConfig
from flows.context import SourceInfo, register_opener
from flows.freshness import check_freshness
from flows.ingest import ingest_all, ingest_source
from flows.reindex import reindex_collection
from flows.streaming import stream_ingest
from index.catalog import ChunkRecord, Generation
from index.sync import SyncReport
from ingestion.embedding import set_offline_environment
from ingestion.streaming.consumer import ConsumerStats
from ragline.runtime import Runtime
from ragline.settings import load_settings
from retrieval.retriever import SearchHit

__all__ = [
    "FLOWS",
    "FlowOperations",
    "check_freshness",
    "ingest_all",
    "ingest_source",
    "open_operations",
    "reindex_collection",
    "stream_ingest",
]

FLOWS = {
    "ingest_source": ingest_source,
    "ingest_all": ingest_all,
    "reindex_collection": reindex_collection,
    "check_freshness": check_freshness,
    "stream_ingest": stream_ingest,
}
"""The flows by their attribute name in this file (the entrypoint's second half)."""

_SAMPLE_SPREAD = 25
"""Chunks read per passage asked for, when sampling a generation's documents."""


@dataclass
class FlowOperations:
    """The operations the flows use, over one :class:`Runtime`."""

    runtime: Runtime
    config_path: Path
    _writing: dict[str, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    @property
    def flows_config(self) -> FlowsConfig:
        return self.runtime.settings.flows

    def sources(self) -> list[SourceInfo]:
        return [
            SourceInfo(
                name=s.name,
                collection=s.collection,
                streaming=s.streaming,
                schedule=s.schedule,
                max_staleness=s.max_staleness,
            )
            for s in self.runtime.settings.sources
        ]

    def collections(self) -> list[str]:
        return [c.name for c in self.runtime.settings.collections]

    def ingest_source(self, name: str) -> SyncReport:
        """Sync one source; sources of one collection take turns (they share an index)."""
        collection = self.runtime.settings.source(name).collection
        with self._guard:
            lock = self._writing.setdefault(collection, threading.Lock())
        with lock:
            return self.runtime.ingest([name])[0]

    def live_generation(self, collection: str) -> Generation | None:
        self.runtime.settings.collection(collection)  # NotFound for unknown names
        return self.runtime.catalog.live_generation(collection)

    def is_current(self, generation: Generation) -> bool:
        return self.runtime.is_current(generation)

    def build(self, collection: str) -> tuple[Generation, list[SyncReport]]:
        return self.runtime.build(collection)

    def search_generation(
        self, generation: Generation, query: str, k: int
    ) -> list[SearchHit]:
        return self.runtime.search_generation(generation, query, k)

    def sample_passages(self, generation: Generation, n: int) -> list[ChunkRecord]:
        """The first passage of up to ``n`` documents, spread over the generation."""
        catalog = self.runtime.catalog
        ids = catalog.all_vector_ids(generation.id)
        stride = max(1, len(ids) // (n * _SAMPLE_SPREAD))
        chunks = catalog.live_chunks(generation.id, [int(i) for i in ids[::stride]])
        first: dict[str, ChunkRecord] = {}
        for chunk in chunks.values():
            known = first.get(chunk.doc_id)
            if known is None or chunk.seq < known.seq:
                first[chunk.doc_id] = chunk
        documents = sorted(first)
        step = max(1, len(documents) // n)
        return [first[d] for d in documents[::step][:n]]

    def live_chunks(self, generation: Generation) -> int:
        return self.runtime.catalog.counts(generation.id)[1]

    def promote(self, collection: str, generation_id: int) -> Generation | None:
        return self.runtime.catalog.promote(collection, generation_id)

    def source_rows(self) -> list[dict[str, Any]]:
        return self.runtime.source_rows()

    def consume(
        self,
        name: str,
        stop: Any = None,
        *,
        max_events: int | None = None,
        idle_exit_s: float | None = None,
    ) -> ConsumerStats:
        return self.runtime.consume(
            name, stop, max_events=max_events, idle_exit_s=idle_exit_s
        )

    def verify(self, collection_name: str | None = None) -> dict[str, list[str]]:
        return self.runtime.verify(collection_name)


@contextmanager
def open_operations(config_path: Path) -> Iterator[FlowOperations]:
    """Load a settings file and assemble its runtime for the length of a flow run."""
    set_offline_environment()
    runtime = Runtime(load_settings(config_path))
    try:
        yield FlowOperations(runtime, config_path)
    finally:
        runtime.close()


register_opener(open_operations)
