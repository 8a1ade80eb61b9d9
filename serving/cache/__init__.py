"""The answer cache of ``/ask``: exact and semantic, in process or in Redis.

An entry is a finished answer (an opaque JSON-able dict) with the content
hash of every document it cites, filed under a :class:`CacheScope` and the
question. A lookup finds it by the normalised question (exact) or by the
question's embedding (semantic, cosine at or above ``semantic_threshold``),
in the same scope only, and returns it only if ``current_versions`` confirms
that no cited document changed. The invariants are written in
:mod:`serving.cache.base`; both backends pass one contract suite
(``tests/serving/test_cache.py``).

Use::

    cache = open_answer_cache(settings.cache)
    hit = cache.get_exact(scope, question, catalog_versions)
    if hit is None:
        hit = cache.get_semantic(scope, query_vector, catalog_versions)
    if hit is None:
        answer = generate(...)
        cache.put(scope, question, query_vector, answer, cited_versions)

The Redis backend is imported on first use, so a service caching in process
never loads redis-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import (
    AnswerCache,
    CachedAnswer,
    CacheScope,
    CacheStats,
    DisabledCache,
    Embedding,
    HitKind,
    VersionLookup,
    access_fingerprint,
    canonical_json,
    normalize_question,
)
from .config import CacheConfig
from .memory import InProcessCache

if TYPE_CHECKING:
    from .redis import RedisCache

__all__ = [
    "AnswerCache",
    "CacheConfig",
    "CacheScope",
    "CacheStats",
    "CachedAnswer",
    "DisabledCache",
    "Embedding",
    "HitKind",
    "InProcessCache",
    "RedisCache",
    "VersionLookup",
    "access_fingerprint",
    "canonical_json",
    "normalize_question",
    "open_answer_cache",
]


def open_answer_cache(config: CacheConfig) -> AnswerCache:
    """The cache ``config`` describes: a :class:`DisabledCache` when it is off.

    Opening connects to nothing: a Redis server that is down shows up as
    misses and warnings, not as an error here. A ``redis_url`` that is not a
    Redis URL raises ``ConfigError``.
    """
    if not config.enabled:
        return DisabledCache()
    if config.backend == "redis":
        from .redis import RedisCache

        return RedisCache(config)
    return InProcessCache(config)


def __getattr__(name: str) -> Any:
    """Import the Redis backend on first access (see the module docstring)."""
    if name == "RedisCache":
        from .redis import RedisCache

        return RedisCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
