"""Cross-encoder reranking of fused candidates, from a model on local disk."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ingestion.embedding import set_offline_environment
from ingestion.errors import ConfigError

from .config import RerankConfig

__all__ = ["CrossEncoderReranker", "Reranker"]


class Reranker:
    """Scores (query, passage) pairs; higher is more relevant."""

    candidates: int = 20

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        raise NotImplementedError


class CrossEncoderReranker(Reranker):
    """A sentence-transformers ``CrossEncoder`` loaded from ``model_path``.

    The model is loaded on first use and never fetched from a hub: a path that
    does not hold a model is a configuration error.
    """

    def __init__(self, config: RerankConfig) -> None:
        self._config = config
        self._model: Any = None
        self._lock = threading.Lock()
        self.candidates = config.candidates

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        if not passages:
            return []
        model = self._load()
        scores = model.predict(
            [(query, passage) for passage in passages],
            batch_size=self._config.batch_size,
            show_progress_bar=False,
        )
        return [float(s) for s in scores]

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                self._model = _load_cross_encoder(self._config.model_path)
            return self._model


def _load_cross_encoder(path: Path) -> Any:
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"retrieval.rerank.model_path: {path} holds no cross-encoder model "
            "(no config.json); point it at a folder saved with CrossEncoder.save()."
        )
    set_offline_environment()
    from sentence_transformers import CrossEncoder

    try:
        return CrossEncoder(str(path), device="cpu", local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"retrieval.rerank.model_path: could not load a cross-encoder from {path}: "
            f"{err}"
        ) from err
