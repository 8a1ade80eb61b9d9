"""A Qdrant vector index via qdrant-client: local mode on disk, in memory, or a server.

One index is one Qdrant collection named ``name``, with cosine distance and
the caller's int ids as point ids (no payload). Qdrant normalises vectors on
upsert and queries, so ``score`` is the cosine similarity: on normalised
vectors, the same value as FAISS's inner product.

Where the collection lives, by ``QdrantConfig``:

* ``url`` set: a Qdrant server or cluster. Every write is sent with
  ``wait=True`` and returns once the server has applied it and logged it to
  its write-ahead log, so ``flush`` has nothing left to wait for.
* ``in_memory``: local mode in this process only; ``close`` discards it.
* otherwise local mode on disk, in the folder ``location/name/``. Each index
  has a folder of its own because local mode lets one client at a time open a
  folder (it takes a file lock): two instances of one index, in this process
  or another, cannot be open together, while different generations can.

Durability differs from the contract in one respect, in local mode on disk:
qdrant-client commits every point to SQLite as it writes it, so a write is
durable when ``upsert`` or ``delete`` returns, without ``flush``, and a crash
in the middle of a call can leave part of that call's batch applied. Writing
the batch again repairs it, since ``upsert`` replaces by id and ``delete``
ignores absent ids. ``flush`` is therefore a no-op in every mode.

Local mode searches exactly (a brute-force scan in numpy), checks an
``allowed_ids`` filter point by point (slow for thousands of allowed ids), and
qdrant-client warns beyond 20,000 points that it is not meant for large
collections; use a server for those.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from index.config import QdrantConfig
from ingestion.errors import ConfigError, IndexBackendError

from ._checks import as_ids, as_queries, checked_batch
from .base import Hit, IdArray, VectorArray

__all__ = ["QdrantVectorIndex"]

logger = logging.getLogger(__name__)

# Points per upsert request: about 3 MB of JSON at 384 dimensions.
_UPSERT_BATCH = 512
_DELETE_BATCH = 4096
_SCROLL_PAGE = 10_000
_CLIENT_ERRORS = (
    UnexpectedResponse,
    ResponseHandlingException,
    ValueError,
    RuntimeError,
    OSError,
)


class QdrantVectorIndex:
    """A Qdrant collection behind the ``VectorIndex`` protocol (see the module doc).

    Opening creates the collection if it is missing and checks that an
    existing one holds unnamed cosine vectors of dimension ``dim``.

    Example::

        index = QdrantVectorIndex(
            location=Path("data/indexes/qdrant"), name="docs-g3", dim=384
        )
        index.upsert(np.array([1, 2]), vectors)
        hits = index.search(query_vectors, k=10)
        index.close()
    """

    def __init__(
        self,
        *,
        location: Path | None,
        name: str,
        dim: int,
        config: QdrantConfig | None = None,
    ) -> None:
        if dim < 1:
            raise IndexBackendError(
                f"A vector index needs a dimension of at least 1, not {dim}."
            )
        self._config = config or QdrantConfig()
        self._name = name
        self._dim = dim
        self._folder = _local_folder(self._config, location, name)
        self._where = self._config.url or (
            "memory" if self._folder is None else str(self._folder)
        )
        local = self._config.url is None
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.RLock() if local else contextlib.nullcontext()
        )
        self._client = self._connect()
        self._closed = False
        try:
            self._ensure_collection()
        except BaseException:
            self._client.close()
            raise

    # -- the VectorIndex protocol ------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def name(self) -> str:
        return self._name

    def upsert(self, ids: IdArray, vectors: VectorArray) -> None:
        """Add vectors, replacing any with the same id; within a batch the last wins.

        Durable on return (see the module docstring), in requests of 512 points.
        """
        ids, vectors = checked_batch(ids, vectors, self._dim)
        with self._lock, self._errors("write points"):
            self._check_open()
            for start in range(0, ids.size, _UPSERT_BATCH):
                stop = start + _UPSERT_BATCH
                batch = models.Batch(
                    ids=ids[start:stop].tolist(), vectors=vectors[start:stop].tolist()
                )
                self._client.upsert(self._name, points=batch, wait=True)

    def delete(self, ids: IdArray | Sequence[int]) -> None:
        """Remove points by id; absent ids are ignored."""
        wanted = as_ids(ids)
        with self._lock, self._errors("delete points"):
            self._check_open()
            for start in range(0, wanted.size, _DELETE_BATCH):
                selector = models.PointIdsList(
                    points=wanted[start : start + _DELETE_BATCH].tolist()
                )
                self._client.delete(self._name, points_selector=selector, wait=True)

    def search(
        self,
        queries: VectorArray,
        k: int,
        allowed_ids: IdArray | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` nearest points to each query row, best first, in one request.

        ``queries`` is one vector or a ``(n, dim)`` array. ``allowed_ids`` becomes
        a ``HasIdCondition`` filter that Qdrant applies inside the search.
        """
        queries = as_queries(queries, self._dim)
        if k < 1:
            raise IndexBackendError(f"Search needs k of at least 1, not {k}.")
        query_filter = None
        if allowed_ids is not None:
            allowed = as_ids(allowed_ids)
            if allowed.size == 0:
                return [[] for _ in range(queries.shape[0])]
            query_filter = models.Filter(
                must=[models.HasIdCondition(has_id=allowed.tolist())]
            )
        if queries.shape[0] == 0:
            return []
        requests = [
            models.QueryRequest(
                query=row.tolist(), filter=query_filter, limit=k, with_payload=False
            )
            for row in queries
        ]
        with self._lock, self._errors("search"):
            self._check_open()
            responses = self._client.query_batch_points(self._name, requests=requests)
        return [
            [Hit(int(point.id), float(point.score)) for point in response.points]
            for response in responses
        ]

    def flush(self) -> None:
        """Nothing to do: each write was durable when it returned (see the module doc)."""
        with self._lock:
            self._check_open()

    def count(self) -> int:
        with self._lock, self._errors("count points"):
            self._check_open()
            return int(self._client.count(self._name, exact=True).count)

    def ids(self) -> IdArray:
        """Every point id, read by scrolling through the collection."""
        pages: list[list[int]] = []
        offset: Any = None
        with self._lock, self._errors("list point ids"):
            self._check_open()
            while True:
                records, offset = self._client.scroll(
                    self._name,
                    limit=_SCROLL_PAGE,
                    offset=offset,
                    with_payload=False,
                    with_vectors=False,
                )
                pages.append([int(record.id) for record in records])
                if offset is None:
                    break
        return np.fromiter((i for page in pages for i in page), dtype=np.int64)

    def close(self) -> None:
        """Close the client, freeing a local folder's lock (in-memory data is lost)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._client.close()

    def drop(self) -> None:
        """Delete the collection (and a local folder); the index is closed after."""
        with self._lock:
            client = self._connect() if self._closed else self._client
            try:
                with self._errors("delete the collection"):
                    client.delete_collection(self._name)
            finally:
                client.close()
                self._closed = True
            if self._folder is not None and self._folder.exists():
                shutil.rmtree(self._folder)
        logger.info(
            "Dropped the Qdrant collection %(collection)s at %(where)s",
            {"collection": self._name, "where": self._where},
        )

    def __repr__(self) -> str:
        return f"QdrantVectorIndex({self._name!r}, dim={self._dim}, at={self._where!r})"

    # -- helpers ------------------------------------------------------------------

    def _connect(self) -> QdrantClient:
        config = self._config
        try:
            if config.url is not None:
                api_key = (
                    None
                    if config.api_key is None
                    else config.api_key.get_secret_value()
                )
                timeout = math.ceil(config.timeout_s)
                return QdrantClient(url=config.url, api_key=api_key, timeout=timeout)
            if self._folder is None:
                return QdrantClient(location=":memory:")
            return QdrantClient(path=str(self._folder))
        except RuntimeError as err:
            raise IndexBackendError(
                f"Qdrant could not open {self._where}: {err}. Local mode lets one "
                "client open a folder at a time: close the other instance of this "
                "index, or use a Qdrant server for shared access."
            ) from err

    def _ensure_collection(self) -> None:
        with self._errors("open the collection"):
            if not self._client.collection_exists(self._name):
                self._create_collection()
            params = self._client.get_collection(self._name).config.params.vectors
        if not isinstance(params, models.VectorParams):
            raise IndexBackendError(
                f"The Qdrant collection {self._name!r} at {self._where} uses named "
                "vectors; ragline needs a collection with one unnamed vector. Pick "
                "another collection name."
            )
        if params.size != self._dim:
            raise IndexBackendError(
                f"The Qdrant collection {self._name!r} at {self._where} holds vectors "
                f"of dimension {params.size}, not {self._dim}: the embedder has "
                f"changed. Open it with dim={params.size}, or build a new generation "
                "for the new embedder."
            )
        if params.distance != models.Distance.COSINE:
            raise IndexBackendError(
                f"The Qdrant collection {self._name!r} at {self._where} uses "
                f"{params.distance.value} distance; ragline needs cosine. Pick another "
                "collection name."
            )

    def _create_collection(self) -> None:
        vectors = models.VectorParams(size=self._dim, distance=models.Distance.COSINE)
        try:
            self._client.create_collection(self._name, vectors_config=vectors)
        except UnexpectedResponse:
            # Another client may have created it in the meantime (a server only).
            if not self._client.collection_exists(self._name):
                raise
        logger.info(
            "Created the Qdrant collection %(collection)s at %(where)s",
            {"collection": self._name, "where": self._where},
        )

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn a client failure into an ``IndexBackendError`` naming the collection."""
        try:
            yield
        except IndexBackendError:
            raise
        except _CLIENT_ERRORS as err:
            raise IndexBackendError(
                f"Qdrant could not {action} in collection {self._name!r} at "
                f"{self._where}: {err}. Check that the server is reachable and the "
                "collection exists, then retry."
            ) from err

    def _check_open(self) -> None:
        if self._closed:
            raise IndexBackendError(
                f"The Qdrant index {self._name!r} at {self._where} is closed; open it "
                "again to use it."
            )


def _local_folder(
    config: QdrantConfig, location: Path | None, name: str
) -> Path | None:
    """The folder of a local on-disk index, or None for a server or memory."""
    if config.url is not None and config.in_memory:
        raise ConfigError(
            "QdrantConfig sets both url and in_memory; keep url for a server or "
            "in_memory for a throwaway local index."
        )
    if config.url is not None or config.in_memory:
        return None
    if location is None:
        raise ConfigError(
            "Qdrant local mode keeps its files on disk: give a location folder, or "
            "set qdrant.url for a server or qdrant.in_memory for a throwaway index."
        )
    return location / name
