"""Dense retrieval: embed the query, search the live generation, join the catalog."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from index.catalog import Catalog, Generation
from index.vectors.base import VectorIndex
from ingestion.embedding import Embedder

__all__ = ["DenseRetriever", "SearchHit"]

# Extra candidates fetched so that vectors hidden by the catalog (a write in
# progress) do not leave a result list short.
_OVERFETCH = 16


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A passage found for a query, with what a caller shows or cites."""

    uri: str
    doc_id: str
    chunk_id: str
    score: float
    text: str
    title: str | None
    heading_path: tuple[str, ...]
    modified_at: datetime | None
    indexed_at: datetime | None


class DenseRetriever:
    """Nearest passages by embedding similarity in one generation of a collection."""

    def __init__(
        self,
        catalog: Catalog,
        index: VectorIndex,
        generation: Generation,
        embedder: Embedder,
    ) -> None:
        self._catalog = catalog
        self._index = index
        self._generation = generation
        self._embedder = embedder

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """The ``k`` passages most similar to ``query``, best first."""
        vector = self._embedder.embed([query])
        hits = self._index.search(vector, k + _OVERFETCH)[0]
        records = self._catalog.live_chunks(self._generation.id, [h.id for h in hits])
        results: list[SearchHit] = []
        for hit in hits:
            record = records.get(hit.id)
            if record is None:
                continue
            results.append(
                SearchHit(
                    uri=record.uri,
                    doc_id=record.doc_id,
                    chunk_id=record.chunk_id,
                    score=hit.score,
                    text=record.text,
                    title=record.title,
                    heading_path=record.heading_path,
                    modified_at=record.modified_at,
                    indexed_at=record.indexed_at,
                )
            )
            if len(results) == k:
                break
        return results
