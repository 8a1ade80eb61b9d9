"""What the answer cache stores, how it is keyed, and the protocol every backend keeps.

Invariants every backend keeps (``tests/serving/test_cache.py`` checks them):

* An entry belongs to exactly one :class:`CacheScope`. Both lookups, exact
  and semantic, only ever see entries of the scope they are given, so callers
  with different access labels, or a new index generation, never share one.
* A hit is returned only after ``current_versions`` confirmed that every
  cited document still has the version it had when the answer was cached;
  otherwise the entry is deleted and the lookup is a miss.
* A hit returns a fresh copy of the payload; changing it changes no entry.
* A failing backend never fails the request: a lookup is a miss, a put is
  skipped, and a warning is logged.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "AnswerCache",
    "CacheScope",
    "CacheStats",
    "CachedAnswer",
    "DisabledCache",
    "Embedding",
    "HitKind",
    "VersionLookup",
    "access_fingerprint",
    "canonical_json",
    "normalize_question",
]

Embedding = npt.NDArray[np.float32]
HitKind = Literal["exact", "semantic"]

VersionLookup = Callable[[Sequence[str]], Mapping[str, str | None]]
"""Returns the current content hash of each document id, ``None`` if it is gone."""

# Part of every scope key: bump it when the stored layout changes, so that a
# new release never reads entries an older one wrote.
_LAYOUT_VERSION = 1

# Sentence-ending marks a question may or may not end with, after NFKC (which
# folds '？' and '…'). Only these: a trailing '#', '%' or ')' changes the
# meaning ("C#" is not "C").
_TRAILING_MARKS = " ?!.,;:。、؟"


def normalize_question(question: str) -> str:
    """The form of a question the exact key is made from.

    NFKC folds compatibility forms (full-width letters, ligatures), casefold
    ignores case, runs of whitespace become one space, and trailing
    sentence marks go: ``"  What IS  ragline？ "`` becomes ``"what is ragline"``.
    """
    text = unicodedata.normalize("NFKC", question).casefold()
    return " ".join(text.split()).rstrip(_TRAILING_MARKS)


def access_fingerprint(labels: Iterable[str]) -> str:
    """A stable hash of a caller's access labels; order and repeats do not matter."""
    if isinstance(labels, str):
        raise TypeError(
            "access_labels must be a collection of labels, not one string: "
            f"write ({labels!r},) for a single label."
        )
    return _digest(json.dumps(sorted(set(labels)), ensure_ascii=False))


def canonical_json(value: Mapping[str, Any] | None) -> str:
    """One spelling of a JSON-able mapping: keys sorted, no spaces; ``None`` is ``{}``.

    Lists keep their order; a caller whose filter treats a list as a set sorts
    it first, or equal filters get different keys (a miss, never a wrong hit).
    """
    return json.dumps(
        value or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True, kw_only=True)
class CacheScope:
    """Everything besides the question that decides the answer.

    Build one per request from what the retrieval and generation used::

        scope = CacheScope(
            collection="docs",
            generation=7,
            prompt_version="ask-v3",
            model="smollm2-135m",
            access_labels=caller.labels,
            top_k=5,
            mode="hybrid",
            filters={"source": "handbook"},
        )

    The caller's labels are kept only as :func:`access_fingerprint`, the
    filters as :func:`canonical_json`; ``key`` hashes every field.
    """

    collection: str
    generation: int
    prompt_version: str
    model: str
    top_k: int
    mode: str
    access_labels: InitVar[Iterable[str]]
    filters: InitVar[Mapping[str, Any] | None] = None
    access_fingerprint: str = field(init=False)
    filters_json: str = field(init=False)
    key: str = field(init=False, repr=False)

    def __post_init__(
        self, access_labels: Iterable[str], filters: Mapping[str, Any] | None
    ) -> None:
        fields = {
            "access_fingerprint": access_fingerprint(access_labels),
            "filters_json": canonical_json(filters),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        identity = [
            _LAYOUT_VERSION,
            self.collection,
            self.generation,
            self.prompt_version,
            self.model,
            self.access_fingerprint,
            self.top_k,
            self.mode,
            self.filters_json,
        ]
        object.__setattr__(self, "key", _digest(json.dumps(identity)))


@dataclass(frozen=True)
class CachedAnswer:
    """A cache hit: the answer as it was put, and how it was found."""

    payload: dict[str, Any]
    kind: HitKind
    similarity: float
    """Cosine similarity of the questions' embeddings; 1.0 for an exact hit."""


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was opened, for metrics.

    ``stale`` counts entries dropped because a cited document changed (each is
    also a miss); ``errors`` counts backend failures (each lookup that failed
    is also a miss).
    """

    exact_hits: int = 0
    exact_misses: int = 0
    semantic_hits: int = 0
    semantic_misses: int = 0
    stale: int = 0
    errors: int = 0


@runtime_checkable
class AnswerCache(Protocol):
    """The answer cache of ``/ask``; see the module docstring for its invariants."""

    def get_exact(
        self, scope: CacheScope, question: str, current_versions: VersionLookup
    ) -> CachedAnswer | None:
        """The answer cached for this question in this scope, if still current."""
        ...

    def get_semantic(
        self, scope: CacheScope, embedding: Embedding, current_versions: VersionLookup
    ) -> CachedAnswer | None:
        """The current answer of this scope whose question embedding is closest
        to ``embedding``, if at least as similar as the threshold."""
        ...

    def put(
        self,
        scope: CacheScope,
        question: str,
        embedding: Embedding | None,
        payload: Mapping[str, Any],
        cited_versions: Mapping[str, str],
    ) -> None:
        """Cache ``payload`` (JSON-able) as the answer, with the content hash of
        each cited document. Raises ``TypeError`` if the payload is not JSON-able."""
        ...

    def invalidate_documents(self, doc_ids: Iterable[str]) -> int:
        """Drop the answers citing any of these documents; returns how many
        were found. Best effort: lookups check versions anyway."""
        ...

    def clear(self) -> None:
        """Drop every entry of this cache."""
        ...

    def stats(self) -> CacheStats:
        """Hit, miss, stale and error counts since the cache was opened."""
        ...

    def close(self) -> None:
        """Release connections; the cache is not used afterwards."""
        ...


class DisabledCache:
    """The cache when ``cache.enabled`` is false: every lookup misses, puts vanish."""

    def get_exact(
        self, scope: CacheScope, question: str, current_versions: VersionLookup
    ) -> CachedAnswer | None:
        return None

    def get_semantic(
        self, scope: CacheScope, embedding: Embedding, current_versions: VersionLookup
    ) -> CachedAnswer | None:
        return None

    def put(
        self,
        scope: CacheScope,
        question: str,
        embedding: Embedding | None,
        payload: Mapping[str, Any],
        cited_versions: Mapping[str, str],
    ) -> None:
        return None

    def invalidate_documents(self, doc_ids: Iterable[str]) -> int:
        return 0

    def clear(self) -> None:
        return None

    def stats(self) -> CacheStats:
        return CacheStats()

    def close(self) -> None:
        return None
