"""Vector indexes: the ``VectorIndex`` protocol, its backends and a factory.

Both backends keep the invariants written in :mod:`index.vectors.base` and
pass one contract suite (``tests/index/test_vector_contract.py``); a
congruence test checks that they return the same top results for the same
data. Where they differ is written in their module docstrings: FAISS commits
at ``flush`` only, Qdrant local mode commits every write as it returns.

The backends are imported on first use, so that opening a FAISS index does
not load qdrant-client (most of a second) and the other way round.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from index.config import FaissConfig, QdrantConfig
from ingestion.config import NAME_PATTERN
from ingestion.errors import ConfigError

from .base import Hit, IdArray, VectorArray, VectorIndex

if TYPE_CHECKING:
    from .faiss import FaissVectorIndex
    from .qdrant import QdrantVectorIndex

__all__ = [
    "FaissVectorIndex",
    "Hit",
    "IdArray",
    "QdrantVectorIndex",
    "VectorArray",
    "VectorIndex",
    "open_vector_index",
]


def open_vector_index(
    kind: Literal["faiss", "qdrant"],
    *,
    location: Path | None,
    name: str,
    dim: int,
    faiss: FaissConfig | None = None,
    qdrant: QdrantConfig | None = None,
) -> VectorIndex:
    """Open the index ``name`` (one generation, e.g. ``docs-g3``), creating it if new.

    ``location`` is the folder holding the on-disk indexes of a backend: FAISS
    keeps ``location/name/``, Qdrant local mode ``location/name/`` too (a
    Qdrant server or an in-memory index needs none). Opening an existing
    index with another ``dim`` raises ``IndexBackendError``; a bad ``kind``,
    ``name`` or missing ``location`` raises ``ConfigError``.
    """
    if re.fullmatch(NAME_PATTERN, name) is None:
        raise ConfigError(
            f"The index name {name!r} is not valid: use 1 to 64 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit."
        )
    if kind == "faiss":
        if location is None:
            raise ConfigError(
                "A FAISS index keeps its files on local disk: give it a location "
                "folder."
            )
        from .faiss import FaissVectorIndex

        return FaissVectorIndex(location / name, dim=dim, config=faiss)
    if kind == "qdrant":
        from .qdrant import QdrantVectorIndex

        return QdrantVectorIndex(location=location, name=name, dim=dim, config=qdrant)
    raise ConfigError(f"Unknown vector index kind {kind!r}; use 'faiss' or 'qdrant'.")


def __getattr__(name: str) -> Any:
    """Import a backend class on first access (see the module docstring)."""
    if name == "FaissVectorIndex":
        from .faiss import FaissVectorIndex

        return FaissVectorIndex
    if name == "QdrantVectorIndex":
        from .qdrant import QdrantVectorIndex

        return QdrantVectorIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
