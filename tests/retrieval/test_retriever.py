"""Dense, lexical and hybrid retrieval over a real index, with filters and access.

The corpus is small and written here, so each test knows which document must
come back. The embedding model is the real one; the catalog is SQLite and the
index FAISS, as in the embedded default.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from index.catalog import Catalog
from index.generations import generation_for_ingest
from index.sync import sync_source
from index.vectors import open_vector_index
from ingestion.config import ChunkingConfig
from ingestion.connectors.files import FilesConfig, FilesSource
from ingestion.embedding import CachedEmbedder
from ingestion.errors import RequestError
from ingestion.pipeline import Pipeline
from retrieval.batching import QueryEmbedder
from retrieval.config import BatchingConfig, RerankConfig, RetrievalConfig
from retrieval.filters import AccessScope, SearchFilters
from retrieval.fusion import (
    convex_fusion,
    maximal_marginal_relevance,
    reciprocal_rank_fusion,
)
from retrieval.rerank import CrossEncoderReranker
from retrieval.retriever import Retriever

DOCS = {
    "kettle.md": "# Kettle\n\nDescale the office kettle every Friday with citric acid.",
    "badge.md": "# Badges\n\nA lost access badge is replaced by reception within a day.",
    "vpn.md": "# VPN\n\nThe VPN client is called Tunnelbear-X; it needs a hardware token.",
    "parking.md": "# Parking\n\nVisitors park in bay C; staff park in bays A and B.",
    "error-e42.md": "# Error E42\n\nError code E42 on the DL-400 logger means a flat "
    "backup battery. Replace the CR2032 cell.",
    "printer.md": "# Printer\n\nThe third floor printer jams when fed glossy paper.",
}
SECRET_DOCS = {
    "merger.md": "# Project Heron\n\nThe planned merger with Heron GmbH closes in "
    "spring; the office kettle budget doubles.",
}


@dataclass
class Corpus:
    catalog: Catalog
    retriever: Retriever
    embedder: CachedEmbedder

    def uris(self, hits: list) -> list[str]:  # type: ignore[type-arg]
        return [Path(h.uri).name for h in hits]


def _ingest(
    catalog: Catalog, index, pipeline: Pipeline, name: str, folder: Path, labels
) -> None:  # type: ignore[no-untyped-def]
    source = FilesSource(
        FilesConfig(
            name=name,
            type="files",
            collection="docs",
            path=folder,
            access_labels=labels,
        )
    )
    generation = generation_for_ingest(
        catalog, "docs", "faiss", lambda: {"dim": 384}, pipeline.fingerprint()
    )
    report = sync_source(source, pipeline, catalog, index, generation)
    assert report.status == "ok", report


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, real_embedder) -> Iterator[Corpus]:
    root = tmp_path_factory.mktemp("retrieval")
    for folder, docs in (("public", DOCS), ("secret", SECRET_DOCS)):
        (root / folder).mkdir()
        for name, text in docs.items():
            (root / folder / name).write_text(text, encoding="utf-8")
    catalog = Catalog(f"sqlite:///{root / 'catalog.db'}")
    embedder = CachedEmbedder(real_embedder, catalog)
    pipeline = Pipeline(embedder, ChunkingConfig(), max_document_bytes=1 << 20)
    index = open_vector_index("faiss", location=root, name="docs-g1", dim=384)
    _ingest(catalog, index, pipeline, "public", root / "public", [])
    _ingest(catalog, index, pipeline, "secret", root / "secret", ["board"])
    generation = catalog.live_generation("docs")
    assert generation is not None
    retriever = Retriever(catalog, index, generation, real_embedder, RetrievalConfig())
    yield Corpus(catalog, retriever, embedder)
    index.close()
    catalog.close()


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_each_mode_finds_the_document_that_answers(corpus: Corpus, mode: str) -> None:
    hits = corpus.retriever.search("what does error E42 mean", 3, mode=mode)
    assert corpus.uris(hits)[0] == "error-e42.md", corpus.uris(hits)


def test_lexical_search_finds_a_rare_exact_term(corpus: Corpus) -> None:
    hits = corpus.retriever.search("Tunnelbear-X", 2, mode="lexical")
    assert corpus.uris(hits)[:1] == ["vpn.md"], corpus.uris(hits)


def test_hybrid_scores_come_from_fusion_of_both_lists(corpus: Corpus) -> None:
    hits = corpus.retriever.search("replace the backup battery", 3, mode="hybrid")
    assert hits[0].dense_score is not None and hits[0].lexical_score is not None
    assert all(a.score >= b.score for a, b in itertools.pairwise(hits))


def test_an_empty_query_and_a_bad_k_are_request_errors(corpus: Corpus) -> None:
    with pytest.raises(RequestError, match="empty"):
        corpus.retriever.search("   ", 3)
    with pytest.raises(RequestError, match="top_k"):
        corpus.retriever.search("kettle", 0)


def test_a_caller_without_the_label_never_sees_the_labelled_document(
    corpus: Corpus,
) -> None:
    query = "kettle budget merger"
    for mode in ("dense", "lexical", "hybrid"):
        public = corpus.retriever.search(query, 7, mode=mode, scope=AccessScope())
        board = corpus.retriever.search(
            query,
            7,
            mode=mode,  # type: ignore[arg-type]
            scope=AccessScope.of(["board"]),
        )
        assert "merger.md" not in corpus.uris(public), (mode, corpus.uris(public))
        assert "merger.md" in corpus.uris(board), (mode, corpus.uris(board))


def test_a_scope_with_few_visible_documents_still_fills_k(corpus: Corpus) -> None:
    retriever = _with_config(corpus, RetrievalConfig(candidates=2))
    filters = SearchFilters(uri_prefix=next(iter(_uris(corpus, "printer.md"))))
    hits = retriever.search("office kettle", 1, mode="dense", filters=filters)
    assert corpus.uris(hits) == ["printer.md"], corpus.uris(hits)


def test_only_a_plan_that_must_look_further_is_not_quick(corpus: Corpus) -> None:
    retriever = _with_config(corpus, RetrievalConfig(candidates=2))
    filters = SearchFilters(uri_prefix=next(iter(_uris(corpus, "printer.md"))))

    open_plan = retriever.plan("office kettle", 1, mode="dense")
    hidden = retriever.plan("office kettle", 1, mode="dense", filters=filters)

    assert open_plan.quick, "nothing is hidden, so only ranking is left"
    assert not hidden.quick, "the filter hid both candidates; more must be read"
    assert corpus.uris(retriever.finish(hidden)) == ["printer.md"]


def _with_config(corpus: Corpus, config: RetrievalConfig) -> Retriever:
    return Retriever(
        corpus.catalog,
        corpus.retriever._index,
        corpus.retriever.generation,
        corpus.embedder,
        config,
    )


def _uris(corpus: Corpus, name: str) -> set[str]:
    hits = corpus.retriever.search(name.removesuffix(".md"), 7, mode="dense")
    return {h.uri for h in hits if h.uri.endswith(name)}


def test_filters_by_source_and_document(corpus: Corpus) -> None:
    everything = AccessScope.everything()
    by_source = corpus.retriever.search(
        "kettle", 7, scope=everything, filters=SearchFilters(sources=["secret"])
    )
    assert corpus.uris(by_source) == ["merger.md"]
    doc_id = by_source[0].doc_id
    by_doc = corpus.retriever.search(
        "battery", 7, scope=everything, filters=SearchFilters(doc_ids=[doc_id])
    )
    assert {h.doc_id for h in by_doc} == {doc_id}


def test_a_filter_on_time_keeps_only_documents_changed_in_range(corpus: Corpus) -> None:
    late = SearchFilters(modified_after="2999-01-01T00:00:00Z")  # type: ignore[arg-type]
    assert corpus.retriever.search("kettle", 5, filters=late) == []
    early = SearchFilters(modified_after="2000-01-01T00:00:00Z")  # type: ignore[arg-type]
    assert corpus.retriever.search("kettle", 5, filters=early)


def test_malformed_filters_are_rejected() -> None:
    with pytest.raises(ValueError, match="empty list"):
        SearchFilters(sources=[])
    with pytest.raises(ValueError, match="extra"):
        SearchFilters.model_validate({"colour": "red"})


def test_mmr_trades_relevance_for_diversity() -> None:
    query = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    near = np.array([0.99, 0.14, 0.0], dtype=np.float32)
    twin = np.array([0.99, 0.141, 0.0], dtype=np.float32)
    other = np.array([0.7, 0.0, 0.714], dtype=np.float32)
    rows = np.stack([v / np.linalg.norm(v) for v in (near, twin, other)])
    assert maximal_marginal_relevance(query, rows, 2, 1.0) == [0, 1]
    assert maximal_marginal_relevance(query, rows, 2, 0.5) == [0, 2]


def test_rank_fusion_rewards_agreement_and_honours_weights() -> None:
    fused = reciprocal_rank_fusion(
        {"dense": ["a", "b", "c"], "lexical": ["d", "b", "e"]},
        {"dense": 1.0, "lexical": 1.0},
    )
    assert fused[0][0] == "b", fused
    only_dense = reciprocal_rank_fusion(
        {"dense": ["a", "b"], "lexical": ["b", "z"]}, {"dense": 1.0, "lexical": 0.0}
    )
    assert [item for item, _ in only_dense] == ["a", "b"]


def test_convex_fusion_keeps_score_gaps_and_honours_weights() -> None:
    dense = [("a", 0.9), ("b", 0.5), ("c", 0.49)]
    lexical = [("c", 12.0), ("b", 11.0), ("d", 2.0)]

    fused = convex_fusion(
        {"dense": dense, "lexical": lexical}, {"dense": 1, "lexical": 1}
    )
    dense_only = convex_fusion(
        {"dense": dense, "lexical": lexical}, {"dense": 1, "lexical": 0}
    )

    # c: 0 + 1 = 1; b: 0.024 + 0.9 = 0.924; a: 1 + 0 = 1 (first seen wins ties).
    assert [item for item, _ in fused][:3] == ["a", "c", "b"], fused
    assert all(0.0 <= score <= 1.0 for _, score in fused), fused
    assert [item for item, _ in dense_only][:3] == ["a", "b", "c"], dense_only


def test_convex_fusion_setting_is_used_by_hybrid_search(corpus: Corpus) -> None:
    retriever = _with_config(corpus, RetrievalConfig(fusion="convex"))
    hits = retriever.search("office kettle", 3, mode="hybrid")
    assert hits, "hybrid search with convex fusion found nothing"
    assert all(0.0 <= h.score <= 1.0 for h in hits), hits


def test_mmr_setting_diversifies_results(corpus: Corpus) -> None:
    retriever = _with_config(corpus, RetrievalConfig(mmr_lambda=0.3))
    hits = retriever.search("office kettle", 3, mode="dense")
    assert len({h.doc_id for h in hits}) == 3


# -- reranking with a cross-encoder built here --------------------------------------


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer BERT cross-encoder with random weights, saved to local disk."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ingestion.embedding import resolve_model_path

    folder = tmp_path_factory.mktemp("cross-encoder")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(
        str(resolve_model_path("all-MiniLM-L6-v2"))
    )
    tokenizer.save_pretrained(folder)
    return folder


def test_the_reranker_reorders_the_head_by_cross_encoder_score(
    corpus: Corpus, tiny_cross_encoder: Path
) -> None:
    reranker = CrossEncoderReranker(
        RerankConfig(model_path=tiny_cross_encoder, candidates=4)
    )
    retriever = Retriever(
        corpus.catalog,
        corpus.retriever._index,
        corpus.retriever.generation,
        corpus.embedder,
        RetrievalConfig(),
        reranker,
    )
    query = "where do visitors park"
    hits = retriever.search(query, 4, mode="dense")
    scores = reranker.score(query, [h.text for h in hits])
    assert scores == sorted(scores, reverse=True), "the head is not in reranked order"
    assert [h.score for h in hits] == pytest.approx(scores)


def test_a_reranker_path_without_a_model_is_a_config_error(tmp_path: Path) -> None:
    from ingestion.errors import ConfigError

    reranker = CrossEncoderReranker(RerankConfig(model_path=tmp_path))
    with pytest.raises(ConfigError, match="no cross-encoder"):
        reranker.score("q", ["p"])


# -- query micro-batching -----------------------------------------------------------


def test_concurrent_queries_share_one_forward_pass(real_embedder) -> None:
    texts = [f"question number {i} about kettles" for i in range(16)]

    async def run(config: BatchingConfig) -> tuple[list[np.ndarray], QueryEmbedder]:
        embedder = QueryEmbedder(real_embedder, config)
        rows = await asyncio.gather(*(embedder.embed(t) for t in texts))
        await embedder.close()
        return rows, embedder

    batched, together = asyncio.run(run(BatchingConfig(window_ms=20, max_batch=32)))
    single, alone = asyncio.run(run(BatchingConfig(enabled=False)))
    assert together.queries == alone.queries == 16
    assert together.batches <= 2, together.batches
    assert alone.batches == 16
    for a, b in zip(batched, single, strict=True):
        assert a.shape == (1, 384)
        assert float(a[0] @ b[0]) == pytest.approx(1.0, abs=1e-4)


def test_a_batch_never_exceeds_max_batch(real_embedder) -> None:  # type: ignore[no-untyped-def]
    async def run() -> QueryEmbedder:
        embedder = QueryEmbedder(
            real_embedder, BatchingConfig(window_ms=20, max_batch=4)
        )
        await asyncio.gather(*(embedder.embed(f"q{i}") for i in range(10)))
        await embedder.close()
        return embedder

    embedder = asyncio.run(run())
    assert embedder.batches >= 3, embedder.batches
