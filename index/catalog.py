"""The catalog: what the index holds and how fresh it is, in a SQL database.

SQLite in the data folder by default; PostgreSQL (or any SQLAlchemy database)
by URL. The catalog is the source of truth for what is *visible*: a vector in
an index is served only when its chunk row here is ``live``. That is what
makes index writes crash-safe without a transaction spanning two stores:

1. new chunks are recorded as ``pending`` before their vectors are written;
2. vectors are written and flushed;
3. one transaction marks the new chunks ``live``, the replaced ones
   ``deleting``, and records the document's new hash;
4. the replaced vectors are removed and flushed;
5. the ``deleting`` rows are purged.

A crash between any two steps leaves ``pending`` or ``deleting`` rows, which
:meth:`Catalog.interrupted_writes` reports and the next sync cleans up; the
document's hash is only updated in step 3, so the next sync redoes a document
whose write did not complete.

The lexical (full-text) index of the chunks lives in the same database and
changes in the same transactions as the chunk rows; :mod:`index.lexical`
describes it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from ingestion.errors import CatalogError, GenerationError, NotFound
from ingestion.models import Chunk

from .lexical import LexicalIndex, drop_common_terms, lexical_index_for, query_terms

__all__ = [
    "Catalog",
    "ChunkRecord",
    "DocumentRecord",
    "DocumentState",
    "DocumentView",
    "Generation",
    "SourceStatus",
    "StreamProgress",
    "SyncRun",
    "utcnow",
]

logger = logging.getLogger(__name__)

VectorArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]

_BATCH = 500  # rows per IN (...) list, safely under every database's limit
# Word counts of lexical search: how long one is trusted, and how many are kept.
_COUNTS_TTL = 300.0
_COUNTS_CACHE_SIZE = 100_000


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


metadata = sa.MetaData()

generations = sa.Table(
    "generations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("collection", sa.String(64), nullable=False, index=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("pipeline", sa.Text, nullable=False),
    sa.Column("backend", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("built_at", sa.DateTime(timezone=True)),
    sa.Column("promoted_at", sa.DateTime(timezone=True)),
)

aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("collection", sa.String(64), primary_key=True),
    sa.Column(
        "generation_id", sa.Integer, sa.ForeignKey("generations.id"), nullable=False
    ),
    sa.Column("previous_generation_id", sa.Integer, sa.ForeignKey("generations.id")),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

documents = sa.Table(
    "documents",
    metadata,
    sa.Column("generation_id", sa.Integer, primary_key=True),
    sa.Column("doc_id", sa.String(1024), primary_key=True),
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("key", sa.String(1024), nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("title", sa.Text),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("content_hash", sa.String(64)),
    sa.Column("version", sa.String(256)),
    sa.Column("modified_at", sa.DateTime(timezone=True)),
    sa.Column("indexed_at", sa.DateTime(timezone=True)),
    sa.Column("chunk_count", sa.Integer, nullable=False, default=0),
    sa.Column("access_labels", sa.Text, nullable=False, default="[]"),
    sa.Column("metadata", sa.Text, nullable=False, default="{}"),
    sa.Column("error", sa.Text),
    sa.Column("error_hash", sa.String(64)),
    sa.Column("error_at", sa.DateTime(timezone=True)),
    sa.Index("ix_documents_source", "generation_id", "source"),
)

chunks = sa.Table(
    "chunks",
    metadata,
    sa.Column("generation_id", sa.Integer, primary_key=True),
    sa.Column("chunk_id", sa.String(32), primary_key=True),
    sa.Column("vector_id", sa.BigInteger, nullable=False),
    sa.Column("doc_id", sa.String(1024), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("start", sa.Integer, nullable=False),
    sa.Column("end", sa.Integer, nullable=False),
    sa.Column("heading_path", sa.Text, nullable=False, default="[]"),
    sa.Column("token_count", sa.Integer, nullable=False, default=0),
    sa.Index("ix_chunks_vector", "generation_id", "vector_id", unique=True),
    sa.Index("ix_chunks_doc", "generation_id", "doc_id"),
    sa.Index("ix_chunks_state", "generation_id", "state"),
)

sources = sa.Table(
    "sources",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("collection", sa.String(64), nullable=False),
    sa.Column("type", sa.String(256), nullable=False),
    sa.Column("config_hash", sa.String(64)),
    sa.Column("last_success_at", sa.DateTime(timezone=True)),
    sa.Column("last_run_id", sa.Integer),
)

sync_runs = sa.Table(
    "sync_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("source", sa.String(64), nullable=False, index=True),
    sa.Column("generation_id", sa.Integer, nullable=False),
    sa.Column("full", sa.Boolean, nullable=False, default=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("seen", sa.Integer, nullable=False, default=0),
    sa.Column("added", sa.Integer, nullable=False, default=0),
    sa.Column("changed", sa.Integer, nullable=False, default=0),
    sa.Column("unchanged", sa.Integer, nullable=False, default=0),
    sa.Column("deleted", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    sa.Column("chunks_written", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text),
)

stream_progress = sa.Table(
    "stream_progress",
    metadata,
    sa.Column("source", sa.String(64), primary_key=True),
    # When the stream accepted the newest event that is now queryable.
    sa.Column("last_event_at", sa.DateTime(timezone=True)),
    sa.Column("last_commit_at", sa.DateTime(timezone=True)),
    # Event-to-queryable seconds of the last batch: its slowest and its median event.
    sa.Column("last_lag_max_s", sa.Float),
    sa.Column("last_lag_p50_s", sa.Float),
    sa.Column("events_applied", sa.BigInteger, nullable=False, default=0),
    sa.Column("events_dead_lettered", sa.BigInteger, nullable=False, default=0),
)

embeddings = sa.Table(
    "embeddings",
    metadata,
    sa.Column("model", sa.String(256), primary_key=True),
    sa.Column("text_hash", sa.String(64), primary_key=True),
    sa.Column("vector", sa.LargeBinary, nullable=False),
)


@dataclass(frozen=True, slots=True)
class Generation:
    """One complete, immutable build of a collection's index."""

    id: int
    collection: str
    fingerprint: str
    pipeline: dict[str, Any]
    backend: str
    state: str
    created_at: datetime
    built_at: datetime | None
    promoted_at: datetime | None

    @property
    def index_name(self) -> str:
        return f"{self.collection}-g{self.id}"


@dataclass(frozen=True, slots=True)
class DocumentState:
    """What the catalog knows of a document, for change detection."""

    doc_id: str
    key: str
    status: str
    content_hash: str | None
    version: str | None
    error_hash: str | None


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    """A document version that was just indexed, to be recorded."""

    doc_id: str
    source: str
    key: str
    uri: str
    title: str | None
    content_hash: str
    version: str | None
    modified_at: datetime | None
    access_labels: tuple[str, ...]
    metadata: Mapping[str, Any]
    chunk_count: int


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """A live chunk with what a search result needs about its document."""

    chunk_id: str
    vector_id: int
    doc_id: str
    seq: int
    text: str
    heading_path: tuple[str, ...]
    uri: str
    title: str | None
    source: str
    access_labels: tuple[str, ...]
    modified_at: datetime | None
    indexed_at: datetime | None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DocumentView:
    """What access control and filters read of a document."""

    doc_id: str
    uri: str
    source: str
    access_labels: tuple[str, ...]
    modified_at: datetime | None
    metadata: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SyncRun:
    id: int
    source: str
    generation_id: int
    full: bool
    started_at: datetime
    finished_at: datetime | None
    status: str
    seen: int
    added: int
    changed: int
    unchanged: int
    deleted: int
    failed: int
    chunks_written: int
    error: str | None


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """Freshness of one source: its last successful sync and what it found."""

    name: str
    collection: str
    type: str
    last_success_at: datetime | None
    last_run: SyncRun | None
    documents: int
    failed_documents: int
    stream: StreamProgress | None = None


@dataclass(frozen=True, slots=True)
class StreamProgress:
    """How a streaming source keeps up: the lag of its last committed batch."""

    last_event_at: datetime | None
    last_commit_at: datetime | None
    last_lag_max_s: float | None
    last_lag_p50_s: float | None
    events_applied: int
    events_dead_lettered: int


class Catalog:
    """The catalog database. Thread-safe; one instance per process is enough."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        try:
            self._engine = _create_engine(url, echo=echo)
            metadata.create_all(self._engine)
            self._lexical: LexicalIndex = lexical_index_for(
                self._engine.dialect.name, chunks
            )
            # (generation, term) -> (chunks holding it, when counted); "" is the total.
            self._counts_cache: dict[tuple[int, str], tuple[int, float]] = {}
            with self._engine.begin() as conn:
                self._lexical.prepare(conn)
        except SQLAlchemyError as err:
            raise CatalogError(
                f"Could not open the catalog database {_masked(url)}: {err.__class__.__name__}: "
                f"{_first_line(err)}. Check catalog.url and that the database is running."
            ) from err

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except SQLAlchemyError as err:
            raise CatalogError(
                f"Catalog operation failed on {_masked(self.url)}: {_first_line(err)}"
            ) from err

    # -- generations and aliases -------------------------------------------

    def create_generation(
        self,
        collection: str,
        fingerprint: str,
        pipeline: Mapping[str, Any],
        backend: str,
        *,
        state: str = "building",
    ) -> Generation:
        with self._tx() as conn:
            result = conn.execute(
                generations.insert().values(
                    collection=collection,
                    fingerprint=fingerprint,
                    pipeline=json.dumps(pipeline, sort_keys=True),
                    backend=backend,
                    state=state,
                    created_at=utcnow(),
                )
            )
            new_id = int(result.inserted_primary_key[0])  # type: ignore[index]
        return self.generation(new_id)

    def generation(self, generation_id: int) -> Generation:
        with self._tx() as conn:
            row = conn.execute(
                generations.select().where(generations.c.id == generation_id)
            ).first()
        if row is None:
            raise NotFound(
                f"Generation {generation_id} does not exist; `ragline index list` shows them."
            )
        return _generation(row)

    def generations(self, collection: str | None = None) -> list[Generation]:
        query = generations.select().order_by(generations.c.id)
        if collection is not None:
            query = query.where(generations.c.collection == collection)
        with self._tx() as conn:
            return [_generation(row) for row in conn.execute(query)]

    def set_generation_state(self, generation_id: int, state: str) -> None:
        values: dict[str, Any] = {"state": state}
        if state == "ready":
            values["built_at"] = utcnow()
        with self._tx() as conn:
            conn.execute(
                generations.update()
                .where(generations.c.id == generation_id)
                .values(**values)
            )

    def live_generation(self, collection: str) -> Generation | None:
        with self._tx() as conn:
            gen_id = conn.execute(
                sa.select(aliases.c.generation_id).where(
                    aliases.c.collection == collection
                )
            ).scalar()
        return None if gen_id is None else self.generation(int(gen_id))

    def promote(self, collection: str, generation_id: int) -> Generation | None:
        """Point the collection's alias at a generation, in one transaction.

        Returns the generation that was live before, now ``retired`` and kept
        for rollback.
        """
        with self._tx() as conn:
            target = conn.execute(
                generations.select().where(generations.c.id == generation_id)
            ).first()
            if target is None or target.collection != collection:
                raise NotFound(
                    f"Generation {generation_id} is not a generation of collection "
                    f"{collection!r}; `ragline index list` shows them."
                )
            if target.state not in ("ready", "retired", "rolled_back", "live"):
                raise GenerationError(
                    f"Generation {generation_id} is {target.state}, not ready; only a "
                    "completed build can be promoted."
                )
            current = conn.execute(
                sa.select(aliases.c.generation_id).where(
                    aliases.c.collection == collection
                )
            ).scalar()
            if current == generation_id:
                return None
            now = utcnow()
            if current is None:
                conn.execute(
                    aliases.insert().values(
                        collection=collection,
                        generation_id=generation_id,
                        updated_at=now,
                    )
                )
            else:
                conn.execute(
                    aliases.update()
                    .where(aliases.c.collection == collection)
                    .values(
                        generation_id=generation_id,
                        previous_generation_id=current,
                        updated_at=now,
                    )
                )
                conn.execute(
                    generations.update()
                    .where(generations.c.id == current)
                    .values(state="retired")
                )
            conn.execute(
                generations.update()
                .where(generations.c.id == generation_id)
                .values(state="live", promoted_at=now)
            )
        return None if current is None else self.generation(int(current))

    def rollback(self, collection: str) -> tuple[Generation, Generation]:
        """Point the alias back at the previously live generation.

        Returns (rolled back from, now live).
        """
        with self._tx() as conn:
            alias = conn.execute(
                aliases.select().where(aliases.c.collection == collection)
            ).first()
            if alias is None or alias.previous_generation_id is None:
                raise GenerationError(
                    f"Collection {collection!r} has no previous generation to roll back to."
                )
            previous = conn.execute(
                generations.select().where(
                    generations.c.id == alias.previous_generation_id
                )
            ).first()
            if previous is None or previous.state not in ("retired", "ready"):
                raise GenerationError(
                    f"The previous generation of {collection!r} can no longer be served."
                )
            now = utcnow()
            conn.execute(
                aliases.update()
                .where(aliases.c.collection == collection)
                .values(
                    generation_id=alias.previous_generation_id,
                    previous_generation_id=alias.generation_id,
                    updated_at=now,
                )
            )
            conn.execute(
                generations.update()
                .where(generations.c.id == alias.generation_id)
                .values(state="rolled_back")
            )
            conn.execute(
                generations.update()
                .where(generations.c.id == alias.previous_generation_id)
                .values(state="live", promoted_at=now)
            )
        return self.generation(alias.generation_id), self.generation(
            alias.previous_generation_id
        )

    def aliases(self) -> dict[str, int]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(aliases.c.collection, aliases.c.generation_id)
            )
            return {row.collection: int(row.generation_id) for row in rows}

    # -- documents -----------------------------------------------------------

    def document_states(
        self, generation_id: int, source: str, doc_ids: Sequence[str] | None = None
    ) -> dict[str, DocumentState]:
        """Per document of a source (or only ``doc_ids`` of it): status, hash, version."""
        if doc_ids is not None:
            found: dict[str, DocumentState] = {}
            for batch in _batched(list(doc_ids)):
                found.update(self._document_states(generation_id, source, batch))
            return found
        return self._document_states(generation_id, source, None)

    def _document_states(
        self, generation_id: int, source: str, doc_ids: Sequence[str] | None
    ) -> dict[str, DocumentState]:
        query = sa.select(
            documents.c.doc_id,
            documents.c.key,
            documents.c.status,
            documents.c.content_hash,
            documents.c.version,
            documents.c.error_hash,
        ).where(
            documents.c.generation_id == generation_id, documents.c.source == source
        )
        if doc_ids is not None:
            query = query.where(documents.c.doc_id.in_(doc_ids))
        with self._tx() as conn:
            return {
                row.doc_id: DocumentState(
                    row.doc_id,
                    row.key,
                    row.status,
                    row.content_hash,
                    row.version,
                    row.error_hash,
                )
                for row in conn.execute(query)
            }

    def record_failure(
        self,
        generation_id: int,
        *,
        doc_id: str,
        source: str,
        key: str,
        uri: str,
        error: str,
        error_hash: str | None,
    ) -> None:
        """Record that a document could not be read or parsed.

        A document indexed before keeps its last good version live; one never
        indexed is recorded with status ``failed`` so it shows up in reports.
        """
        now = utcnow()
        with self._tx() as conn:
            updated = conn.execute(
                documents.update()
                .where(
                    documents.c.generation_id == generation_id,
                    documents.c.doc_id == doc_id,
                )
                .values(error=error, error_hash=error_hash, error_at=now)
            ).rowcount
            if not updated:
                conn.execute(
                    documents.insert().values(
                        generation_id=generation_id,
                        doc_id=doc_id,
                        source=source,
                        key=key,
                        uri=uri,
                        status="failed",
                        chunk_count=0,
                        access_labels="[]",
                        metadata="{}",
                        error=error,
                        error_hash=error_hash,
                        error_at=now,
                    )
                )

    def update_versions(
        self, generation_id: int, versions: Mapping[str, str | None]
    ) -> None:
        """Record new validators for documents whose content did not change."""
        with self._tx() as conn:
            for doc_id, version in versions.items():
                conn.execute(
                    documents.update()
                    .where(
                        documents.c.generation_id == generation_id,
                        documents.c.doc_id == doc_id,
                    )
                    .values(version=version)
                )

    # -- the crash-safe write protocol ------------------------------------

    def stage_chunks(self, generation_id: int, new_chunks: Sequence[Chunk]) -> None:
        """Step 1: record chunks about to be written to the index as ``pending``.

        A chunk id that already exists (the same document version chunked
        again) is left as it is.
        """
        if not new_chunks:
            return
        with self._tx() as conn:
            self._lexical.ensure(conn, generation_id)
            existing = _existing_chunk_ids(
                conn, generation_id, [c.chunk_id for c in new_chunks]
            )
            rows = [
                _chunk_row(generation_id, chunk, "pending")
                for chunk in new_chunks
                if chunk.chunk_id not in existing
            ]
            if rows:
                conn.execute(chunks.insert(), rows)
                self._lexical.add(
                    conn, generation_id, [(r["vector_id"], r["text"]) for r in rows]
                )

    def commit_documents(
        self,
        generation_id: int,
        records: Sequence[DocumentRecord],
        chunk_ids: Mapping[str, Sequence[str]],
    ) -> list[int]:
        """Step 3: make new chunks live, retire replaced ones, record the documents.

        ``chunk_ids`` maps each document to the ids of all its current chunks.
        Returns the vector ids now ``deleting``, to be removed from the index.
        """
        now = utcnow()
        retired: list[int] = []
        with self._tx() as conn:
            for batch in _batched(list(records)):
                retired.extend(_swap_chunks(conn, generation_id, batch, chunk_ids))
                _upsert_documents(conn, generation_id, batch, now)
        return retired

    def begin_delete_documents(
        self, generation_id: int, doc_ids: Sequence[str]
    ) -> list[int]:
        """Hide documents and mark their chunks ``deleting``; returns their vector ids."""
        retired: list[int] = []
        with self._tx() as conn:
            for batch in _batched(doc_ids):
                where = sa.and_(
                    chunks.c.generation_id == generation_id, chunks.c.doc_id.in_(batch)
                )
                retired.extend(
                    int(v)
                    for v in conn.execute(
                        sa.select(chunks.c.vector_id).where(where)
                    ).scalars()
                )
                conn.execute(chunks.update().where(where).values(state="deleting"))
                conn.execute(
                    documents.delete().where(
                        documents.c.generation_id == generation_id,
                        documents.c.doc_id.in_(batch),
                    )
                )
        return retired

    def purge_chunks(
        self, generation_id: int, vector_ids: Sequence[int], state: str
    ) -> None:
        """Step 5 (and recovery): drop chunk rows in ``state`` by vector id."""
        with self._tx() as conn:
            for batch in _batched([int(v) for v in vector_ids]):
                where = sa.and_(
                    chunks.c.generation_id == generation_id,
                    chunks.c.state == state,
                    chunks.c.vector_id.in_(batch),
                )
                doomed = sa.select(chunks.c.vector_id).where(where)
                self._lexical.remove(conn, generation_id, doomed)
                conn.execute(chunks.delete().where(where))

    def interrupted_writes(self, generation_id: int) -> tuple[list[int], list[int]]:
        """Vector ids of chunks left ``pending`` and ``deleting`` by an interrupted run."""
        query = sa.select(chunks.c.vector_id, chunks.c.state).where(
            chunks.c.generation_id == generation_id, chunks.c.state != "live"
        )
        pending: list[int] = []
        deleting: list[int] = []
        with self._tx() as conn:
            for vid, state in conn.execute(query):
                (pending if state == "pending" else deleting).append(int(vid))
        return pending, deleting

    # -- reads -------------------------------------------------------------

    def all_vector_ids(self, generation_id: int, state: str | None = "live") -> IdArray:
        query = sa.select(chunks.c.vector_id).where(
            chunks.c.generation_id == generation_id
        )
        if state is not None:
            query = query.where(chunks.c.state == state)
        with self._tx() as conn:
            return np.fromiter(conn.execute(query).scalars(), dtype=np.int64)

    def live_chunks(
        self, generation_id: int, vector_ids: Sequence[int]
    ) -> dict[int, ChunkRecord]:
        """Live chunks by vector id, joined with their documents."""
        found: dict[int, ChunkRecord] = {}
        join = chunks.join(
            documents,
            sa.and_(
                documents.c.generation_id == chunks.c.generation_id,
                documents.c.doc_id == chunks.c.doc_id,
            ),
        )
        with self._tx() as conn:
            for batch in _batched([int(v) for v in vector_ids]):
                query = (
                    sa.select(
                        chunks.c.chunk_id,
                        chunks.c.vector_id,
                        chunks.c.doc_id,
                        chunks.c.seq,
                        chunks.c.text,
                        chunks.c.heading_path,
                        documents.c.uri,
                        documents.c.title,
                        documents.c.source,
                        documents.c.access_labels,
                        documents.c.modified_at,
                        documents.c.indexed_at,
                        documents.c.metadata,
                    )
                    .select_from(join)
                    .where(
                        chunks.c.generation_id == generation_id,
                        chunks.c.state == "live",
                        chunks.c.vector_id.in_(batch),
                    )
                )
                for row in conn.execute(query):
                    found[int(row.vector_id)] = _chunk_record(row)
        return found

    def visible_vector_ids(
        self, generation_id: int, visible: Callable[[DocumentView], bool]
    ) -> IdArray:
        """Vector ids of the live chunks of every document ``visible`` accepts.

        ``visible`` judges documents, not chunks (access labels and filters
        belong to the document), so it runs once per document; the ids come
        back sorted, ready to restrict a vector search.
        """
        doc_query = sa.select(
            documents.c.doc_id,
            documents.c.uri,
            documents.c.source,
            documents.c.access_labels,
            documents.c.modified_at,
            documents.c.metadata,
        ).where(documents.c.generation_id == generation_id)
        with self._tx() as conn:
            allowed = [
                row.doc_id
                for row in conn.execute(doc_query)
                if visible(_document_view(row))
            ]
            ids: list[int] = []
            for batch in _batched(allowed):
                ids.extend(
                    int(v)
                    for v in conn.execute(
                        sa.select(chunks.c.vector_id).where(
                            chunks.c.generation_id == generation_id,
                            chunks.c.state == "live",
                            chunks.c.doc_id.in_(batch),
                        )
                    ).scalars()
                )
        return np.asarray(sorted(ids), dtype=np.int64)

    def document_versions(
        self, generation_id: int, doc_ids: Sequence[str]
    ) -> dict[str, str | None]:
        """The content hash of each document in a generation; None when it is gone."""
        found: dict[str, str | None] = dict.fromkeys(doc_ids)
        with self._tx() as conn:
            for batch in _batched(list(dict.fromkeys(doc_ids))):
                rows = conn.execute(
                    sa.select(documents.c.doc_id, documents.c.content_hash).where(
                        documents.c.generation_id == generation_id,
                        documents.c.doc_id.in_(batch),
                    )
                )
                for row in rows:
                    found[row.doc_id] = row.content_hash
        return found

    def lexical_search(
        self,
        generation_id: int,
        query: str,
        k: int,
        *,
        common_share: float = 1.0,
        common_min_chunks: int = 0,
    ) -> list[tuple[int, float]]:
        """The ``k`` live chunks of a generation that best match ``query`` in words.

        Returns (vector id, score), best first; a higher score is a better
        match, comparable only within one result list. ``query`` is free text:
        a chunk matches when it holds any of the query's words (stemmed, so
        ``caching`` finds ``cached``); common English words are ignored, and a
        query with no other words, or ``k`` below 1, returns [].

        In a generation of at least ``common_min_chunks`` chunks, words held
        by more than ``common_share`` of them are left out while rarer words
        remain (see :func:`~index.lexical.drop_common_terms`). The counts are
        cached for a few minutes per generation and word.
        """
        terms = query_terms(query)
        if not terms or k < 1:
            return []
        with self._tx() as conn:
            self._lexical.ensure(conn, generation_id)
            if common_share < 1.0 and len(terms) > 1:
                total, counts = self._term_counts(conn, generation_id, terms)
                terms = drop_common_terms(
                    terms, counts, total, common_share, common_min_chunks
                )
            return self._lexical.search(conn, generation_id, terms, k)

    def _term_counts(
        self, conn: Connection, generation_id: int, terms: list[str]
    ) -> tuple[int, list[int]]:
        """(chunks, chunks holding each term), from the cache where it is fresh."""
        now = time.monotonic()
        cache = self._counts_cache
        if len(cache) > _COUNTS_CACHE_SIZE:
            cache.clear()
        wanted = [(generation_id, t) for t in ["", *terms]]
        missing = [
            key for key in wanted if now - cache.get(key, (0, -1e9))[1] > _COUNTS_TTL
        ]
        if missing:
            total, counts = self._lexical.counts(
                conn, generation_id, [t for _, t in missing if t]
            )
            fresh = dict(zip([t for _, t in missing if t], counts, strict=True))
            fresh[""] = total
            for _, term in missing:
                cache[(generation_id, term)] = (fresh[term], now)
        values = [cache[key][0] for key in wanted]
        return values[0], values[1:]

    def rebuild_lexical(self, generation_id: int) -> int:
        """Rebuild a generation's lexical index from its chunk rows, in one transaction.

        Returns the number of chunks indexed. Needed only when
        :meth:`integrity_problems` reports that the two disagree; the next
        :meth:`start_run` does it too. On PostgreSQL the index is a generated
        column that cannot disagree, and there is nothing to rebuild.
        """
        with self._tx() as conn:
            indexed = self._lexical.rebuild(conn, generation_id)
        logger.info(
            "rebuilt the lexical index: generation=%s chunks=%d", generation_id, indexed
        )
        return indexed

    def integrity_problems(self, generation_id: int) -> list[str]:
        """Problems visible in the catalog alone, its lexical index included.

        The vector index is compared with the catalog by the caller.
        """
        problems: list[str] = []
        with self._tx() as conn:
            duplicates = conn.execute(
                sa.select(chunks.c.doc_id, chunks.c.seq, sa.func.count())
                .where(
                    chunks.c.generation_id == generation_id, chunks.c.state == "live"
                )
                .group_by(chunks.c.doc_id, chunks.c.seq)
                .having(sa.func.count() > 1)
                .limit(20)
            ).all()
            problems += [
                f"document {d} has {n} live chunks at position {s}"
                for d, s, n in duplicates
            ]
            live_counts = (
                sa.select(chunks.c.doc_id, sa.func.count().label("n"))
                .where(
                    chunks.c.generation_id == generation_id, chunks.c.state == "live"
                )
                .group_by(chunks.c.doc_id)
                .subquery()
            )
            mismatched = conn.execute(
                sa.select(documents.c.doc_id, documents.c.chunk_count, live_counts.c.n)
                .select_from(
                    documents.outerjoin(
                        live_counts, live_counts.c.doc_id == documents.c.doc_id
                    )
                )
                .where(
                    documents.c.generation_id == generation_id,
                    documents.c.status == "indexed",
                    sa.func.coalesce(live_counts.c.n, 0) != documents.c.chunk_count,
                )
                .limit(20)
            ).all()
            problems += [
                f"document {d} should have {want} live chunks but has {have or 0}"
                for d, want, have in mismatched
            ]
            orphans = (
                conn.execute(
                    sa.select(chunks.c.doc_id)
                    .select_from(
                        chunks.outerjoin(
                            documents,
                            sa.and_(
                                documents.c.generation_id == chunks.c.generation_id,
                                documents.c.doc_id == chunks.c.doc_id,
                            ),
                        )
                    )
                    .where(
                        chunks.c.generation_id == generation_id,
                        chunks.c.state == "live",
                        documents.c.doc_id.is_(None),
                    )
                    .distinct()
                    .limit(20)
                )
                .scalars()
                .all()
            )
            problems += [
                f"live chunks of document {d}, which is not in the catalog"
                for d in orphans
            ]
            lexical = self._lexical.mismatch(conn, generation_id)
            if lexical is not None:
                problems.append(
                    f"the lexical index holds {lexical[0]} chunks but the catalog has "
                    f"{lexical[1]}; the next `ragline ingest` rebuilds it"
                )
        pending, deleting = self.interrupted_writes(generation_id)
        if pending or deleting:
            problems.append(
                f"an interrupted write left {len(pending)} pending and {len(deleting)} "
                "deleting chunks; the next `ragline ingest` completes it"
            )
        return problems

    def counts(self, generation_id: int) -> tuple[int, int]:
        """(indexed documents, live chunks) of a generation."""
        with self._tx() as conn:
            docs = conn.execute(
                sa.select(sa.func.count()).where(
                    documents.c.generation_id == generation_id,
                    documents.c.status == "indexed",
                )
            ).scalar_one()
            live = conn.execute(
                sa.select(sa.func.count()).where(
                    chunks.c.generation_id == generation_id, chunks.c.state == "live"
                )
            ).scalar_one()
        return int(docs), int(live)

    # -- sources and sync runs -------------------------------------------

    def register_source(
        self, name: str, collection: str, type_name: str, config_hash: str
    ) -> bool:
        """Record a source and its settings; True when its settings changed since last time."""
        with self._tx() as conn:
            previous = conn.execute(
                sa.select(sources.c.config_hash).where(sources.c.name == name)
            ).first()
            values = {
                "collection": collection,
                "type": type_name,
                "config_hash": config_hash,
            }
            if previous is None:
                conn.execute(sources.insert().values(name=name, **values))
                return False
            conn.execute(
                sources.update().where(sources.c.name == name).values(**values)
            )
            return previous.config_hash != config_hash

    def start_run(self, source: str, generation_id: int, *, full: bool) -> int:
        """Record the start of a sync run; returns its id.

        Also brings the generation's lexical index in line with its chunk
        rows, building it when missing and rebuilding it when the two
        disagree, so every ingest repairs what ``ragline index verify`` found.
        """
        with self._tx() as conn:
            self._lexical.ensure(conn, generation_id)
            mismatch = self._lexical.mismatch(conn, generation_id)
            if mismatch is not None:
                self._lexical.rebuild(conn, generation_id)
                logger.warning(
                    "rebuilt the lexical index: generation=%s indexed=%d chunks=%d",
                    generation_id,
                    *mismatch,
                )
            # A run still marked running belongs to a process that died.
            conn.execute(
                sync_runs.update()
                .where(sync_runs.c.source == source, sync_runs.c.status == "running")
                .values(status="interrupted", finished_at=utcnow())
            )
            result = conn.execute(
                sync_runs.insert().values(
                    source=source,
                    generation_id=generation_id,
                    full=full,
                    started_at=utcnow(),
                    status="running",
                )
            )
            return int(result.inserted_primary_key[0])  # type: ignore[index]

    def finish_run(
        self,
        run_id: int,
        *,
        status: str,
        counts: Mapping[str, int],
        error: str | None = None,
    ) -> None:
        now = utcnow()
        with self._tx() as conn:
            conn.execute(
                sync_runs.update()
                .where(sync_runs.c.id == run_id)
                .values(status=status, finished_at=now, error=error, **counts)
            )
            source = conn.execute(
                sa.select(sync_runs.c.source).where(sync_runs.c.id == run_id)
            ).scalar_one()
            values: dict[str, Any] = {"last_run_id": run_id}
            if status == "ok":
                values["last_success_at"] = now
            conn.execute(
                sources.update().where(sources.c.name == source).values(**values)
            )

    def source_status(self, generation_ids: Mapping[str, int]) -> list[SourceStatus]:
        """Freshness of every registered source; counts come from the live generations."""
        with self._tx() as conn:
            rows = conn.execute(sources.select().order_by(sources.c.name)).all()
            statuses = []
            for row in rows:
                run = None
                if row.last_run_id is not None:
                    run_row = conn.execute(
                        sync_runs.select().where(sync_runs.c.id == row.last_run_id)
                    ).first()
                    run = None if run_row is None else _sync_run(run_row)
                gen_id = generation_ids.get(row.collection)
                docs, failed = _document_counts(conn, gen_id, row.name)
                progress = conn.execute(
                    stream_progress.select().where(stream_progress.c.source == row.name)
                ).first()
                statuses.append(
                    SourceStatus(
                        name=row.name,
                        collection=row.collection,
                        type=row.type,
                        last_success_at=_aware(row.last_success_at),
                        last_run=run,
                        documents=docs,
                        failed_documents=failed,
                        stream=None if progress is None else _stream_progress(progress),
                    )
                )
        return statuses

    def record_stream_batch(
        self,
        source: str,
        *,
        newest_event_at: datetime | None,
        lag_max_s: float | None,
        lag_p50_s: float | None,
        applied: int,
        dead_lettered: int,
        caught_up: bool,
    ) -> None:
        """Record a committed batch of a streaming source.

        ``caught_up`` (the batch drained the stream) also counts as a
        successful sync: the source is fresh as of now.
        """
        now = utcnow()
        values: dict[str, Any] = {"last_commit_at": now}
        if newest_event_at is not None:
            values.update(
                last_event_at=newest_event_at,
                last_lag_max_s=lag_max_s,
                last_lag_p50_s=lag_p50_s,
            )
        with self._tx() as conn:
            updated = conn.execute(
                stream_progress.update()
                .where(stream_progress.c.source == source)
                .values(
                    events_applied=stream_progress.c.events_applied + applied,
                    events_dead_lettered=stream_progress.c.events_dead_lettered
                    + dead_lettered,
                    **values,
                )
            ).rowcount
            if not updated:
                conn.execute(
                    stream_progress.insert().values(
                        source=source,
                        events_applied=applied,
                        events_dead_lettered=dead_lettered,
                        **values,
                    )
                )
            if caught_up:
                conn.execute(
                    sources.update()
                    .where(sources.c.name == source)
                    .values(last_success_at=now)
                )

    def mark_source_fresh(self, source: str) -> None:
        """A streaming source found its stream empty: it is fresh as of now."""
        with self._tx() as conn:
            conn.execute(
                sources.update()
                .where(sources.c.name == source)
                .values(last_success_at=utcnow())
            )

    def failed_documents(
        self, generation_id: int, source: str
    ) -> list[tuple[str, str]]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(documents.c.doc_id, documents.c.error)
                .where(
                    documents.c.generation_id == generation_id,
                    documents.c.source == source,
                    documents.c.error.is_not(None),
                )
                .order_by(documents.c.doc_id)
            )
            return [(row.doc_id, row.error) for row in rows]

    # -- the embedding cache -----------------------------------------------

    def get_embeddings(
        self, model_id: str, hashes: Sequence[str]
    ) -> dict[str, VectorArray]:
        found: dict[str, VectorArray] = {}
        with self._tx() as conn:
            for batch in _batched(list(hashes)):
                rows = conn.execute(
                    sa.select(embeddings.c.text_hash, embeddings.c.vector).where(
                        embeddings.c.model == model_id,
                        embeddings.c.text_hash.in_(batch),
                    )
                )
                for text_hash, blob in rows:
                    found[text_hash] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_embeddings(self, model_id: str, vectors: Mapping[str, VectorArray]) -> None:
        if not vectors:
            return
        with self._tx() as conn:
            existing: set[str] = set()
            for batch in _batched(list(vectors)):
                existing.update(
                    conn.execute(
                        sa.select(embeddings.c.text_hash).where(
                            embeddings.c.model == model_id,
                            embeddings.c.text_hash.in_(batch),
                        )
                    ).scalars()
                )
            rows = [
                {
                    "model": model_id,
                    "text_hash": h,
                    "vector": np.asarray(v, dtype=np.float32).tobytes(),
                }
                for h, v in vectors.items()
                if h not in existing
            ]
            if rows:
                conn.execute(embeddings.insert(), rows)


# -- helpers ------------------------------------------------------------------


def _create_engine(url: str, *, echo: bool) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, echo=echo, connect_args={"timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, echo=echo, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (a serving process) run while a sync writes; FULL
    # synchronous makes every committed transaction survive a power loss.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _masked(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<invalid database URL>"


def _first_line(err: BaseException) -> str:
    return (
        str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    )


def _stream_progress(row: Any) -> StreamProgress:
    return StreamProgress(
        last_event_at=_aware(row.last_event_at),
        last_commit_at=_aware(row.last_commit_at),
        last_lag_max_s=row.last_lag_max_s,
        last_lag_p50_s=row.last_lag_p50_s,
        events_applied=int(row.events_applied or 0),
        events_dead_lettered=int(row.events_dead_lettered or 0),
    )


def _batched(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]


def _existing_chunk_ids(
    conn: Connection, generation_id: int, ids: Sequence[str]
) -> set[str]:
    existing: set[str] = set()
    for batch in _batched(ids):
        existing.update(
            conn.execute(
                sa.select(chunks.c.chunk_id).where(
                    chunks.c.generation_id == generation_id,
                    chunks.c.chunk_id.in_(batch),
                )
            ).scalars()
        )
    return existing


def _chunk_row(generation_id: int, chunk: Chunk, state: str) -> dict[str, Any]:
    from ingestion.models import vector_id

    return {
        "generation_id": generation_id,
        "chunk_id": chunk.chunk_id,
        "vector_id": vector_id(chunk.chunk_id),
        "doc_id": chunk.doc_id,
        "seq": chunk.seq,
        "state": state,
        "text": chunk.text,
        "start": chunk.start,
        "end": chunk.end,
        "heading_path": json.dumps(list(chunk.heading_path)),
        "token_count": chunk.token_count,
    }


def _swap_chunks(
    conn: Connection,
    generation_id: int,
    records: Sequence[DocumentRecord],
    chunk_ids: Mapping[str, Sequence[str]],
) -> list[int]:
    """Make the given chunks the live ones of each document; return retired vector ids.

    A few statements for the whole batch, whatever its size: the rows of all
    its documents are read at once, and the states change by vector id.
    """
    doc_ids = [r.doc_id for r in records]
    keep = {cid for d in doc_ids for cid in chunk_ids.get(d, ())}
    rows = conn.execute(
        sa.select(chunks.c.chunk_id, chunks.c.vector_id, chunks.c.state).where(
            chunks.c.generation_id == generation_id, chunks.c.doc_id.in_(doc_ids)
        )
    ).all()
    retired = [
        int(r.vector_id)
        for r in rows
        if r.chunk_id not in keep and r.state != "deleting"
    ]
    revived = [
        int(r.vector_id) for r in rows if r.chunk_id in keep and r.state != "live"
    ]
    for ids, state in ((retired, "deleting"), (revived, "live")):
        for part in _batched(ids):
            conn.execute(
                chunks.update()
                .where(
                    chunks.c.generation_id == generation_id,
                    chunks.c.vector_id.in_(part),
                )
                .values(state=state)
            )
    return retired


def _upsert_documents(
    conn: Connection,
    generation_id: int,
    records: Sequence[DocumentRecord],
    now: datetime,
) -> None:
    """Insert or update the document rows of a batch: one read, two bulk writes."""
    existing = set(
        conn.execute(
            sa.select(documents.c.doc_id).where(
                documents.c.generation_id == generation_id,
                documents.c.doc_id.in_([r.doc_id for r in records]),
            )
        ).scalars()
    )
    updates = [
        {
            "b_generation_id": generation_id,
            "b_doc_id": r.doc_id,
            **_document_values(r, now),
        }
        for r in records
        if r.doc_id in existing
    ]
    inserts = [
        {"generation_id": generation_id, "doc_id": r.doc_id, **_document_values(r, now)}
        for r in records
        if r.doc_id not in existing
    ]
    if updates:
        conn.execute(
            documents.update().where(
                documents.c.generation_id == sa.bindparam("b_generation_id"),
                documents.c.doc_id == sa.bindparam("b_doc_id"),
            ),
            updates,
        )
    if inserts:
        conn.execute(documents.insert(), inserts)


def _document_values(record: DocumentRecord, now: datetime) -> dict[str, Any]:
    return {
        "source": record.source,
        "key": record.key,
        "uri": record.uri,
        "title": record.title,
        "status": "indexed",
        "content_hash": record.content_hash,
        "version": record.version,
        "modified_at": record.modified_at,
        "indexed_at": now,
        "chunk_count": record.chunk_count,
        "access_labels": json.dumps(sorted(record.access_labels)),
        "metadata": json.dumps(dict(record.metadata), sort_keys=True, default=str),
        "error": None,
        "error_hash": None,
        "error_at": None,
    }


def _document_counts(
    conn: Connection, generation_id: int | None, source: str
) -> tuple[int, int]:
    if generation_id is None:
        return 0, 0
    rows = conn.execute(
        sa.select(documents.c.status, sa.func.count())
        .where(documents.c.generation_id == generation_id, documents.c.source == source)
        .group_by(documents.c.status)
    ).all()
    counts = {status: int(n) for status, n in rows}
    return counts.get("indexed", 0), counts.get("failed", 0)


def _generation(row: Any) -> Generation:
    return Generation(
        id=int(row.id),
        collection=row.collection,
        fingerprint=row.fingerprint,
        pipeline=json.loads(row.pipeline),
        backend=row.backend,
        state=row.state,
        created_at=_aware(row.created_at),  # type: ignore[arg-type]
        built_at=_aware(row.built_at),
        promoted_at=_aware(row.promoted_at),
    )


def _chunk_record(row: Any) -> ChunkRecord:
    return ChunkRecord(
        chunk_id=row.chunk_id,
        vector_id=int(row.vector_id),
        doc_id=row.doc_id,
        seq=int(row.seq),
        text=row.text,
        heading_path=tuple(json.loads(row.heading_path)),
        uri=row.uri,
        title=row.title,
        source=row.source,
        access_labels=tuple(json.loads(row.access_labels)),
        modified_at=_aware(row.modified_at),
        indexed_at=_aware(row.indexed_at),
        metadata=json.loads(row.metadata),
    )


def _document_view(row: Any) -> DocumentView:
    return DocumentView(
        doc_id=row.doc_id,
        uri=row.uri,
        source=row.source,
        access_labels=tuple(json.loads(row.access_labels)),
        modified_at=_aware(row.modified_at),
        metadata=json.loads(row.metadata),
    )


def _sync_run(row: Any) -> SyncRun:
    return SyncRun(
        id=int(row.id),
        source=row.source,
        generation_id=int(row.generation_id),
        full=bool(row.full),
        started_at=_aware(row.started_at),  # type: ignore[arg-type]
        finished_at=_aware(row.finished_at),
        status=row.status,
        seen=row.seen,
        added=row.added,
        changed=row.changed,
        unchanged=row.unchanged,
        deleted=row.deleted,
        failed=row.failed,
        chunks_written=row.chunks_written,
        error=row.error,
    )
