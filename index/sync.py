"""Incremental sync: bring one source's documents in one generation up to date.

The listing of a source is compared with the catalog by content hash; only
new and changed documents are parsed, chunked, embedded and written, and
documents the listing no longer holds are deleted. Writes follow the order
described in :mod:`index.catalog`, so a process killed at any instant leaves
the last good state queryable, and the next sync (which first calls
:func:`recover`) completes the job.

Parsing and chunking run in a producer thread while the main thread embeds
and writes, so the embedding model is kept busy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ingestion.connectors.base import Source
from ingestion.errors import DocumentError, SourceError
from ingestion.models import (
    FailedDocument,
    SourceDocument,
    UnchangedDocument,
    vector_id,
)
from ingestion.pipeline import Pipeline, PreparedDocument
from ingestion.streaming.events import Change, Delete, Upsert

from .catalog import Catalog, DocumentRecord, DocumentState, Generation
from .vectors.base import VectorIndex

__all__ = [
    "FAILPOINT_ENV",
    "ChangeReport",
    "SyncReport",
    "apply_changes",
    "recover",
    "sync_source",
]

logger = logging.getLogger(__name__)

FAILPOINT_ENV = "RAGLINE_FAILPOINT"
"""Crash-test hook: ``step`` or ``step:N`` kills the process (SIGKILL) at the
Nth time the named write step is reached. Unset in normal operation."""

_failpoint_hits: dict[str, int] = {}


def _failpoint(step: str) -> None:
    wanted = os.environ.get(FAILPOINT_ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != step:
        return
    _failpoint_hits[step] = _failpoint_hits.get(step, 0) + 1
    if _failpoint_hits[step] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class SyncReport:
    """What one sync of one source did."""

    source: str
    collection: str
    generation_id: int
    full: bool = False
    status: str = "running"
    seen: int = 0
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: int = 0
    chunks_written: int = 0
    seconds: float = 0.0
    error: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "seen": self.seen,
            "added": self.added,
            "changed": self.changed,
            "unchanged": self.unchanged,
            "deleted": self.deleted,
            "failed": self.failed,
            "chunks_written": self.chunks_written,
        }


ProgressCallback = Callable[[SyncReport], None]


def recover(catalog: Catalog, index: VectorIndex, generation: Generation) -> int:
    """Finish or undo the writes an interrupted run left; returns vectors removed.

    Pending chunks were never made live: their vectors go. Deleting chunks
    were already replaced: their vectors go too. Vectors the catalog does not
    know at all (an index written by hand, or a lost catalog transaction) are
    removed so the index holds exactly the catalog's live chunks.
    """
    pending, deleting = catalog.interrupted_writes(generation.id)
    known = catalog.all_vector_ids(generation.id, state=None)
    orphans = np.setdiff1d(index.ids(), known, assume_unique=False)
    stale = np.concatenate(
        [
            np.asarray(pending, dtype=np.int64),
            np.asarray(deleting, dtype=np.int64),
            orphans,
        ]
    )
    if stale.size == 0:
        return 0
    index.delete(stale)
    index.flush()
    catalog.purge_chunks(generation.id, pending, "pending")
    catalog.purge_chunks(generation.id, deleting, "deleting")
    logger.warning(
        "completed an interrupted write: generation=%s pending=%d deleting=%d orphans=%d",
        generation.id,
        len(pending),
        len(deleting),
        int(orphans.size),
    )
    return int(stale.size)


# Items the producer thread hands to the writer.
@dataclass(frozen=True, slots=True)
class _Failure:
    doc_id: str
    source: str
    key: str
    uri: str
    error: str
    error_hash: str | None


@dataclass(frozen=True, slots=True)
class _Touch:
    doc_id: str
    version: str | None


_DONE = object()


class _Producer(threading.Thread):
    """Lists the source, classifies each document, parses and chunks the changed ones."""

    def __init__(
        self,
        source: Source,
        pipeline: Pipeline,
        states: dict[str, DocumentState],
        report: SyncReport,
        *,
        full: bool,
        trust_versions: bool = True,
        maxsize: int = 64,
    ) -> None:
        super().__init__(name=f"ragline-list-{source.config.name}", daemon=True)
        self.source = source
        self.pipeline = pipeline
        self.states = states
        self.report = report
        self.full = full
        self.trust_versions = trust_versions and not full
        self.seen: set[str] = set()
        self.items: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self._stop_requested = threading.Event()

    def stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> None:
        try:
            known = _known_versions(self.states) if self.trust_versions else {}
            for item in self.source.documents(known):
                if self._stop_requested.is_set():
                    return
                self.seen.add(item.doc_id)
                produced = self._classify(item)
                if produced is not None:
                    self._put(produced)
        except BaseException as err:  # noqa: BLE001 - re-raised by the writer thread
            self.error = err
        finally:
            self._put(_DONE)

    def _put(self, item: object) -> None:
        while not self._stop_requested.is_set():
            try:
                self.items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _classify(self, item: Any) -> object | None:
        self.report.seen += 1
        if isinstance(item, UnchangedDocument):
            self.report.unchanged += 1
            return None
        if isinstance(item, FailedDocument):
            self.report.failed += 1
            return _Failure(
                item.doc_id, item.source, item.key, item.uri, item.error, None
            )
        return self._prepare(item)

    def _prepare(self, document: SourceDocument) -> object | None:
        content_hash = document.content_hash
        state = self.states.get(document.doc_id)
        if not self.full and state is not None:
            if state.status == "indexed" and state.content_hash == content_hash:
                self.report.unchanged += 1
                return (
                    _Touch(document.doc_id, document.version)
                    if (state.version != document.version)
                    else None
                )
            if state.error_hash == content_hash:
                self.report.failed += 1  # still the version that failed before
                return None
        try:
            return self.pipeline.prepare(document, content_hash)
        except DocumentError as err:
            self.report.failed += 1
            return _Failure(
                document.doc_id,
                document.source,
                document.key,
                document.uri,
                str(err),
                content_hash,
            )


def sync_source(
    source: Source,
    pipeline: Pipeline,
    catalog: Catalog,
    index: VectorIndex,
    generation: Generation,
    *,
    full: bool = False,
    batch_chunks: int = 1024,
    on_progress: ProgressCallback | None = None,
    recover_first: bool = True,
) -> SyncReport:
    """Sync one source into one generation and return what was done.

    A ``SourceError`` (the source could not be listed completely) ends the
    sync with status ``failed``: what was written stays, nothing is deleted.
    ``recover_first=False`` skips :func:`recover`, for a caller that already
    recovered the generation and may have other writes to it in flight.
    """
    name = source.config.name
    report = SyncReport(name, generation.collection, generation.id, full=full)
    started = time.perf_counter()
    if recover_first:
        recover(catalog, index, generation)
    config_hash = hashlib.sha256(source.config.model_dump_json().encode()).hexdigest()
    settings_changed = catalog.register_source(
        name, generation.collection, source.config.type, config_hash
    )
    run_id = catalog.start_run(name, generation.id, full=full)
    states = catalog.document_states(generation.id, name)
    indexed_before = {doc_id for doc_id, s in states.items() if s.status == "indexed"}
    writer = _Writer(
        pipeline, catalog, index, generation, report, batch_chunks, indexed_before
    )
    # Validators (mtime, ETag, updated_at) say nothing about new source
    # settings, such as another text column: read everything once.
    producer = _Producer(
        source, pipeline, states, report, full=full, trust_versions=not settings_changed
    )
    producer.start()
    try:
        for item in _drain(producer):
            writer.handle(item)
            if on_progress is not None:
                on_progress(report)
        writer.flush()
        _delete_missing(catalog, index, generation, report, states, producer.seen)
    except SourceError as err:
        writer.flush()
        report.status, report.error = "failed", str(err)
        logger.error("sync failed: source=%s error=%s", name, err)
    except BaseException:
        producer.stop()
        report.seconds = time.perf_counter() - started
        catalog.finish_run(
            run_id, status="interrupted", counts=report.counts(), error="interrupted"
        )
        raise
    else:
        report.status = "ok"
    report.seconds = time.perf_counter() - started
    catalog.finish_run(
        run_id, status=report.status, counts=report.counts(), error=report.error
    )
    logger.info(
        "sync finished: source=%s collection=%s generation=%s status=%s seen=%d added=%d "
        "changed=%d unchanged=%d deleted=%d failed=%d chunks=%d seconds=%.2f",
        name,
        generation.collection,
        generation.id,
        report.status,
        report.seen,
        report.added,
        report.changed,
        report.unchanged,
        report.deleted,
        report.failed,
        report.chunks_written,
        report.seconds,
    )
    return report


def _drain(producer: _Producer) -> Iterator[object]:
    while True:
        item = producer.items.get()
        if item is _DONE:
            break
        yield item
    producer.join()
    if producer.error is not None:
        raise producer.error


def _known_versions(states: dict[str, DocumentState]) -> dict[str, str | None]:
    return {
        s.key: s.version for s in states.values() if s.status == "indexed" and s.version
    }


class _Writer:
    """Embeds prepared documents in batches and writes them in crash-safe order."""

    def __init__(
        self,
        pipeline: Pipeline,
        catalog: Catalog,
        index: VectorIndex,
        generation: Generation,
        report: SyncReport,
        batch_chunks: int,
        indexed_before: set[str],
    ) -> None:
        self.pipeline = pipeline
        self.indexed_before = indexed_before
        self.catalog = catalog
        self.index = index
        self.generation = generation
        self.report = report
        self.batch_chunks = batch_chunks
        self.batch: list[PreparedDocument] = []
        self.batch_size = 0
        self.touches: list[_Touch] = []

    def handle(self, item: object) -> None:
        if isinstance(item, _Failure):
            self._record_failure(item)
        elif isinstance(item, _Touch):
            self.touches.append(item)
        elif isinstance(item, PreparedDocument):
            self.batch.append(item)
            self.batch_size += len(item.chunks)
            if self.batch_size >= self.batch_chunks:
                self.flush()

    def flush(self) -> None:
        if self.touches:
            self.catalog.update_versions(
                self.generation.id, {t.doc_id: t.version for t in self.touches}
            )
            self.touches = []
        if self.batch:
            self._write(self.batch)
            self.batch, self.batch_size = [], 0

    def _record_failure(self, failure: _Failure) -> None:
        self.report.failures.append((failure.doc_id, failure.error))
        logger.warning(
            "document skipped: doc_id=%s error=%s", failure.doc_id, failure.error
        )
        self.catalog.record_failure(
            self.generation.id,
            doc_id=failure.doc_id,
            source=failure.source,
            key=failure.key,
            uri=failure.uri,
            error=failure.error,
            error_hash=failure.error_hash,
        )

    def _write(self, batch: list[PreparedDocument]) -> None:
        gen_id = self.generation.id
        chunks = [c for doc in batch for c in doc.chunks]
        vectors = self.pipeline.embed(chunks)
        ids = np.array([vector_id(c.chunk_id) for c in chunks], dtype=np.int64)

        self.catalog.stage_chunks(gen_id, chunks)
        _failpoint("after_stage")
        if len(ids):
            self.index.upsert(ids, vectors)
            self.index.flush()
        _failpoint("after_index_write")

        existing = {d.document.doc_id for d in batch} & self.indexed_before
        records = [_document_record(doc) for doc in batch]
        chunk_ids = {
            doc.document.doc_id: [c.chunk_id for c in doc.chunks] for doc in batch
        }
        retired = self.catalog.commit_documents(gen_id, records, chunk_ids)
        _failpoint("after_commit")

        _remove_vectors(self.catalog, self.index, gen_id, retired, "after_index_delete")
        self.report.changed += len(existing)
        self.report.added += len(batch) - len(existing)
        self.report.chunks_written += len(chunks)


def _remove_vectors(
    catalog: Catalog, index: VectorIndex, gen_id: int, retired: list[int], step: str
) -> None:
    if not retired:
        return
    index.delete(np.asarray(retired, dtype=np.int64))
    index.flush()
    _failpoint(step)
    catalog.purge_chunks(gen_id, retired, "deleting")


def _delete_missing(
    catalog: Catalog,
    index: VectorIndex,
    generation: Generation,
    report: SyncReport,
    states: dict[str, DocumentState],
    seen: set[str],
) -> None:
    gone = sorted(set(states) - seen)
    if not gone:
        return
    retired = catalog.begin_delete_documents(generation.id, gone)
    _failpoint("after_delete_mark")
    _remove_vectors(catalog, index, generation.id, retired, "after_delete_index")
    report.deleted += len(gone)


def _document_record(doc: PreparedDocument) -> DocumentRecord:
    source_doc = doc.document
    return DocumentRecord(
        doc_id=source_doc.doc_id,
        source=source_doc.source,
        key=source_doc.key,
        uri=source_doc.uri,
        title=source_doc.title or doc.parsed.title,
        content_hash=doc.content_hash,
        version=source_doc.version,
        modified_at=source_doc.modified_at,
        access_labels=source_doc.access_labels,
        metadata=source_doc.metadata,
        chunk_count=len(doc.chunks),
    )


@dataclass
class ChangeReport:
    """What one batch of stream changes did; ``errors`` maps message ids to errors."""

    added: int = 0
    changed: int = 0
    unchanged: int = 0
    stale: int = 0
    deleted: int = 0
    chunks_written: int = 0
    errors: dict[str, str] = field(default_factory=dict)


def apply_changes(
    changes: list[Change],
    pipeline: Pipeline,
    catalog: Catalog,
    index: VectorIndex,
    generation: Generation,
) -> ChangeReport:
    """Write a batch of stream changes (one per document) to one generation.

    The writes follow the same crash-safe order as :func:`sync_source`, so a
    process killed half way leaves the last good state queryable and the
    next :func:`recover` cleans up. Applying a batch again changes nothing:
    an upsert whose content is already indexed is skipped, a delete of a
    missing document does nothing, and an event older (by stream position)
    than the indexed version is ignored. A document that cannot be parsed is
    recorded as failed and its message id returned in ``errors``; the other
    changes are written.
    """
    report = ChangeReport()
    if not changes:
        return report
    gen_id = generation.id
    by_source: dict[str, list[str]] = {}
    for change in changes:
        source = change.document.source if isinstance(change, Upsert) else change.source
        by_source.setdefault(source, []).append(change.doc_id)
    states: dict[str, DocumentState] = {}
    for source, doc_ids in by_source.items():
        states.update(catalog.document_states(gen_id, source, doc_ids))
    indexed = {d for d, s in states.items() if s.status == "indexed"}
    sync = SyncReport("stream", generation.collection, gen_id)
    writer = _Writer(pipeline, catalog, index, generation, sync, 1 << 30, indexed)
    deletes: list[str] = []
    for change in changes:
        state = states.get(change.doc_id)
        if state is not None and _older(change.delivery.order, state.version):
            report.stale += 1  # a late redelivery of an older event
            continue
        if isinstance(change, Delete):
            if state is not None:
                deletes.append(change.doc_id)
            continue
        document = change.document
        content_hash = document.content_hash
        if (
            state is not None
            and state.status == "indexed"
            and state.content_hash == content_hash
        ):
            report.unchanged += 1
            if state.version != document.version:
                writer.handle(_Touch(document.doc_id, document.version))
            continue
        try:
            writer.handle(pipeline.prepare(document, content_hash))
        except DocumentError as err:
            report.errors[change.delivery.message_id] = str(err)
            writer.handle(
                _Failure(
                    document.doc_id,
                    document.source,
                    document.key,
                    document.uri,
                    str(err),
                    content_hash,
                )
            )
    writer.flush()
    if deletes:
        retired = catalog.begin_delete_documents(gen_id, deletes)
        _failpoint("after_delete_mark")
        _remove_vectors(catalog, index, gen_id, retired, "after_delete_index")
        report.deleted = len(deletes)
    report.added, report.changed = sync.added, sync.changed
    report.chunks_written = sync.chunks_written
    return report


def _older(position: str, indexed_version: str | None) -> bool:
    """Whether an event comes before the indexed version in its stream.

    Deletes are checked too: a late redelivery of an old delete must not
    remove the document a newer upsert wrote.
    """
    return bool(position and indexed_version and position < indexed_version)
