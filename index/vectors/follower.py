"""A read-only view of a FAISS index that another process writes.

A serving process cannot own an index that an ingest is writing, yet it must
answer from the latest committed state. :class:`FollowingIndex` holds a
read-only :class:`~index.vectors.faiss.FaissVectorIndex` and, at most every
``check_seconds``, compares its version with the one committed on disk. When
the writer has committed a newer version, a background thread opens it beside
the current one and swaps it in; searches never wait for a reload, and go on
against the previous version until the new one is ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from index.config import FaissConfig
from ingestion.errors import IndexBackendError

from .base import Hit, IdArray, VectorArray
from .faiss import FaissVectorIndex

__all__ = ["FollowingIndex"]

logger = logging.getLogger(__name__)


class FollowingIndex:
    """Searches the newest committed version of a FAISS folder, read-only."""

    def __init__(
        self,
        folder: Path,
        *,
        dim: int,
        config: FaissConfig | None = None,
        check_seconds: float = 1.0,
    ) -> None:
        self._folder = folder
        self._dim = dim
        self._config = config
        self._check_seconds = check_seconds
        self._current = self._open()
        self._next_check = time.monotonic() + check_seconds
        self._reloading = threading.Lock()
        self._closed = False

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def version(self) -> int:
        """The committed version searches currently run against."""
        return self._current.version

    def search(
        self, queries: VectorArray, k: int, allowed_ids: IdArray | None = None
    ) -> list[list[Hit]]:
        self._maybe_reload()
        return self._current.search(queries, k, allowed_ids)

    def count(self) -> int:
        return self._current.count()

    def ids(self) -> IdArray:
        return self._current.ids()

    def refresh(self) -> bool:
        """Load the newest committed version now; True if it changed."""
        newest = FaissVectorIndex.committed_version(self._folder)
        if newest == self._current.version:
            return False
        self._current = self._open()
        return True

    def upsert(self, ids: IdArray, vectors: VectorArray) -> None:
        raise self._read_only_error()

    def delete(self, ids: IdArray | Sequence[int]) -> None:
        raise self._read_only_error()

    def flush(self) -> None:
        raise self._read_only_error()

    def drop(self) -> None:
        raise self._read_only_error()

    def close(self) -> None:
        self._closed = True
        self._current.close()

    # -- reloading ---------------------------------------------------------

    def _open(self) -> FaissVectorIndex:
        return FaissVectorIndex(
            self._folder, dim=self._dim, config=self._config, read_only=True
        )

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check or self._closed:
            return
        self._next_check = now + self._check_seconds
        if not self._reloading.acquire(blocking=False):
            return
        try:
            newest = FaissVectorIndex.committed_version(self._folder)
        except IndexBackendError:
            self._reloading.release()
            raise
        if newest == self._current.version:
            self._reloading.release()
            return
        threading.Thread(
            target=self._reload, name="ragline-index-reload", daemon=True
        ).start()

    def _reload(self) -> None:
        try:
            started = time.perf_counter()
            fresh = self._open()
            previous, self._current = self._current, fresh
            logger.info(
                "index reloaded: folder=%s version=%d previous=%d seconds=%.2f",
                self._folder,
                fresh.version,
                previous.version,
                time.perf_counter() - started,
            )
        except IndexBackendError as err:
            logger.warning(
                "index reload failed, still serving the previous version: "
                "folder=%s error=%s",
                self._folder,
                err,
            )
        finally:
            self._reloading.release()

    def _read_only_error(self) -> IndexBackendError:
        return IndexBackendError(
            f"The index at {self._folder} is followed read-only by this process; "
            "writes go through the process that ingests into it."
        )
