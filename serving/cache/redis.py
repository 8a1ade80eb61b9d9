"""The answer cache in Redis, shared by every replica of the service.

Keys, all under ``key_prefix`` (``P`` below), for the scope key ``S`` and the
entry id ``E`` (a hash of the normalised question):

* ``P S:e:E``, a string: the entry (cited versions and payload as one JSON
  blob), written with ``EX ttl``. An exact lookup is one ``GET``.
* ``P S:v``, a hash: ``E`` → expiry time (float64) and question embedding
  (float32). A semantic lookup reads it whole, compares in numpy and fetches
  the best entries with one ``MGET``.
* ``P S:o``, a sorted set of ``E`` by put time, which keeps ``S:v`` within
  ``max_entries_per_scope``: the oldest embedding drops out first.
* ``P d:DOC``, a set of ``S:E`` for every entry citing the document ``DOC``,
  read by ``invalidate_documents``.

Hash fields cannot expire on their own before Redis 7.4, hence the expiry
time inside each embedding value; the hash, the sorted set and the document
sets expire ``ttl_seconds`` after their latest put. Writes are pipelined
without ``MULTI``: a put cut short leaves at worst an embedding without its
entry, which the next semantic lookup skips and deletes. The keys of one put
span hash slots, so this needs one Redis server (with replicas if wanted),
not Redis Cluster.

Redis failing never fails a request: every call catches ``RedisError``, logs
a warning and counts an error; a lookup is then a miss and a put is skipped.
After a connection error or a timeout the cache leaves Redis alone for
``_RETRY_AFTER_S`` seconds, so an outage costs one warning and one timeout
per interval rather than one per request.
"""

from __future__ import annotations

import logging
import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ingestion.errors import ConfigError

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

__all__ = ["RedisCache", "masked_url"]

logger = logging.getLogger(__name__)

_RETRY_AFTER_S = 5.0
# Entries a semantic lookup fetches, best first, in case the best has expired.
_SEMANTIC_FETCH = 3
_EXPIRY = struct.Struct("<d")
_CLEAR_BATCH = 500
# redis://user:password@host, redis://:password@host (Redis has no user names
# before ACLs), unix:///socket?password=…
_AUTHORITY_PASSWORD = re.compile(
    r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*):[^/?#]*@"
)
_QUERY_PASSWORD = re.compile(r"(?i)(?P<head>[?&]password=)[^&#]*")


def masked_url(url: str) -> str:
    """``url`` with its password, in the authority or the query, replaced by ``***``."""
    url = _AUTHORITY_PASSWORD.sub(r"\g<head>:***@", url)
    return _QUERY_PASSWORD.sub(r"\g<head>***", url)


class RedisCache:
    """The ``AnswerCache`` in Redis (see the module docstring).

    The connection is made on first use, so opening never fails for a server
    that is down; a ``redis_url`` that is not a Redis URL raises
    ``ConfigError``. ``clock`` returns Unix time (embedding expiry is compared
    across replicas); tests may pass a fake one.

    Example::

        cache = RedisCache(CacheConfig(backend="redis", redis_url=url))
        hit = cache.get_exact(scope, question, catalog.content_hashes)
        if hit is None:
            cache.put(scope, question, embedding, answer, cited_versions)
    """

    def __init__(
        self,
        config: CacheConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config or CacheConfig(backend="redis")
        self._prefix = self._config.key_prefix
        self._clock = clock
        self._counters = Counters()
        self._paused_until = 0.0
        url = self._config.redis_url.get_secret_value()
        self.url = masked_url(url)
        self._client = _connect(url, self.url, self._config.timeout_s)

    def get_exact(
        self, scope: CacheScope, question: str, current_versions: VersionLookup
    ) -> CachedAnswer | None:
        answer = self._exact(scope.key, entry_id(question), current_versions)
        self._counters.lookup("exact", answer)
        return answer

    def get_semantic(
        self, scope: CacheScope, embedding: Embedding, current_versions: VersionLookup
    ) -> CachedAnswer | None:
        if not self._config.semantic:
            return None
        answer = self._nearest(scope.key, as_unit_vector(embedding), current_versions)
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
        blob = encode_entry(payload, cited_versions)
        vector = None
        if self._config.semantic and embedding is not None:
            vector = as_unit_vector(embedding)
        if self._paused():
            return
        entry = entry_id(question)

        pipe = self._client.pipeline(transaction=False)
        self._queue_entry(pipe, scope.key, entry, blob, cited_versions)
        if vector is not None:
            self._queue_vector(pipe, scope.key, entry, vector)
        try:
            results = pipe.execute()
            if vector is not None:
                self._trim(scope.key, int(results[-1]))
        except RedisError as err:
            self._failed("put", err)

    def invalidate_documents(self, doc_ids: Iterable[str]) -> int:
        doc_keys = [self._document_key(doc_id) for doc_id in dict.fromkeys(doc_ids)]
        if not doc_keys or self._paused():
            return 0

        try:
            pipe = self._client.pipeline(transaction=False)
            for doc_key in doc_keys:
                pipe.smembers(doc_key)
            members: set[bytes] = set().union(*pipe.execute())

            pipe = self._client.pipeline(transaction=False)
            for scope_key, entries in _by_scope(members).items():
                self._queue_forget(pipe, scope_key, entries)
            pipe.delete(*doc_keys)
            pipe.execute()
        except RedisError as err:
            self._failed("invalidate_documents", err)
            return 0

        return len(members)

    def clear(self) -> None:
        pattern = _glob_escape(self._prefix) + "*"
        try:
            batch: list[bytes] = []
            for key in self._client.scan_iter(match=pattern, count=_CLEAR_BATCH):
                batch.append(key)
                if len(batch) == _CLEAR_BATCH:
                    self._client.unlink(*batch)
                    batch.clear()
            if batch:
                self._client.unlink(*batch)
        except RedisError as err:
            self._failed("clear", err)

    def stats(self) -> CacheStats:
        return self._counters.snapshot()

    def close(self) -> None:
        self._client.close()

    def _exact(
        self, scope_key: str, entry: str, current_versions: VersionLookup
    ) -> CachedAnswer | None:
        """One GET; ``None`` on a miss or a failure."""
        if self._paused():
            return None
        try:
            blob = cast(
                bytes | None, self._client.get(self._entry_key(scope_key, entry))
            )
        except RedisError as err:
            self._failed("get_exact", err)
            return None

        if blob is None:
            return None
        return self._answer(scope_key, entry, blob, "exact", 1.0, current_versions)

    def _nearest(
        self, scope_key: str, query: Embedding | None, current_versions: VersionLookup
    ) -> CachedAnswer | None:
        """One HGETALL, one MGET of the best candidates; ``None`` on a miss or a failure."""
        if query is None or self._paused():
            return None
        try:
            rows = cast(
                dict[bytes, bytes], self._client.hgetall(self._vectors_key(scope_key))
            )
            candidates, expired = self._rank(rows, query)
            keys = [self._entry_key(scope_key, entry) for entry, _ in candidates]
            blobs = cast(list[bytes | None], self._client.mget(keys) if keys else [])
        except RedisError as err:
            self._failed("get_semantic", err)
            return None

        gone = expired + [
            e for (e, _), blob in zip(candidates, blobs, strict=True) if blob is None
        ]
        if gone:
            self._forget(scope_key, gone)
        for (entry, similarity), blob in zip(candidates, blobs, strict=True):
            if blob is not None:
                return self._answer(
                    scope_key, entry, blob, "semantic", similarity, current_versions
                )
        return None

    def _answer(
        self,
        scope_key: str,
        entry: str,
        blob: bytes,
        kind: HitKind,
        similarity: float,
        current_versions: VersionLookup,
    ) -> CachedAnswer | None:
        """The hit for a stored entry if its cited documents are unchanged, else a miss."""
        try:
            versions, payload = decode_entry(blob)
        except ValueError as err:
            logger.warning(
                "The cache key %(key)s at %(url)s does not hold an answer (%(error)s); "
                "it is deleted. Is another application writing under %(prefix)s?",
                {
                    "key": self._entry_key(scope_key, entry),
                    "url": self.url,
                    "error": err,
                    "prefix": self._prefix,
                },
            )
            self._forget(scope_key, [entry])
            return None

        if not is_current(versions, current_versions):
            self._forget(scope_key, [entry])
            self._counters.stale()
            return None

        return CachedAnswer(payload=payload, kind=kind, similarity=similarity)

    def _rank(
        self, rows: Mapping[bytes, bytes], query: Embedding
    ) -> tuple[list[tuple[str, float]], list[str]]:
        """The best live entries at or above the threshold, and the expired ones.

        Rows of another embedding size cannot match and are left to the trim
        and the TTL.
        """
        layout = np.dtype([("expires", "<f8"), ("vector", "<f4", query.shape)])
        fields = [
            (name, value)
            for name, value in rows.items()
            if len(value) == layout.itemsize
        ]
        if not fields:
            return [], []

        names = [name.decode("ascii", "replace") for name, _ in fields]
        records = np.frombuffer(b"".join(value for _, value in fields), dtype=layout)
        live = records["expires"] > self._clock()
        scores = np.where(live, records["vector"] @ query, -np.inf)

        best = np.flatnonzero(scores >= self._config.semantic_threshold)
        best = best[np.argsort(-scores[best], kind="stable")][:_SEMANTIC_FETCH]
        expired = [names[row] for row in np.flatnonzero(~live)]
        return [(names[row], float(scores[row])) for row in best], expired

    def _queue_entry(
        self,
        pipe: Pipeline,
        scope_key: str,
        entry: str,
        blob: bytes,
        cited_versions: Mapping[str, str],
    ) -> None:
        ttl = self._config.ttl_seconds
        pipe.set(self._entry_key(scope_key, entry), blob, ex=ttl)
        for doc_id in cited_versions:
            doc_key = self._document_key(doc_id)
            pipe.sadd(doc_key, f"{scope_key}:{entry}")
            pipe.expire(doc_key, ttl)

    def _queue_vector(
        self, pipe: Pipeline, scope_key: str, entry: str, vector: Embedding
    ) -> None:
        """Queue the embedding's writes; the last command counts the scope's rows."""
        now, ttl = self._clock(), self._config.ttl_seconds
        value = _EXPIRY.pack(now + ttl) + vector.astype("<f4").tobytes()
        vectors_key, order_key = (
            self._vectors_key(scope_key),
            self._order_key(scope_key),
        )
        pipe.hset(vectors_key, entry, value)
        pipe.expire(vectors_key, ttl)
        pipe.zadd(order_key, {entry: now})
        pipe.expire(order_key, ttl)
        pipe.zcard(order_key)

    def _trim(self, scope_key: str, size: int) -> None:
        """Drop the oldest embeddings of a scope beyond ``max_entries_per_scope``."""
        excess = size - self._config.max_entries_per_scope
        if excess <= 0:
            return
        popped = cast(
            list[tuple[bytes, float]],
            self._client.zpopmin(self._order_key(scope_key), excess),
        )
        if popped:
            self._client.hdel(self._vectors_key(scope_key), *(n for n, _ in popped))

    def _forget(self, scope_key: str, entries: list[str]) -> None:
        """Delete entries and their embeddings; best effort."""
        pipe = self._client.pipeline(transaction=False)
        self._queue_forget(pipe, scope_key, entries)
        try:
            pipe.execute()
        except RedisError as err:
            self._failed("delete", err)

    def _queue_forget(self, pipe: Pipeline, scope_key: str, entries: list[str]) -> None:
        pipe.delete(*(self._entry_key(scope_key, entry) for entry in entries))
        pipe.hdel(self._vectors_key(scope_key), *entries)
        pipe.zrem(self._order_key(scope_key), *entries)

    def _paused(self) -> bool:
        return time.monotonic() < self._paused_until

    def _failed(self, operation: str, err: RedisError) -> None:
        """Count and log a failed call; after a lost connection, pause the cache."""
        self._counters.error()
        fields = {
            "url": self.url,
            "operation": operation,
            "error_type": type(err).__name__,
            "error": err,
            "retry_s": _RETRY_AFTER_S,
        }
        if not isinstance(err, RedisConnectionError | RedisTimeoutError):
            logger.warning(
                "The answer cache at %(url)s failed in %(operation)s "
                "(%(error_type)s: %(error)s); the request goes on without it.",
                fields,
            )
            return
        if self._paused():
            return
        self._paused_until = time.monotonic() + _RETRY_AFTER_S
        logger.warning(
            "The answer cache at %(url)s is unreachable in %(operation)s "
            "(%(error_type)s: %(error)s); requests go on without it, and it is "
            "tried again in %(retry_s).0f s.",
            fields,
        )

    def _entry_key(self, scope_key: str, entry: str) -> str:
        return f"{self._prefix}{scope_key}:e:{entry}"

    def _vectors_key(self, scope_key: str) -> str:
        return f"{self._prefix}{scope_key}:v"

    def _order_key(self, scope_key: str) -> str:
        return f"{self._prefix}{scope_key}:o"

    def _document_key(self, doc_id: str) -> str:
        return f"{self._prefix}d:{doc_id}"


def _connect(url: str, masked: str, timeout_s: float) -> redis.Redis:
    """A client that neither waits long nor retries more than once: a slow cache
    is worse than none. The one retry replaces a pooled connection the server
    closed (after a restart, say)."""
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
    except ValueError as err:
        raise ConfigError(
            f"cache.redis_url {masked} is not a Redis URL ({err}). Write "
            "redis://[:password@]host:port/db, rediss://… for TLS, or "
            "unix:///path/to/socket."
        ) from err


def _by_scope(members: Iterable[bytes]) -> dict[str, list[str]]:
    """Group ``scope:entry`` members of the document sets by scope."""
    grouped: dict[str, list[str]] = {}
    for member in members:
        scope_key, _, entry = member.decode("ascii", "replace").partition(":")
        grouped.setdefault(scope_key, []).append(entry)
    return grouped


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)
