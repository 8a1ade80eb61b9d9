"""Settings models owned by the index package: collections, backends, catalog."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from ingestion.config import NAME_PATTERN, ChunkingConfig, EmbedderConfig, StrictModel

__all__ = ["CatalogConfig", "CollectionConfig", "FaissConfig", "QdrantConfig"]


class FaissConfig(StrictModel):
    """FAISS on local disk: exact search while small, HNSW once large."""

    exact_max_vectors: int = Field(
        default=50_000,
        ge=0,
        description="Up to this many vectors, search is exact; above it, HNSW.",
    )
    hnsw_m: int = Field(default=32, ge=4, le=128)
    ef_construction: int = Field(
        default=160,
        ge=8,
        description="HNSW build breadth; 160 keeps recall@10 near 0.98 at 1M vectors.",
    )
    ef_search: int = Field(default=128, ge=8)


class QdrantConfig(StrictModel):
    """Qdrant through qdrant-client: local mode on disk by default, or a server."""

    url: str | None = Field(
        default=None,
        description="URL of a Qdrant server or cluster; unset means local mode "
        "on disk under data_dir.",
    )
    api_key: SecretStr | None = None
    in_memory: bool = Field(default=False, description="Local mode in memory only.")
    timeout_s: float = Field(default=10.0, gt=0)


class CollectionConfig(StrictModel):
    """A named collection of passages, served by one vector index backend."""

    name: str = Field(pattern=NAME_PATTERN)
    index: Literal["faiss", "qdrant"] = "faiss"
    faiss: FaissConfig = FaissConfig()
    qdrant: QdrantConfig = QdrantConfig()
    embedder: EmbedderConfig | None = Field(
        default=None,
        description="Overrides the top-level embedder for this collection.",
    )
    chunking: ChunkingConfig | None = Field(
        default=None,
        description="Overrides the top-level chunking for this collection.",
    )


class CatalogConfig(StrictModel):
    """Where the catalog lives: SQLite under data_dir by default, or a database URL."""

    url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db; "
        "unset means sqlite in data_dir/catalog.db.",
    )
