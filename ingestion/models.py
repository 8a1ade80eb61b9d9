"""The shared data models: what connectors yield and what the index stores.

A connector yields one of three things per document it lists:

* :class:`SourceDocument` — the document's current content;
* :class:`UnchangedDocument` — the connector proved, from a cheap validator
  (file size and mtime, an HTTP 304, an ``updated_at`` column), that the
  document is the version the catalog already holds, without reading it;
* :class:`FailedDocument` — the document exists but could not be read. Its
  last good version stays queryable, and the failure is recorded.

Documents a complete listing no longer yields are deleted from the index. A
connector that cannot produce a complete listing raises ``SourceError``
instead, and nothing is deleted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias

__all__ = [
    "Chunk",
    "FailedDocument",
    "Listing",
    "ParsedDocument",
    "SourceDocument",
    "UnchangedDocument",
    "make_chunk_id",
    "make_doc_id",
    "vector_id",
]


def make_doc_id(source: str, key: str) -> str:
    """The catalog-wide id of document ``key`` of source ``source``."""
    return f"{source}:{key}"


def make_chunk_id(doc_id: str, content_hash: str, seq: int) -> str:
    """A chunk id that is the same whenever the same document version is chunked.

    Deterministic ids make every index write idempotent: writing a chunk again
    after a crash overwrites it instead of adding a duplicate.
    """
    digest = hashlib.sha256(f"{doc_id}\0{content_hash}\0{seq}".encode())
    return digest.hexdigest()[:16]


def vector_id(chunk_id: str) -> int:
    """The integer id a vector index stores for a chunk (positive, 60 bits)."""
    return int(chunk_id[:15], 16)


@dataclass(frozen=True, slots=True)
class SourceDocument:
    """One document as a connector read it, before parsing.

    ``key`` is stable and unique within the source (a relative path, a URL, a
    row id). ``version`` is an opaque validator the connector can compare on
    the next run to skip reading an unchanged document.
    """

    source: str
    key: str
    uri: str
    content: bytes | str
    media_type: str
    modified_at: datetime | None = None
    title: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    access_labels: tuple[str, ...] = ()
    version: str | None = None

    @property
    def doc_id(self) -> str:
        return make_doc_id(self.source, self.key)

    @property
    def content_hash(self) -> str:
        """A hash of everything that changes what the index should hold."""
        digest = hashlib.sha256()
        raw = (
            self.content.encode("utf-8")
            if isinstance(self.content, str)
            else self.content
        )
        digest.update(raw)
        envelope = {
            "media_type": self.media_type,
            "title": self.title,
            "uri": self.uri,
            "labels": sorted(self.access_labels),
            "metadata": self.metadata,
        }
        digest.update(json.dumps(envelope, sort_keys=True, default=str).encode("utf-8"))
        return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class UnchangedDocument:
    """A document the connector knows is unchanged since the last sync."""

    source: str
    key: str

    @property
    def doc_id(self) -> str:
        return make_doc_id(self.source, self.key)


@dataclass(frozen=True, slots=True)
class FailedDocument:
    """A document that exists at the source but could not be read."""

    source: str
    key: str
    uri: str
    error: str

    @property
    def doc_id(self) -> str:
        return make_doc_id(self.source, self.key)


Listing: TypeAlias = SourceDocument | UnchangedDocument | FailedDocument


@dataclass(frozen=True, slots=True)
class ParsedDocument:
    """The clean text of a document, Markdown-flavoured.

    Headings are kept as Markdown ``#`` lines whatever the input format, so
    the chunker can follow the document's structure.
    """

    text: str
    title: str | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """A passage of a document: the unit that is embedded, indexed and cited.

    ``start`` and ``end`` are character offsets into the parsed text;
    ``heading_path`` is the chain of headings the passage sits under.
    """

    chunk_id: str
    doc_id: str
    seq: int
    text: str
    start: int
    end: int
    heading_path: tuple[str, ...] = ()
    token_count: int = 0

    @property
    def text_hash(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()
