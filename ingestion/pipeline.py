"""The document pipeline: parse, chunk and embed, and the fingerprint of its settings.

The fingerprint names everything that changes what the index would hold for
the same documents: the embedding model, the chunking settings and the parser
version. Chunks made under different fingerprints must never share an index
generation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .chunking import CHUNKER_VERSION, Chunker, embedding_text
from .config import ChunkingConfig
from .embedding import Embedder, VectorArray
from .errors import DocumentTooLarge
from .models import Chunk, ParsedDocument, SourceDocument
from .parsing import PARSER_VERSION, parse

__all__ = ["Pipeline", "PreparedDocument"]


@dataclass(frozen=True, slots=True)
class PreparedDocument:
    """A parsed and chunked document, ready to be embedded and written."""

    document: SourceDocument
    content_hash: str
    parsed: ParsedDocument
    chunks: list[Chunk]


class Pipeline:
    """Parses, chunks and embeds documents with one set of settings."""

    def __init__(
        self, embedder: Embedder, chunking: ChunkingConfig, *, max_document_bytes: int
    ) -> None:
        self.embedder = embedder
        self.chunking = chunking
        self.max_document_bytes = max_document_bytes
        self._chunker = Chunker(chunking, embedder.count_tokens)

    def describe(self) -> dict[str, Any]:
        """The settings that decide what the index holds (the fingerprint's input)."""
        return {
            "embedding_model": self.embedder.model_id,
            "chunking": self.chunking.model_dump(),
            "chunker_version": CHUNKER_VERSION,
            "parser_version": PARSER_VERSION,
        }

    def fingerprint(self) -> str:
        canonical = json.dumps(self.describe(), sort_keys=True)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def prepare(self, document: SourceDocument, content_hash: str) -> PreparedDocument:
        """Parse and chunk one document; raises ``DocumentError`` if it cannot be read."""
        size = len(document.content)
        if size > self.max_document_bytes:
            raise DocumentTooLarge(
                f"{document.uri} is {size:,} bytes, over the limit of "
                f"{self.max_document_bytes:,}; raise max_document_bytes for the source "
                "or exclude the file."
            )
        parsed = parse(document)
        chunks = self._chunker.chunk(document.doc_id, content_hash, parsed)
        return PreparedDocument(document, content_hash, parsed, chunks)

    def embed(self, chunks: Sequence[Chunk]) -> VectorArray:
        return self.embedder.embed([embedding_text(c) for c in chunks])
