"""Settings of retrieval: fusion weights, candidate depth, MMR, reranking, batching."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ingestion.config import StrictModel

__all__ = ["BatchingConfig", "RerankConfig", "RetrievalConfig", "SearchMode"]

SearchMode = Literal["dense", "lexical", "hybrid"]


class RerankConfig(StrictModel):
    """A sentence-transformers ``CrossEncoder`` that rescores the fused candidates."""

    model_path: Path = Field(
        description="Folder of a CrossEncoder model on local disk; nothing is downloaded."
    )
    candidates: int = Field(
        default=20, ge=1, le=200, description="How many fused candidates it rescores."
    )
    batch_size: int = Field(default=32, ge=1, le=1024)


class BatchingConfig(StrictModel):
    """Query micro-batching: concurrent queries share one embedding forward pass."""

    enabled: bool = True
    window_ms: float = Field(
        default=3.0,
        ge=0,
        le=100,
        description="How long the first query of a batch waits for others to join.",
    )
    max_batch: int = Field(default=32, ge=1, le=1024)


class RetrievalConfig(StrictModel):
    """How passages are found and ranked."""

    mode: SearchMode = "hybrid"
    fusion: Literal["rrf", "convex"] = Field(
        default="rrf",
        description="How hybrid search merges the dense and lexical lists: "
        "reciprocal rank fusion (ranks only), or a convex combination of their "
        "scores rescaled to [0, 1].",
    )
    dense_weight: float = Field(default=1.0, ge=0)
    lexical_weight: float = Field(default=1.0, ge=0)
    rrf_k: int = Field(
        default=60,
        ge=1,
        description="Reciprocal rank fusion constant: larger flattens the rank curve.",
    )
    lexical_common_share: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="Lexical search leaves out query words held by more than this "
        "share of a collection's chunks while rarer words remain: they say little "
        "about relevance and cost time in proportion to the chunks they match. "
        "1 keeps every word.",
    )
    lexical_common_min_chunks: int = Field(
        default=10_000,
        ge=0,
        description="Collections smaller than this keep every query word.",
    )
    candidates: int = Field(
        default=50,
        ge=1,
        le=1000,
        description="Candidates each retriever contributes before fusion.",
    )
    mmr_lambda: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Maximal marginal relevance: 1 keeps pure relevance, lower values "
        "trade relevance for diversity. Unset turns MMR off.",
    )
    rerank: RerankConfig | None = None
    batching: BatchingConfig = BatchingConfig()
    max_top_k: int = Field(default=50, ge=1, le=1000)
