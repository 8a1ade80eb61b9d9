"""Assembly: turn validated settings into a catalog, embedders, indexes and sources.

The runtime opens each resource once, on first use, and closes them all in
:meth:`Runtime.close`. It is the one place that knows which implementation
stands behind each protocol; the packages below only see the protocols.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
from index.sync import SyncReport, apply_changes, recover, sync_source
from index.vectors import open_vector_index
from index.vectors.base import VectorIndex
from ingestion.config import EmbedderConfig, SourceConfig
from ingestion.connectors.base import Source, connector_for
from ingestion.embedding import CachedEmbedder, SentenceTransformerEmbedder
from ingestion.errors import (
    ConfigError,
    GenerationError,
    RequestError,
    StreamBacklogged,
)
from ingestion.pipeline import Pipeline
from ingestion.streaming.base import StreamBackend, StreamSourceConfig
from ingestion.streaming.consumer import BatchOutcome, ConsumerStats, StreamConsumer
from ingestion.streaming.events import Change, encode_event
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
    _recovered: set[int] = field(default_factory=set)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _backends: dict[str, StreamBackend] = field(default_factory=dict)
    _backlogs: dict[str, tuple[float, int]] = field(default_factory=dict)

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
        with self._lock:
            return self._open_index(generation)

    def _open_index(self, generation: Generation) -> VectorIndex:
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
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()
        for index in self._indexes.values():
            index.close()
        self._indexes.clear()
        self._recovered.clear()
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
        """Sync batch sources into the live generation of their collections.

        Without names, every batch source; streaming sources are consumed by
        :meth:`consume` instead, and naming one here is an error.
        """
        names = source_names or [
            s.name for s in self.settings.sources if not s.streaming
        ]
        reports = []
        for name in names:
            config = self.settings.source(name)
            if config.streaming:
                raise ConfigError(
                    f"Source {name!r} is a stream and is not listed in batches; "
                    f"consume it with `ragline stream {name}`."
                )
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
        sources = [
            s for s in self.settings.sources_of(collection.name) if not s.streaming
        ]
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
        declared = {s.name: s for s in self.settings.sources}
        rows = [
            _status_row(s, declared[s.name])
            for s in self.catalog.source_status(live)
            if s.name in declared
        ]
        seen = {r["source"] for r in rows}
        return rows + [
            {
                "source": name,
                "collection": declared[name].collection,
                "type": declared[name].type,
                "never_synced": True,
                **_objective(declared[name], None),
            }
            for name in sorted(set(declared) - seen)
        ]

    def _sync(
        self,
        name: str,
        pipeline: Pipeline,
        generation: Generation,
        full: bool,
        on_progress: ProgressCallback | None,
    ) -> SyncReport:
        index = self._recovered_index(generation)
        return sync_source(
            self.source(name),
            pipeline,
            self.catalog,
            index,
            generation,
            full=full,
            batch_chunks=self.settings.ingest.batch_chunks,
            on_progress=on_progress,
            recover_first=False,
        )

    def _recovered_index(self, generation: Generation) -> VectorIndex:
        """The generation's index, after finishing what an earlier process left.

        Recovery runs once per generation and process: later writers in this
        process (a batch sync beside a stream consumer) must not undo each
        other's writes in flight.
        """
        with self._lock:
            index = self._open_index(generation)
            if generation.id not in self._recovered:
                recover(self.catalog, index, generation)
                self._recovered.add(generation.id)
            return index

    # -- streaming sources ---------------------------------------------------

    def stream_config(self, name: str) -> StreamSourceConfig:
        config = self.settings.source(name)
        if not isinstance(config, StreamSourceConfig):
            streams = [s.name for s in self.settings.sources if s.streaming]
            raise ConfigError(
                f"Source {name!r} is a {config.type} source, not a stream; the "
                f"streaming sources are: {', '.join(streams) or 'none'}."
            )
        return config

    def stream_backend(self, name: str) -> StreamBackend:
        """The opened stream behind a streaming source, shared by pushes in this process."""
        with self._lock:
            if name not in self._backends:
                self.stream_config(name)
                backend = self.source(name).backend()  # type: ignore[attr-defined]
                backend.open()
                self._backends[name] = backend
            return self._backends[name]

    def _backlog(self, name: str, backend: StreamBackend, limit: int) -> int:
        """The stream's backlog: asked at most every half second while far from
        ``limit``, and counted up by this process's own pushes in between."""
        now = time.monotonic()
        known = self._backlogs.get(name)
        if known is not None and now - known[0] < 0.5 and known[1] < 0.9 * limit:
            return known[1]
        backlog = backend.backlog()
        self._backlogs[name] = (now, backlog)
        return backlog

    def stream_consumer(
        self,
        name: str,
        *,
        on_batch: Callable[[BatchOutcome], None] | None = None,
    ) -> StreamConsumer:
        """A consumer that applies a streaming source's events to the live generation."""
        config = self.stream_config(name)
        collection = self.settings.collection(config.collection)
        pipeline = self.pipeline(collection, config.max_document_bytes)
        catalog = self.catalog
        settings_json = config.model_dump_json(exclude={"consumer"})
        catalog.register_source(
            name,
            collection.name,
            config.type,
            hashlib.sha256(settings_json.encode()).hexdigest(),
        )

        def apply(changes: Sequence[Change]) -> Mapping[str, str]:
            generation = generation_for_ingest(
                catalog,
                collection.name,
                collection.index,
                functools.partial(self._pipeline_record, pipeline),
                pipeline.fingerprint(),
            )
            index = self._recovered_index(generation)
            return apply_changes(
                list(changes), pipeline, catalog, index, generation
            ).errors

        fresh_marked = [0.0]

        def record(outcome: BatchOutcome) -> None:
            lags = sorted(outcome.lags)
            catalog.record_stream_batch(
                name,
                newest_event_at=(
                    datetime.fromtimestamp(outcome.committed_at - lags[0], UTC)
                    if lags
                    else None
                ),
                lag_max_s=lags[-1] if lags else None,
                lag_p50_s=statistics.median(lags) if lags else None,
                applied=outcome.applied,
                dead_lettered=outcome.dead_lettered,
                caught_up=outcome.caught_up,
            )
            if outcome.caught_up:
                fresh_marked[0] = time.monotonic()
            if on_batch is not None:
                on_batch(outcome)

        def idle() -> None:
            # An empty stream means the source is fresh; say so now and then.
            now = time.monotonic()
            if now - fresh_marked[0] >= 5.0:
                catalog.mark_source_fresh(name)
                fresh_marked[0] = now

        backend = self.source(name).backend()  # type: ignore[attr-defined]
        return StreamConsumer(config, backend, apply, on_batch=record, on_idle=idle)

    def consume(
        self,
        name: str,
        stop: threading.Event | None = None,
        *,
        max_events: int | None = None,
        idle_exit_s: float | None = None,
        on_batch: Callable[[BatchOutcome], None] | None = None,
    ) -> ConsumerStats:
        """Consume a streaming source until ``stop`` (or the limits) end it."""
        consumer = self.stream_consumer(name, on_batch=on_batch)
        try:
            return consumer.run(stop, max_events=max_events, idle_exit_s=idle_exit_s)
        finally:
            consumer.close()

    def push(self, name: str, event: Mapping[str, Any]) -> str:
        """Validate an event and append it to a streaming source; returns its id.

        Raises ``RequestError`` for an invalid event and ``Throttled`` while the
        stream's backlog is over ``max_backlog`` (the consumer is behind).
        """
        config = self.stream_config(name)
        try:
            payload = encode_event(event)
        except ValueError as err:
            raise RequestError(str(err)) from err
        backend = self.stream_backend(name)
        backlog = self._backlog(name, backend, config.max_backlog)
        if backlog >= config.max_backlog:
            raise StreamBacklogged(
                f"Source {name!r} has {backlog:,} events waiting to be indexed, over "
                f"its max_backlog of {config.max_backlog:,}: the consumer is behind. "
                "Retry in a few seconds.",
                retry_after=5.0,
            )
        message_id = backend.append(payload)
        asked_at, counted = self._backlogs[name]
        self._backlogs[name] = (asked_at, counted + 1)
        return message_id

    @staticmethod
    def _pipeline_record(pipeline: Pipeline) -> dict[str, object]:
        return {**pipeline.describe(), "dim": pipeline.embedder.dim}

    # -- operations for flows --

    def search_generation(
        self,
        generation: Generation,
        query: str,
        k: int,
        *,
        mode: SearchMode | None = None,
    ) -> list[SearchHit]:
        """Search any generation, live or a candidate (no access filter)."""
        collection = self.settings.collection(generation.collection)
        retriever = Retriever(
            self.catalog,
            self.index(generation),
            generation,
            self.embedder(collection).inner,
            self.settings.retrieval,
        )
        return retriever.search(query, k, mode=mode)

    def is_current(self, generation: Generation) -> bool:
        """True when a generation was built with the configured pipeline and backend."""
        collection = self.settings.collection(generation.collection)
        pipeline = self.pipeline(collection, max_document_bytes=1)
        return (
            generation.fingerprint == pipeline.fingerprint()
            and generation.backend == collection.index
        )


def _objective(config: SourceConfig, staleness: float | None) -> dict[str, Any]:
    """The source's freshness objective and whether it is met (never synced: not)."""
    if config.max_staleness is None:
        return {"max_staleness_s": None, "stale": None}
    limit = config.max_staleness.total_seconds()
    return {
        "max_staleness_s": limit,
        "stale": staleness is None or staleness > limit,
    }


def _status_row(status: SourceStatus, config: SourceConfig) -> dict[str, Any]:
    run = status.last_run
    staleness = None
    if status.last_success_at is not None:
        staleness = round(
            (datetime.now(UTC) - status.last_success_at).total_seconds(), 1
        )
    stream = status.stream
    streaming = {}
    if stream is not None:
        streaming = {
            "last_event_at": _iso(stream.last_event_at),
            "event_lag_s": _rounded(stream.last_lag_max_s),
            "event_lag_p50_s": _rounded(stream.last_lag_p50_s),
            "events_applied": stream.events_applied,
            "events_dead_lettered": stream.events_dead_lettered,
        }
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
        **_objective(config, staleness),
        **streaming,
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None
