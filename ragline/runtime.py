"""Assembly: turn validated settings into a catalog, embedders, indexes and sources.

The runtime opens each resource once, on first use, and closes them all in
:meth:`Runtime.close`. It is the one place that knows which implementation
stands behind each protocol; the packages below only see the protocols.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from index.catalog import Catalog, Generation, SourceStatus
from index.config import CollectionConfig
from index.generations import (
    generation_for_build,
    generation_for_ingest,
    verify_generation,
)
from index.sync import SyncReport, sync_source
from index.vectors import open_vector_index
from index.vectors.base import VectorIndex
from ingestion.config import EmbedderConfig
from ingestion.connectors.base import Source, connector_for
from ingestion.embedding import CachedEmbedder, SentenceTransformerEmbedder
from ingestion.errors import GenerationError
from ingestion.pipeline import Pipeline
from retrieval.config import SearchMode
from retrieval.retriever import Retriever, SearchHit

from .settings import Settings

__all__ = ["Runtime"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[SyncReport], None]


@dataclass
class Runtime:
    """The assembled parts of one ragline deployment."""

    settings: Settings
    _catalog: Catalog | None = None
    _embedders: dict[EmbedderConfig, CachedEmbedder] = field(default_factory=dict)
    _indexes: dict[int, VectorIndex] = field(default_factory=dict)

    # -- parts ---------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
            self._catalog = Catalog(self.settings.catalog_url())
        return self._catalog

    def embedder(self, collection: CollectionConfig) -> CachedEmbedder:
        config = self.settings.embedder_for(collection)
        if config not in self._embedders:
            self._embedders[config] = CachedEmbedder(
                SentenceTransformerEmbedder(config), self.catalog
            )
        return self._embedders[config]

    def pipeline(
        self, collection: CollectionConfig, max_document_bytes: int
    ) -> Pipeline:
        return Pipeline(
            self.embedder(collection),
            self.settings.chunking_for(collection),
            max_document_bytes=max_document_bytes,
        )

    def source(self, name: str) -> Source:
        config = self.settings.source(name)
        _model, factory = connector_for(config.type)
        return factory(config)

    def index(self, generation: Generation) -> VectorIndex:
        """The vector index of a generation, opened once."""
        if generation.id not in self._indexes:
            collection = self.settings.collection(generation.collection)
            dim = generation.pipeline.get("dim")
            if dim is None:
                dim = self.embedder(collection).dim
            self._indexes[generation.id] = open_vector_index(
                generation.backend,  # type: ignore[arg-type]
                location=self.settings.data_dir / "indexes" / generation.backend,
                name=generation.index_name,
                dim=int(dim),
                faiss=collection.faiss,
                qdrant=collection.qdrant,
            )
        return self._indexes[generation.id]

    def close(self) -> None:
        for index in self._indexes.values():
            index.close()
        self._indexes.clear()
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None

    # -- operations ----------------------------------------------------------

    def ingest(
        self,
        source_names: list[str] | None = None,
        *,
        full: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> list[SyncReport]:
        """Sync sources into the live generation of their collections."""
        names = source_names or [s.name for s in self.settings.sources]
        reports = []
        for name in names:
            config = self.settings.source(name)
            collection = self.settings.collection(config.collection)
            pipeline = self.pipeline(collection, config.max_document_bytes)
            generation = generation_for_ingest(
                self.catalog,
                collection.name,
                collection.index,
                functools.partial(self._pipeline_record, pipeline),
                pipeline.fingerprint(),
            )
            reports.append(self._sync(name, pipeline, generation, full, on_progress))
        return reports

    def build(
        self, collection_name: str, *, on_progress: ProgressCallback | None = None
    ) -> tuple[Generation, list[SyncReport]]:
        """Build a new generation of a collection from all its sources, beside the live one."""
        collection = self.settings.collection(collection_name)
        sources = self.settings.sources_of(collection.name)
        if not sources:
            raise GenerationError(
                f"Collection {collection.name!r} has no sources to build from; add one "
                "under 'sources' in the settings file."
            )
        probe = self.pipeline(collection, sources[0].max_document_bytes)
        generation = generation_for_build(
            self.catalog,
            collection.name,
            collection.index,
            functools.partial(self._pipeline_record, probe),
            probe.fingerprint(),
        )
        reports = []
        for config in sources:
            pipeline = self.pipeline(collection, config.max_document_bytes)
            reports.append(
                self._sync(config.name, pipeline, generation, False, on_progress)
            )
        if all(r.status == "ok" for r in reports):
            self.catalog.set_generation_state(generation.id, "ready")
        return self.catalog.generation(generation.id), reports

    def verify(self, collection_name: str | None = None) -> dict[str, list[str]]:
        """Problems per live generation (``collection-gN``); empty lists when all is well."""
        results: dict[str, list[str]] = {}
        for collection in self.settings.collections:
            if collection_name and collection.name != collection_name:
                continue
            generation = self.catalog.live_generation(collection.name)
            if generation is None:
                continue
            results[generation.index_name] = verify_generation(
                self.catalog, self.index(generation), generation
            )
        return results

    def retriever(self, collection_name: str) -> Retriever:
        collection = self.settings.collection(collection_name)
        generation = self.catalog.live_generation(collection.name)
        if generation is None:
            raise GenerationError(
                f"Collection {collection.name!r} has no live generation yet; run "
                "`ragline ingest` first."
            )
        return Retriever(
            self.catalog,
            self.index(generation),
            generation,
            self.embedder(collection).inner,
            self.settings.retrieval,
        )

    def search(
        self,
        collection_name: str,
        query: str,
        k: int,
        *,
        mode: SearchMode | None = None,
    ) -> list[SearchHit]:
        """Every live passage matching ``query``, best first (no access filter)."""
        return self.retriever(collection_name).search(query, k, mode=mode)

    def source_rows(self) -> list[dict[str, Any]]:
        """Freshness of every declared source, as ``ragline sources status`` shows it.

        Staleness is the time since the last successful sync, in seconds; a
        declared source that never synced says ``never_synced``.
        """
        live = self.catalog.aliases()
        rows = [_status_row(s) for s in self.catalog.source_status(live)]
        declared = {s.name for s in self.settings.sources}
        return [r for r in rows if r["source"] in declared] + [
            {"source": name, "never_synced": True}
            for name in sorted(declared - {r["source"] for r in rows})
        ]

    def _sync(
        self,
        name: str,
        pipeline: Pipeline,
        generation: Generation,
        full: bool,
        on_progress: ProgressCallback | None,
    ) -> SyncReport:
        return sync_source(
            self.source(name),
            pipeline,
            self.catalog,
            self.index(generation),
            generation,
            full=full,
            batch_chunks=self.settings.ingest.batch_chunks,
            on_progress=on_progress,
        )

    @staticmethod
    def _pipeline_record(pipeline: Pipeline) -> dict[str, object]:
        return {**pipeline.describe(), "dim": pipeline.embedder.dim}


def _status_row(status: SourceStatus) -> dict[str, Any]:
    run = status.last_run
    staleness = None
    if status.last_success_at is not None:
        staleness = round(
            (datetime.now(UTC) - status.last_success_at).total_seconds(), 1
        )
    return {
        "source": status.name,
        "collection": status.collection,
        "type": status.type,
        "last_success_at": _iso(status.last_success_at),
        "staleness_s": staleness,
        "documents": status.documents,
        "failed_documents": status.failed_documents,
        "last_status": run.status if run else None,
        "last_run_started_at": _iso(run.started_at) if run else None,
        "seen": run.seen if run else None,
        "added": run.added if run else None,
        "changed": (run.changed + run.added) if run else None,
        "deleted": run.deleted if run else None,
        "failed": run.failed if run else None,
        "last_error": run.error if run else None,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None
