"""The answer cache in the serving process: an LRU of entries, vectors per scope.

Entries live in one ordered dict, least recently used first, bounded by
``max_entries``; each expires ``ttl_seconds`` after its put. An expired entry
is removed when a lookup meets it or when the bound pushes it out, so it
never outlives the bound. The question embeddings of each scope sit in one
float32 matrix that a semantic lookup multiplies by the query (brute force:
about 0.1 ms per thousand 384-dimension rows), bounded by
``max_entries_per_scope``.

One lock guards every structure; ``current_versions`` and the JSON decoding
of a hit run outside it. This is also the fake to use in tests of callers.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._shared import (
    Counters,
    as_unit_vector,
    decode_entry,
    encode_entry,
    entry_id,
    is_current,
)
from .base import (
    CachedAnswer,
    CacheScope,
    CacheStats,
    Embedding,
    HitKind,
    VersionLookup,
)
from .config import CacheConfig

__all__ = ["InProcessCache"]

# (scope key, entry id)
_Key = tuple[str, str]


@dataclass(frozen=True, eq=False)
class _Entry:
    blob: bytes
    versions: dict[str, str]
    expires_at: float


class _ScopeVectors:
    """The question embeddings of one scope, one row per entry.

    Rows live in a matrix that doubles when full; removing a row moves the
    last row into its place. ``_rows`` maps entry id to row and keeps the
    order in which entries were added, oldest first.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._matrix = np.empty((16, dim), dtype=np.float32)
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, entry: str, vector: Embedding) -> None:
        self.remove(entry)
        if len(self._ids) == len(self._matrix):
            self._matrix = np.concatenate([self._matrix, np.empty_like(self._matrix)])
        self._matrix[len(self._ids)] = vector
        self._rows[entry] = len(self._ids)
        self._ids.append(entry)

    def remove(self, entry: str) -> None:
        row = self._rows.pop(entry, None)
        if row is None:
            return
        last = self._ids.pop()
        if last != entry:
            self._matrix[row] = self._matrix[len(self._ids)]
            self._ids[row] = last
            self._rows[last] = row

    def oldest(self) -> str:
        return next(iter(self._rows))

    def search(self, query: Embedding, threshold: float) -> list[tuple[str, float]]:
        """Entries at least ``threshold`` similar to ``query``, most similar first."""
        if query.shape != (self.dim,) or not self._ids:
            return []
        scores = self._matrix[: len(self._ids)] @ query
        rows = np.flatnonzero(scores >= threshold)
        rows = rows[np.argsort(-scores[rows], kind="stable")]
        return [(self._ids[row], float(scores[row])) for row in rows]


class InProcessCache:
    """The ``AnswerCache`` of one process (see the module docstring).

    ``clock`` returns seconds; tests pass a fake one to expire entries
    without waiting.

    Example::

        cache = InProcessCache(CacheConfig(ttl_seconds=600))
        cache.put(scope, question, embedding, answer, {"doc-1": "9f2c…"})
        hit = cache.get_exact(scope, question, catalog.content_hashes)
    """

    def __init__(
        self,
        config: CacheConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config or CacheConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._vectors: dict[str, _ScopeVectors] = {}
        self._citing: dict[str, set[_Key]] = {}
        self._counters = Counters()

    def get_exact(
        self, scope: CacheScope, question: str, current_versions: VersionLookup
    ) -> CachedAnswer | None:
        key = (scope.key, entry_id(question))
        with self._lock:
            entry = self._live(key)
        answer = self._answer(key, entry, "exact", 1.0, current_versions)
        self._counters.lookup("exact", answer)
        return answer

    def get_semantic(
        self, scope: CacheScope, embedding: Embedding, current_versions: VersionLookup
    ) -> CachedAnswer | None:
        if not self._config.semantic:
            return None
        query = as_unit_vector(embedding)
        with self._lock:
            key, entry, similarity = self._nearest(scope.key, query)
        answer = self._answer(key, entry, "semantic", similarity, current_versions)
        self._counters.lookup("semantic", answer)
        return answer

    def put(
        self,
        scope: CacheScope,
        question: str,
        embedding: Embedding | None,
        payload: Mapping[str, Any],
        cited_versions: Mapping[str, str],
    ) -> None:
        entry = _Entry(
            blob=encode_entry(payload, cited_versions),
            versions=dict(cited_versions),
            expires_at=self._clock() + self._config.ttl_seconds,
        )
        vector = None
        if self._config.semantic and embedding is not None:
            vector = as_unit_vector(embedding)
        key = (scope.key, entry_id(question))

        with self._lock:
            self._remove(key)
            self._entries[key] = entry
            for doc_id in entry.versions:
                self._citing.setdefault(doc_id, set()).add(key)
            if vector is not None:
                self._add_vector(key, vector)
            while len(self._entries) > self._config.max_entries:
                self._remove(next(iter(self._entries)))

    def invalidate_documents(self, doc_ids: Iterable[str]) -> int:
        with self._lock:
            keys: set[_Key] = set()
            for doc_id in doc_ids:
                keys |= self._citing.get(doc_id, set())
            for key in keys:
                self._remove(key)
        return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._vectors.clear()
            self._citing.clear()

    def stats(self) -> CacheStats:
        return self._counters.snapshot()

    def close(self) -> None:
        self.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _answer(
        self,
        key: _Key | None,
        entry: _Entry | None,
        kind: HitKind,
        similarity: float,
        current_versions: VersionLookup,
    ) -> CachedAnswer | None:
        """The hit for ``entry`` if its cited documents are unchanged, else a miss."""
        if key is None or entry is None:
            return None

        if not is_current(entry.versions, current_versions):
            with self._lock:
                if self._entries.get(key) is entry:
                    self._remove(key)
            self._counters.stale()
            return None

        _, payload = decode_entry(entry.blob)
        return CachedAnswer(payload=payload, kind=kind, similarity=similarity)

    def _live(self, key: _Key) -> _Entry | None:
        """The unexpired entry at ``key``, now the most recently used (lock held)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def _nearest(
        self, scope_key: str, query: Embedding | None
    ) -> tuple[_Key | None, _Entry | None, float]:
        """The most similar live entry of a scope above the threshold (lock held)."""
        vectors = self._vectors.get(scope_key)
        if query is None or vectors is None:
            return None, None, 0.0
        for entry, similarity in vectors.search(query, self._config.semantic_threshold):
            key = (scope_key, entry)
            found = self._live(key)
            if found is not None:
                return key, found, similarity
        return None, None, 0.0

    def _add_vector(self, key: _Key, vector: Embedding) -> None:
        """Make ``key`` a semantic candidate of its scope, within the bound (lock held)."""
        scope_key, entry = key
        vectors = self._vectors.get(scope_key)
        if vectors is None or vectors.dim != vector.shape[0]:
            # A new scope, or another embedding size (a new model always comes
            # with a new generation, so this only drops rows nobody can match).
            vectors = self._vectors[scope_key] = _ScopeVectors(vector.shape[0])
        vectors.add(entry, vector)
        while len(vectors) > self._config.max_entries_per_scope:
            vectors.remove(vectors.oldest())

    def _remove(self, key: _Key) -> None:
        """Forget ``key`` everywhere it is indexed (lock held)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for doc_id in entry.versions:
            citing = self._citing.get(doc_id)
            if citing is not None:
                citing.discard(key)
                if not citing:
                    del self._citing[doc_id]
        scope_key, entry_key = key
        vectors = self._vectors.get(scope_key)
        if vectors is not None:
            vectors.remove(entry_key)
            if not vectors:
                del self._vectors[scope_key]
