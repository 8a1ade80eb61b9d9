"""Search one generation of a collection: dense, lexical or hybrid, with filters.

A search runs in named steps:

1. *Candidates.* Dense search asks the vector index for the nearest chunks;
   lexical search asks the catalog's full-text index. Each contributes up to
   ``candidates`` chunk ids.
2. *Visibility.* The catalog's current record of every candidate is read, and
   candidates the caller may not see, or that the filters exclude, are
   dropped. When that leaves too few and more exist, the dense search is
   redone restricted to the allowed ids, and the lexical search deeper.
3. *Ranking.* Hybrid mode fuses the two lists by reciprocal rank; a
   cross-encoder may rescore the head of the list; MMR may trade relevance
   for diversity. The first ``k`` are returned.

:meth:`Retriever.plan` runs steps 1 and 2 up to the first visibility check
and :meth:`Retriever.finish` the rest, so a service can keep a cheap search
on its event loop and send only costly ones to a thread; ``search`` does both.

Only ``live`` chunks are ever returned: the catalog hides chunks of a write
in progress, so a search during an ingest sees the last committed state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from index.catalog import Catalog, ChunkRecord, Generation
from index.vectors.base import VectorArray, VectorIndex
from ingestion.embedding import Embedder
from ingestion.errors import RequestError

from .config import RetrievalConfig, SearchMode
from .filters import AccessScope, Filterable, SearchFilters
from .fusion import (
    convex_fusion,
    maximal_marginal_relevance,
    reciprocal_rank_fusion,
)
from .rerank import Reranker

__all__ = ["Retriever", "SearchHit", "SearchPlan"]

_NO_FILTERS = SearchFilters()
# How much deeper lexical search looks when filters hid too many candidates.
_LEXICAL_DEEPENING = 8
# Candidates past k that plain dense search reads, for chunks it cannot show.
_DENSE_SLACK = 16


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A passage found for a query, with what a caller shows or cites.

    ``score`` ranks the hits of one search (cosine similarity in dense mode,
    the full-text rank in lexical mode, the fused or reranked score
    otherwise); ``dense_score`` is the cosine similarity when the dense search
    found the passage, comparable across queries.
    """

    uri: str
    doc_id: str
    chunk_id: str
    score: float
    text: str
    title: str | None
    heading_path: tuple[str, ...]
    source: str
    modified_at: datetime | None
    indexed_at: datetime | None
    dense_score: float | None = None
    lexical_score: float | None = None


@dataclass
class _Candidates:
    dense: list[tuple[int, float]]
    lexical: list[tuple[int, float]]
    records: dict[int, ChunkRecord]


@dataclass
class SearchPlan:
    """A search between :meth:`Retriever.plan` and :meth:`Retriever.finish`.

    ``quick`` says that finishing reads nothing more from the catalog or the
    index and runs no model: only ranking is left.
    """

    query: str
    k: int
    mode: SearchMode
    filters: SearchFilters
    scope: AccessScope
    vector: VectorArray | None
    depth: int
    candidates: _Candidates
    quick: bool = False

    @property
    def restricted(self) -> bool:
        return not self.scope.sees_everything or not self.filters.is_empty

    def visible(self, record: Filterable) -> bool:
        return self.scope.allows(record.access_labels) and self.filters.matches(record)


class Retriever:
    """Dense, lexical and hybrid search over one generation of a collection."""

    def __init__(
        self,
        catalog: Catalog,
        index: VectorIndex,
        generation: Generation,
        embedder: Embedder,
        config: RetrievalConfig | None = None,
        reranker: Reranker | None = None,
    ) -> None:
        self._catalog = catalog
        self._index = index
        self._generation = generation
        self._embedder = embedder
        self._config = config or RetrievalConfig()
        self._reranker = reranker

    @property
    def generation(self) -> Generation:
        return self._generation

    def embed_query(self, query: str) -> VectorArray:
        """The query's embedding as one row; pass it back to :meth:`search`."""
        return self._embedder.embed([query])

    def search(
        self,
        query: str,
        k: int = 5,
        *,
        mode: SearchMode | None = None,
        filters: SearchFilters | None = None,
        scope: AccessScope | None = None,
        query_vector: VectorArray | None = None,
    ) -> list[SearchHit]:
        """The ``k`` best passages for ``query`` that ``scope`` may see, best first."""
        plan = self.plan(
            query, k, mode=mode, filters=filters, scope=scope, query_vector=query_vector
        )
        return self.finish(plan)

    def plan(
        self,
        query: str,
        k: int = 5,
        *,
        mode: SearchMode | None = None,
        filters: SearchFilters | None = None,
        scope: AccessScope | None = None,
        query_vector: VectorArray | None = None,
    ) -> SearchPlan:
        """Steps 1 and 2 up to the first visibility check; :meth:`finish` does the rest.

        The split lets a caller run a cheap plan where it is (an event loop)
        and hand only a plan whose finish is costly (:attr:`SearchPlan.quick`
        false) to a worker thread.
        """
        mode = mode or self._config.mode
        filters = filters or _NO_FILTERS
        scope = scope or AccessScope.everything()
        self._check(query, k)

        if mode != "lexical" and query_vector is None:
            query_vector = self.embed_query(query)
        depth = self._depth(mode, k)
        candidates = self._candidates(query, query_vector, mode, depth)
        plan = SearchPlan(
            query, k, mode, filters, scope, query_vector, depth, candidates
        )
        self._drop_invisible(plan)
        plan.quick = self._reranker is None and not self._needs_more(plan)
        return plan

    def finish(self, plan: SearchPlan) -> list[SearchHit]:
        """Look further when too little is visible, then rank: the hits, best first."""
        if self._needs_more(plan):
            self._look_further(plan)
        found = plan.candidates
        ranked = self._rank(found, plan.mode)
        ranked = self._rerank(plan.query, ranked, found.records)
        ranked = self._diversify(plan.vector, ranked, found.records, plan.k)
        return self._hits(ranked[: plan.k], found)

    # -- steps -------------------------------------------------------------

    def _depth(self, mode: SearchMode, k: int) -> int:
        """How many candidates each retriever contributes.

        Fusion, reranking and MMR reorder candidates, so they get the
        configured depth; plain dense search returns the index's own order,
        so a few past ``k`` (for chunks hidden by state or access) suffice.
        """
        reorders = (
            mode != "dense"
            or self._reranker is not None
            or self._config.mmr_lambda is not None
        )
        if reorders:
            return max(self._config.candidates, k)
        return min(max(self._config.candidates, k), k + _DENSE_SLACK)

    def _check(self, query: str, k: int) -> None:
        if not query.strip():
            raise RequestError("The query is empty; send the text to search for.")
        if not 1 <= k <= self._config.max_top_k:
            raise RequestError(
                f"top_k must be between 1 and {self._config.max_top_k} "
                f"(retrieval.max_top_k), not {k}."
            )

    def _candidates(
        self, query: str, vector: VectorArray | None, mode: SearchMode, depth: int
    ) -> _Candidates:
        dense: list[tuple[int, float]] = []
        lexical: list[tuple[int, float]] = []
        if mode != "lexical" and vector is not None:
            dense = [(h.id, h.score) for h in self._index.search(vector, depth)[0]]
        if mode != "dense":
            lexical = self._lexical_search(query, depth)
        ids = {vid for vid, _ in dense} | {vid for vid, _ in lexical}
        records = self._catalog.live_chunks(self._generation.id, sorted(ids))
        return _Candidates(dense, lexical, records)

    def _lexical_search(self, query: str, depth: int) -> list[tuple[int, float]]:
        return self._catalog.lexical_search(
            self._generation.id,
            query,
            depth,
            common_share=self._config.lexical_common_share,
            common_min_chunks=self._config.lexical_common_min_chunks,
        )

    def _drop_invisible(self, plan: SearchPlan) -> None:
        found = plan.candidates
        found.records = {v: r for v, r in found.records.items() if plan.visible(r)}

    def _needs_more(self, plan: SearchPlan) -> bool:
        return self._dense_short(plan) or self._lexical_short(plan)

    def _dense_short(self, plan: SearchPlan) -> bool:
        """Filters hid so much that fewer than k dense candidates remain, and more exist."""
        found = plan.candidates
        return (
            plan.restricted
            and plan.vector is not None
            and len(found.dense) >= plan.depth
            and sum(v in found.records for v, _ in found.dense) < plan.k
        )

    def _lexical_short(self, plan: SearchPlan) -> bool:
        found = plan.candidates
        return (
            plan.restricted
            and len(found.lexical) >= plan.depth
            and sum(v in found.records for v, _ in found.lexical) < plan.k
        )

    def _look_further(self, plan: SearchPlan) -> None:
        """Redo dense search within the visible ids, and lexical search deeper."""
        found = plan.candidates
        checked = {v for v, _ in found.dense + found.lexical}
        if plan.vector is not None and self._dense_short(plan):
            allowed = self._catalog.visible_vector_ids(
                self._generation.id, plan.visible
            )
            hits = self._index.search(plan.vector, plan.depth, allowed_ids=allowed)[0]
            found.dense = [(h.id, h.score) for h in hits]
        if self._lexical_short(plan):
            found.lexical = self._lexical_search(
                plan.query, plan.depth * _LEXICAL_DEEPENING
            )
        missing = {v for v, _ in found.dense + found.lexical} - checked
        more = self._catalog.live_chunks(self._generation.id, sorted(missing))
        found.records.update({v: r for v, r in more.items() if plan.visible(r)})

    def _rank(self, found: _Candidates, mode: SearchMode) -> list[tuple[int, float]]:
        dense = [(v, s) for v, s in found.dense if v in found.records]
        lexical = [(v, s) for v, s in found.lexical if v in found.records]
        if mode == "dense":
            return dense
        if mode == "lexical":
            return lexical
        weights = {
            "dense": self._config.dense_weight,
            "lexical": self._config.lexical_weight,
        }
        if self._config.fusion == "convex":
            return convex_fusion({"dense": dense, "lexical": lexical}, weights)
        return reciprocal_rank_fusion(
            {"dense": [v for v, _ in dense], "lexical": [v for v, _ in lexical]},
            weights,
            self._config.rrf_k,
        )

    def _rerank(
        self,
        query: str,
        ranked: list[tuple[int, float]],
        records: Mapping[int, ChunkRecord],
    ) -> list[tuple[int, float]]:
        if self._reranker is None or not ranked:
            return ranked
        head = ranked[: self._reranker.candidates]
        scores = self._reranker.score(query, [records[v].text for v, _ in head])
        rescored = sorted(
            zip((v for v, _ in head), scores, strict=True), key=lambda pair: -pair[1]
        )
        return rescored + ranked[len(head) :]

    def _diversify(
        self,
        vector: VectorArray | None,
        ranked: list[tuple[int, float]],
        records: Mapping[int, ChunkRecord],
        k: int,
    ) -> list[tuple[int, float]]:
        lambda_ = self._config.mmr_lambda
        if lambda_ is None or vector is None or len(ranked) <= 1:
            return ranked
        pool = ranked[: max(4 * k, 20)]
        vectors = self._embedder.embed([records[v].text for v, _ in pool])
        order = maximal_marginal_relevance(vector[0], vectors, k, lambda_)
        return [pool[i] for i in order]

    def _hits(
        self, ranked: Sequence[tuple[int, float]], found: _Candidates
    ) -> list[SearchHit]:
        dense = dict(found.dense)
        lexical = dict(found.lexical)
        return [
            _hit(found.records[v], score, dense.get(v), lexical.get(v))
            for v, score in ranked
        ]


def _hit(
    record: ChunkRecord,
    score: float,
    dense_score: float | None,
    lexical_score: float | None,
) -> SearchHit:
    return SearchHit(
        uri=record.uri,
        doc_id=record.doc_id,
        chunk_id=record.chunk_id,
        score=float(score),
        text=record.text,
        title=record.title,
        heading_path=record.heading_path,
        source=record.source,
        modified_at=record.modified_at,
        indexed_at=record.indexed_at,
        dense_score=dense_score,
        lexical_score=lexical_score,
    )
