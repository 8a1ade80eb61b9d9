"""A FAISS vector index on local disk: exact search while small, HNSW once large.

One index lives in one folder (``location/name/``)::

    manifest.json        the committed state: version, dim, mode and the files below
    seg-<v>-<row>.npy    a run of rows starting at <row>: their ids, then their vectors
    dead-<v>.npy         a bitmap of the dead rows (replaced or deleted), when any
    graph-<v>.faiss      the HNSW graph without its vectors, covering a prefix of rows
    .lock                held (flock) while a process has the index open

How the index holds its vectors:

* Every upsert appends rows to a FAISS flat storage; the row of a replaced or
  deleted id is marked dead. The FAISS label of a vector is its row, and a
  small table maps rows to ids. Dead rows are excluded inside every search by
  an ``IDSelector``. When dead rows pass 20% of all rows, ``flush`` compacts:
  it rebuilds the structure over the live rows only and rewrites the folder.
* While at most ``exact_max_vectors`` vectors are live, search is exact (a
  flat inner-product scan). Past that, the index builds an HNSW graph over
  its rows once and keeps adding to it. A compaction chooses again by count.
* ``allowed_ids`` becomes an ``IDSelectorBatch`` over the allowed rows. When
  so few rows are allowed that a graph walk would mostly visit forbidden
  nodes, the search is exact over just the allowed vectors. A graph search
  that returns fewer than ``min(k, allowed)`` results is redone exactly, so
  ``k`` results come back whenever ``k`` allowed vectors exist.

Durability (``flush`` is the only commit point; ``close`` does not flush):

* Data files are immutable and named after the version that wrote them; no
  manifest names them until they are complete and fsynced, so until then they
  are as good as temporary. ``flush`` then writes ``manifest.json.tmp``,
  fsyncs it and ``os.replace``-s the manifest, fsyncing the folder before and
  after. A crash at any instant leaves the old or the new manifest, and every
  file either names is complete. Files no manifest names are removed on the
  next open or flush.
* A flush writes the rows appended since the last flush as a new segment, the
  dead bitmap if it changed (one bit per row: 125 kB at a million rows) and a
  manifest. Segments are merged in tiers of eight, so each row is rewritten
  about once per tier (a handful of times in all) and a folder holds a few
  dozen segments at most. The graph is written (without its vectors) only
  when the rows it lacks pass 10% of the index; opening adds the rows it
  lacks, and rebuilds it from the vectors if it is missing or unreadable.
* One process owns an index at a time: opening takes an exclusive ``flock``
  on ``.lock``, so a second writable open, in this process or another, fails.
* Any number of readers may open the folder ``read_only`` beside the writer:
  they take no lock, load the last committed version and never write. A
  reader loading a version the writer has just replaced may find a file gone
  (the writer removes files no manifest names); it then starts again from the
  new manifest. :meth:`FaissVectorIndex.committed_version` tells a reader when
  a newer version is on disk, so it can open that one beside the old.

Costs, measured by ``bench/bench_vectors.py`` (384 dimensions, 2 cores):

* A flush of 300 upserts and 30 deletes takes about 3 ms (p50; p99 25 ms) at
  100k and at 1M vectors alike. The first flush of 1M vectors writes 1.7 GB
  in about 6 s; a tier merge or a graph write makes the odd flush cost more,
  and a compaction rebuilds the graph (minutes at a million vectors).
* Reopening 1M vectors took 4.4 s with 6k rows missing from the stored
  graph. The graph lacks at most 10% of the rows; adding them costs about
  1.5 s per 10k rows (up to some 15 s at a million).
* Memory is the vectors (4 bytes per dimension each), the graph (about
  ``8 * hnsw_m`` bytes per vector) and the id table (about 100 bytes per
  id); a compaction briefly holds the live vectors twice.
* Graph quality: a graph grown batch by batch on strongly clustered data
  needs a larger ``ef_construction`` than one built at once; at 1M clustered
  vectors, recall@10 is 0.91 with ``ef_construction=80`` and 0.98 with 160
  (at ``ef_search=128``). A compaction rebuilds the graph at once.

Thread safety: one lock guards every mutation and search of an instance.
FAISS's OpenMP thread count is left to the caller (``faiss.omp_set_num_threads``).
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import faiss
import numpy as np
import numpy.typing as npt

from index.config import FaissConfig
from ingestion.errors import IndexBackendError

from ._checks import as_ids, as_queries, checked_batch
from .base import Hit, IdArray, VectorArray

__all__ = ["FaissVectorIndex"]

logger = logging.getLogger(__name__)

Mode = Literal["exact", "hnsw"]
BoolArray = npt.NDArray[np.bool_]

_FORMAT = 1
_MANIFEST = "manifest.json"
_LOCK = ".lock"
# How often a reader starts again when a writer replaces files under it.
_READ_ONLY_ATTEMPTS = 5
_DATA_PREFIXES = ("seg-", "dead-", "graph-")

# Compact once this fraction of rows is dead (replaced or deleted).
_COMPACT_DEAD_FRACTION = 0.2
# Write the graph again once the rows it lacks pass this fraction of all rows.
_GRAPH_STALE_FRACTION = 0.1
# Segments are merged when this many of one size tier end the list.
_MERGE_FANOUT = 8
_MERGE_BASE_ROWS = 4096
# A filter allowing at most max(min rows, fraction of rows) is searched exactly.
_EXACT_FILTER_MIN_ROWS = 4096
_EXACT_FILTER_FRACTION = 0.02
# Rows added to a graph per call while building, between progress lines.
_BUILD_CHUNK_ROWS = 65_536
# Rows read from a segment file at a time when opening.
_READ_CHUNK_ROWS = 65_536


@dataclass(frozen=True, slots=True)
class _FileRef:
    """A data file of the folder and how many rows it covers."""

    file: str
    rows: int


@dataclass(frozen=True, slots=True)
class _Manifest:
    """One committed state of the folder."""

    version: int
    dim: int
    mode: Mode
    segments: tuple[_FileRef, ...] = ()
    dead: _FileRef | None = None
    graph: _FileRef | None = None

    @property
    def rows(self) -> int:
        return sum(segment.rows for segment in self.segments)

    def files(self) -> set[str]:
        refs = [*self.segments, self.dead, self.graph]
        return {ref.file for ref in refs if ref is not None}

    def to_json(self) -> str:
        def ref(value: _FileRef | None) -> dict[str, Any] | None:
            return None if value is None else {"file": value.file, "rows": value.rows}

        return json.dumps(
            {
                "format": _FORMAT,
                "version": self.version,
                "dim": self.dim,
                "mode": self.mode,
                "segments": [ref(segment) for segment in self.segments],
                "dead": ref(self.dead),
                "graph": ref(self.graph),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> _Manifest:
        data = json.loads(text)
        if data.get("format") != _FORMAT:
            raise ValueError(f"unknown manifest format {data.get('format')!r}")
        if data["mode"] not in ("exact", "hnsw"):
            raise ValueError(f"unknown mode {data['mode']!r}")

        def ref(value: dict[str, Any] | None) -> _FileRef | None:
            return (
                None
                if value is None
                else _FileRef(str(value["file"]), int(value["rows"]))
            )

        segments = tuple(
            _FileRef(str(s["file"]), int(s["rows"])) for s in data["segments"]
        )
        return cls(
            version=int(data["version"]),
            dim=int(data["dim"]),
            mode=data["mode"],
            segments=segments,
            dead=ref(data["dead"]),
            graph=ref(data["graph"]),
        )


class _RowTable:
    """Which id each row of the FAISS storage holds, and which rows are dead.

    Every live id has exactly one live row; a dead row keeps its id for the
    record but no longer answers for it.
    """

    def __init__(
        self, ids: IdArray | None = None, dead: BoolArray | None = None
    ) -> None:
        n = 0 if ids is None else ids.size
        self._ids = np.zeros(max(n, 1024), dtype=np.int64)
        self._dead = np.zeros(self._ids.size, dtype=np.bool_)
        self._n = n
        if ids is not None:
            self._ids[:n] = ids
        if dead is not None:
            self._dead[:n] = dead
        live = np.flatnonzero(~self._dead[:n])
        self._row_of = dict(zip(self._ids[live].tolist(), live.tolist(), strict=True))
        self.n_dead = n - live.size
        if len(self._row_of) != live.size:
            raise ValueError("an id is held by more than one live row")

    @property
    def n_rows(self) -> int:
        return self._n

    @property
    def n_live(self) -> int:
        return len(self._row_of)

    def append(self, ids: IdArray) -> None:
        """Give the next rows to ``ids``, none of which may be live."""
        needed = self._n + ids.size
        if needed > self._ids.size:
            capacity = max(needed, 2 * self._ids.size)
            self._ids = np.resize(self._ids, capacity)
            self._dead = np.resize(self._dead, capacity)
        rows = range(self._n, needed)
        self._ids[self._n : needed] = ids
        self._dead[self._n : needed] = False
        self._row_of.update(zip(ids.tolist(), rows, strict=True))
        self._n = needed

    def kill(self, ids: IdArray) -> int:
        """Mark the live rows of ``ids`` dead; returns how many there were."""
        pop = self._row_of.pop
        rows = [row for id_ in ids.tolist() if (row := pop(id_, None)) is not None]
        self._dead[rows] = True
        self.n_dead += len(rows)
        return len(rows)

    def rows_of(self, ids: IdArray) -> IdArray:
        """The live rows of those ``ids`` that are present, each once, ascending."""
        get = self._row_of.get
        rows = [row for row in map(get, ids.tolist()) if row is not None]
        return np.unique(np.asarray(rows, dtype=np.int64))

    def ids_of(self, rows: IdArray) -> IdArray:
        return self._ids[rows]

    def ids_between(self, start: int, stop: int) -> IdArray:
        return self._ids[start:stop]

    def live_ids(self) -> IdArray:
        return np.fromiter(self._row_of, dtype=np.int64, count=len(self._row_of))

    def live_rows(self) -> IdArray:
        return np.flatnonzero(~self._dead[: self._n])

    def dead_mask(self) -> BoolArray:
        return self._dead[: self._n]


class _FolderLock:
    """An exclusive ``flock`` on the folder's lock file, held while open."""

    def __init__(self, folder: Path) -> None:
        self._path = folder / _LOCK
        self._file: IO[bytes] | None = None

    def acquire(self) -> None:
        handle = open(self._path, "ab")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            handle.close()
            raise IndexBackendError(
                f"The FAISS index at {self._path.parent} is already open, in this "
                "process or another; close that instance first (one process owns "
                "an index at a time)."
            ) from err
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class _Folder:
    """The files of one index folder, written so that a crash never tears them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read_manifest(self) -> _Manifest | None:
        try:
            text = (self.path / _MANIFEST).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as err:
            raise self.damaged(_MANIFEST, err) from err
        try:
            return _Manifest.from_json(text)
        except (ValueError, KeyError, TypeError) as err:
            raise self.damaged(_MANIFEST, err) from err

    def commit(self, manifest: _Manifest) -> None:
        """Make ``manifest`` the folder's state, atomically and durably."""
        _fsync_dir(self.path)
        tmp = self.path / f"{_MANIFEST}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(manifest.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path / _MANIFEST)
        _fsync_dir(self.path)

    def write_segment(self, name: str, ids: IdArray, vectors: VectorArray) -> _FileRef:
        with open(self.path / name, "wb") as handle:
            np.save(handle, ids)
            np.save(handle, vectors)
            handle.flush()
            os.fsync(handle.fileno())
        return _FileRef(name, int(ids.size))

    def read_segment(
        self, ref: _FileRef, dim: int, take: Callable[[VectorArray], None]
    ) -> IdArray:
        """The ids of a segment; its vectors go to ``take`` a chunk at a time.

        Reading in chunks keeps the memory of opening near the index's own.
        """
        try:
            with open(self.path / ref.file, "rb") as handle:
                ids = np.load(handle)
                shape, dtype = _read_npy_header(handle)
                if ids.shape != (ref.rows,) or shape != (ref.rows, dim):
                    raise ValueError("its arrays have the wrong shape")
                if dtype != np.float32:
                    raise ValueError(f"its vectors are {dtype}, not float32")
                for start in range(0, ref.rows, _READ_CHUNK_ROWS):
                    rows = min(_READ_CHUNK_ROWS, ref.rows - start)
                    take(_read_exactly(handle, rows, dim))
        except (OSError, ValueError, EOFError) as err:
            raise self.damaged(ref.file, err) from err
        return ids.astype(np.int64, copy=False)

    def write_dead(self, name: str, dead: BoolArray) -> _FileRef:
        with open(self.path / name, "wb") as handle:
            np.save(handle, np.packbits(dead, bitorder="little"))
            handle.flush()
            os.fsync(handle.fileno())
        return _FileRef(name, int(dead.size))

    def read_dead(self, ref: _FileRef) -> BoolArray:
        try:
            packed = np.load(self.path / ref.file)
            dead = np.unpackbits(packed, count=ref.rows, bitorder="little")
        except (OSError, ValueError, EOFError) as err:
            raise self.damaged(ref.file, err) from err
        return dead.astype(np.bool_)

    def write_graph(self, name: str, index: Any) -> _FileRef:
        path = self.path / name
        # faiss's stubs lack the (index, file name, io_flags) overload it has.
        flags = faiss.IO_FLAG_SKIP_STORAGE
        faiss.write_index(index, str(path), flags)  # type: ignore[call-overload]
        _fsync_file(path)
        return _FileRef(name, int(index.ntotal))

    def read_graph(self, ref: _FileRef, dim: int) -> Any | None:
        """The graph without its vectors, or None (with a warning) if unusable."""
        try:
            graph = faiss.read_index(
                str(self.path / ref.file), faiss.IO_FLAG_SKIP_STORAGE
            )
        except RuntimeError as err:
            logger.warning(
                "The HNSW graph %(file)s in %(folder)s cannot be read; it will be "
                "rebuilt from the vectors: %(error)s",
                {"file": ref.file, "folder": self.path, "error": err},
            )
            return None
        if not isinstance(graph, faiss.IndexHNSW) or (graph.ntotal, graph.d) != (
            ref.rows,
            dim,
        ):
            logger.warning(
                "The HNSW graph %(file)s in %(folder)s does not match its manifest; "
                "it will be rebuilt from the vectors.",
                {"file": ref.file, "folder": self.path},
            )
            return None
        return graph

    def remove_unreferenced(self, manifest: _Manifest) -> None:
        """Delete data files no committed manifest names (left by a crash or merge)."""
        keep = manifest.files()
        for entry in os.scandir(self.path):
            ours = entry.name.startswith(_DATA_PREFIXES) or entry.name.endswith(".tmp")
            if ours and entry.name not in keep:
                Path(entry.path).unlink(missing_ok=True)

    def damaged(self, file: str, cause: BaseException) -> IndexBackendError:
        return IndexBackendError(
            f"The FAISS index at {self.path} is damaged: {file} cannot be read "
            f"({cause}). Restore the folder from a backup, or drop it and rebuild "
            "the generation from its sources."
        )


class FaissVectorIndex:
    """A FAISS index in one folder on local disk (see the module docstring).

    Opening takes the folder's lock and loads the state of the last ``flush``;
    a new folder starts empty. ``close`` does not flush: writes since the last
    ``flush`` are discarded, so callers flush at their commit points.

    Example::

        index = FaissVectorIndex(Path("data/indexes/faiss/docs-g3"), dim=384)
        index.upsert(np.array([1, 2]), vectors)
        index.flush()
        hits = index.search(query_vectors, k=10)
        index.close()
    """

    def __init__(
        self,
        folder: Path,
        *,
        dim: int,
        config: FaissConfig | None = None,
        read_only: bool = False,
    ) -> None:
        if dim < 1:
            raise IndexBackendError(
                f"A vector index needs a dimension of at least 1, not {dim}."
            )
        self._dim = dim
        self._config = config or FaissConfig()
        self._ef_search = self._config.ef_search
        self._lock = threading.RLock()
        self._folder = _Folder(folder)
        self._closed = False
        # faiss.IndexFlatIP while search is exact, faiss.IndexHNSWFlat once large.
        self._index: Any = faiss.IndexFlatIP(dim)
        self._mode: Mode = "exact"
        self._rows = _RowTable()
        self._live_bitmap: npt.NDArray[np.uint8] | None = None
        self._committed = self._persisted = _Manifest(version=0, dim=dim, mode="exact")
        # Never reused, even by a flush that failed: its files may be on disk.
        self._next_version = 1
        self._dirty = self._dead_dirty = False
        self._read_only = read_only
        if read_only:
            self._folder_lock = None
            self._open_read_only()
            return
        folder.mkdir(parents=True, exist_ok=True)
        self._folder_lock = _FolderLock(folder)
        self._folder_lock.acquire()
        try:
            self._open()
        except BaseException:
            self._folder_lock.release()
            raise

    # -- the VectorIndex protocol ------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def folder(self) -> Path:
        return self._folder.path

    @property
    def version(self) -> int:
        """The committed version this instance holds (0 for a new, empty index)."""
        return self._committed.version

    @property
    def read_only(self) -> bool:
        return self._read_only

    @staticmethod
    def committed_version(folder: Path) -> int:
        """The version last committed to ``folder`` on disk, read without opening it."""
        manifest = _Folder(folder).read_manifest()
        return 0 if manifest is None else manifest.version

    @property
    def mode(self) -> Mode:
        """``"exact"`` while search scans every vector, ``"hnsw"`` once it walks a graph."""
        return self._mode

    @property
    def ef_search(self) -> int:
        """How many candidates a graph search keeps (at least ``k`` is used)."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if value < 1:
            raise IndexBackendError(f"ef_search must be at least 1, not {value}.")
        self._ef_search = value

    def upsert(self, ids: IdArray, vectors: VectorArray) -> None:
        """Add vectors, replacing any with the same id; within a batch the last wins."""
        ids, vectors = checked_batch(ids, vectors, self._dim)
        if ids.size == 0:
            return
        with self._lock:
            self._check_writable()
            self._append(ids, vectors)
            self._switch_to_hnsw_if_large()

    def delete(self, ids: IdArray | Sequence[int]) -> None:
        """Remove vectors by id; absent ids are ignored."""
        wanted = as_ids(ids)
        with self._lock:
            self._check_writable()
            if self._rows.kill(wanted):
                self._dirty = self._dead_dirty = True
                self._live_bitmap = None

    def search(
        self,
        queries: VectorArray,
        k: int,
        allowed_ids: IdArray | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` nearest vectors to each query row, best first.

        ``queries`` is one vector or a ``(n, dim)`` array. With ``allowed_ids``
        only those ids are returned, ``min(k, allowed present)`` of them.
        """
        queries = as_queries(queries, self._dim)
        if k < 1:
            raise IndexBackendError(f"Search needs k of at least 1, not {k}.")
        allowed = None if allowed_ids is None else as_ids(allowed_ids)
        with self._lock:
            self._check_open()
            rows = None if allowed is None else self._rows.rows_of(allowed)
            candidates = self._rows.n_live if rows is None else rows.size
            if candidates == 0 or queries.shape[0] == 0:
                return [[] for _ in range(queries.shape[0])]
            scores, labels = self._search_rows(queries, k, rows, candidates)
            return self._hits(scores, labels)

    def flush(self) -> None:
        """Commit every write so far to disk, atomically; a no-op if nothing changed."""
        with self._lock:
            self._check_writable()
            if not self._dirty:
                return
            started = time.perf_counter()
            if self._rows.n_dead > _COMPACT_DEAD_FRACTION * self._rows.n_rows:
                self._compact()
            manifest = self._write_version()
            self._folder.commit(manifest)
            self._committed = self._persisted = manifest
            self._dirty = self._dead_dirty = False
            self._folder.remove_unreferenced(manifest)
            logger.debug(
                "Flushed %(folder)s as version %(version)d (%(rows)d rows) "
                "in %(ms).1f ms",
                {
                    "folder": self.folder,
                    "version": manifest.version,
                    "rows": manifest.rows,
                    "ms": 1000 * (time.perf_counter() - started),
                },
            )

    def count(self) -> int:
        with self._lock:
            self._check_open()
            return self._rows.n_live

    def ids(self) -> IdArray:
        with self._lock:
            self._check_open()
            return self._rows.live_ids()

    def close(self) -> None:
        """Release the folder lock and memory; unflushed writes are discarded."""
        with self._lock:
            if self._closed:
                return
            if self._dirty:
                logger.warning(
                    "Closing %(folder)s discards the writes made since its last flush.",
                    {"folder": self.folder},
                )
            self._closed = True
            self._index = faiss.IndexFlatIP(self._dim)
            self._mode = "exact"
            self._rows = _RowTable()
            self._live_bitmap = None
            if self._folder_lock is not None:
                self._folder_lock.release()

    def drop(self) -> None:
        """Close the index and delete its folder for good."""
        with self._lock:
            self._check_writable()
            self.close()
            if self.folder.exists():
                lock = _FolderLock(self.folder)
                lock.acquire()
                try:
                    shutil.rmtree(self.folder)
                finally:
                    lock.release()
            logger.info(
                "Dropped the FAISS index at %(folder)s", {"folder": self.folder}
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else self._mode
        return f"FaissVectorIndex({str(self.folder)!r}, dim={self._dim}, {state})"

    # -- opening --------------------------------------------------------------

    def _open_read_only(self) -> None:
        for attempt in range(_READ_ONLY_ATTEMPTS):
            manifest = self._folder.read_manifest()
            if manifest is None:
                manifest = _Manifest(version=0, dim=self._dim, mode="exact")
            try:
                self._load(manifest)
                return
            except IndexBackendError as err:
                # A writer replaced the version while we read it: start again.
                gone = isinstance(err.__cause__, FileNotFoundError)
                if not gone or attempt == _READ_ONLY_ATTEMPTS - 1:
                    raise

    def _open(self) -> None:
        manifest = self._folder.read_manifest()
        if manifest is None:
            manifest = _Manifest(version=0, dim=self._dim, mode="exact")
            self._folder.remove_unreferenced(manifest)
            self._folder.commit(manifest)
        self._load(manifest)
        self._folder.remove_unreferenced(manifest)

    def _load(self, manifest: _Manifest) -> None:
        if manifest.dim != self._dim:
            raise IndexBackendError(
                f"The FAISS index at {self.folder} holds vectors of dimension "
                f"{manifest.dim}, not {self._dim}: the embedder has changed. Open "
                f"it with dim={manifest.dim}, or build a new generation for the new "
                "embedder."
            )
        self._committed = self._persisted = manifest
        self._next_version = manifest.version + 1
        self._mode = manifest.mode
        self._index, row_ids = self._load_vectors(manifest)
        self._rows = self._load_rows(manifest, row_ids)
        self._switch_to_hnsw_if_large()
        logger.debug(
            "Opened %(folder)s at version %(version)d: %(count)d vectors, "
            "%(mode)s search",
            {
                "folder": self.folder,
                "version": manifest.version,
                "count": self._rows.n_live,
                "mode": self._mode,
            },
        )

    def _load_vectors(self, manifest: _Manifest) -> tuple[Any, IdArray]:
        """The FAISS structure of ``manifest`` and the id of every row."""
        graph = None
        if manifest.mode == "hnsw" and manifest.graph is not None:
            if self._read_only and not (self.folder / manifest.graph.file).exists():
                # Replaced by a writer: the caller starts again from the new manifest.
                gone = FileNotFoundError(manifest.graph.file)
                raise self._folder.damaged(manifest.graph.file, gone) from gone
            graph = self._folder.read_graph(manifest.graph, self._dim)
        if graph is not None and graph.ntotal > manifest.rows:
            raise self._folder.damaged("the graph", ValueError("it has too many rows"))
        prefix = graph.ntotal if graph is not None else manifest.rows
        storage = faiss.IndexFlatIP(self._dim)
        rest: list[VectorArray] = []

        def take(vectors: VectorArray) -> None:
            split = max(0, min(prefix - storage.ntotal, vectors.shape[0]))
            storage.add(vectors[:split])
            if split < vectors.shape[0]:
                rest.append(vectors[split:])

        id_parts = [
            self._folder.read_segment(ref, self._dim, take) for ref in manifest.segments
        ]
        row_ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int64)
        if manifest.mode == "exact":
            return storage, row_ids
        if graph is None:
            logger.info(
                "Building the HNSW graph of %(folder)s", {"folder": self.folder}
            )
            return self._build_hnsw(_flat_vectors(storage)), row_ids
        return self._attach(graph, storage, rest), row_ids

    def _attach(self, graph: Any, storage: Any, rest: list[VectorArray]) -> Any:
        """Give a loaded graph its vectors, then add the rows it lacks."""
        storage.this.disown()
        graph.storage = storage
        graph.own_fields = True
        graph.hnsw.efConstruction = self._config.ef_construction
        missing = sum(part.shape[0] for part in rest)
        if missing:
            logger.info(
                "Adding %(rows)d rows to the HNSW graph of %(folder)s",
                {"rows": missing, "folder": self.folder},
            )
            for part in rest:
                _add_in_chunks(graph, part, self.folder)
        return graph

    def _load_rows(self, manifest: _Manifest, row_ids: IdArray) -> _RowTable:
        dead = np.zeros(row_ids.size, dtype=np.bool_)
        if manifest.dead is not None:
            stored = self._folder.read_dead(manifest.dead)
            if stored.size > dead.size:
                raise self._folder.damaged(
                    manifest.dead.file, ValueError("too many rows")
                )
            dead[: stored.size] = stored
        try:
            return _RowTable(row_ids, dead)
        except ValueError as err:
            raise self._folder.damaged(_MANIFEST, err) from err

    # -- writing in memory ---------------------------------------------------

    def _append(self, ids: IdArray, vectors: VectorArray) -> None:
        try:
            self._index.add(vectors)
        except RuntimeError as err:
            raise IndexBackendError(
                f"FAISS could not add {ids.size} vectors to {self.folder}: {err}"
            ) from err
        if self._rows.kill(ids):
            self._dead_dirty = True
        self._rows.append(ids)
        self._dirty = True
        self._live_bitmap = None

    def _switch_to_hnsw_if_large(self) -> None:
        if self._mode == "hnsw" or self._rows.n_live <= self._config.exact_max_vectors:
            return
        logger.info(
            "%(folder)s holds %(count)d vectors, more than exact_max_vectors "
            "(%(limit)d): building its HNSW graph",
            {
                "folder": self.folder,
                "count": self._rows.n_live,
                "limit": self._config.exact_max_vectors,
            },
        )
        self._index = self._build_hnsw(self._vectors())
        self._mode = "hnsw"
        self._dirty = True

    def _build_hnsw(self, vectors: VectorArray) -> Any:
        graph = faiss.IndexHNSWFlat(
            self._dim, self._config.hnsw_m, faiss.METRIC_INNER_PRODUCT
        )
        graph.hnsw.efConstruction = self._config.ef_construction
        graph.hnsw.efSearch = self._ef_search
        _add_in_chunks(graph, vectors, self.folder)
        return graph

    def _compact(self) -> None:
        """Rebuild over the live rows only; the next version rewrites every file."""
        live = self._rows.live_rows()
        logger.info(
            "Compacting %(folder)s: %(dead)d of %(rows)d rows are dead",
            {
                "folder": self.folder,
                "dead": self._rows.n_dead,
                "rows": self._rows.n_rows,
            },
        )
        vectors = self._vectors()[live]
        ids = self._rows.ids_of(live)
        mode: Mode = "hnsw" if live.size > self._config.exact_max_vectors else "exact"
        if mode == "hnsw":
            index = self._build_hnsw(vectors)
        else:
            index = faiss.IndexFlatIP(self._dim)
            index.add(vectors)
        self._index, self._mode = index, mode
        self._rows = _RowTable(ids)
        self._live_bitmap = None
        self._persisted = _Manifest(
            version=self._committed.version, dim=self._dim, mode=mode
        )

    # -- writing to disk -----------------------------------------------------

    def _write_version(self) -> _Manifest:
        """Write the data files of the next version; returns its manifest."""
        version = self._next_version
        self._next_version += 1
        return _Manifest(
            version=version,
            dim=self._dim,
            mode=self._mode,
            segments=self._write_segments(version),
            dead=self._write_dead(version),
            graph=self._write_graph(version),
        )

    def _write_segments(self, version: int) -> tuple[_FileRef, ...]:
        plan = _plan_segments(list(self._persisted.segments), self._rows.n_rows)
        vectors = self._vectors()
        segments: list[_FileRef] = []
        start = 0
        for rows, existing in plan:
            if existing is None:
                stop = start + rows
                name = f"seg-{version}-{start}.npy"
                ids = self._rows.ids_between(start, stop)
                existing = self._folder.write_segment(name, ids, vectors[start:stop])
            segments.append(existing)
            start += rows
        return tuple(segments)

    def _write_dead(self, version: int) -> _FileRef | None:
        if self._rows.n_dead == 0:
            return None
        if self._persisted.dead is not None and not self._dead_dirty:
            return self._persisted.dead
        return self._folder.write_dead(f"dead-{version}.npy", self._rows.dead_mask())

    def _write_graph(self, version: int) -> _FileRef | None:
        if self._mode != "hnsw":
            return None
        graph = self._persisted.graph
        lacking = self._rows.n_rows - (0 if graph is None else graph.rows)
        if graph is not None and lacking <= _GRAPH_STALE_FRACTION * self._rows.n_rows:
            return graph
        return self._folder.write_graph(f"graph-{version}.faiss", self._index)

    # -- searching -------------------------------------------------------------

    def _search_rows(
        self, queries: VectorArray, k: int, rows: IdArray | None, candidates: int
    ) -> tuple[VectorArray, IdArray]:
        """Scores and rows (-1 past the end) of the best ``k`` candidates per query."""
        if self._mode == "exact" or (
            rows is not None and rows.size <= self._exact_filter_limit()
        ):
            return self._search_exact(queries, k, rows)
        scores, labels = self._search_graph(queries, k, rows)
        short = np.count_nonzero(labels >= 0, axis=1) < min(k, candidates)
        if short.any():
            scores[short], labels[short] = self._search_exact(queries[short], k, rows)
        return scores, labels

    def _search_exact(
        self, queries: VectorArray, k: int, rows: IdArray | None
    ) -> tuple[VectorArray, IdArray]:
        if rows is not None and rows.size <= self._exact_filter_limit():
            return self._search_subset(queries, k, rows)
        params = faiss.SearchParameters()
        params.sel = self._selector(rows)
        scores, labels = self._storage().search(queries, k, params=params)
        return scores, labels

    def _search_subset(
        self, queries: VectorArray, k: int, rows: IdArray
    ) -> tuple[VectorArray, IdArray]:
        """Exact search over just ``rows``: fast when they are few."""
        found = min(k, rows.size)
        scores, positions = faiss.knn(
            queries, self._vectors()[rows], found, metric=faiss.METRIC_INNER_PRODUCT
        )
        padded_scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
        padded_rows = np.full((queries.shape[0], k), -1, dtype=np.int64)
        padded_scores[:, :found] = scores
        padded_rows[:, :found] = rows[positions]
        return padded_scores, padded_rows

    def _search_graph(
        self, queries: VectorArray, k: int, rows: IdArray | None
    ) -> tuple[VectorArray, IdArray]:
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(self._ef_search, k)
        selector = self._selector(rows)
        if selector is not None:
            params.sel = selector
        scores, labels = self._index.search(queries, k, params=params)
        return scores, labels

    def _selector(self, rows: IdArray | None) -> Any | None:
        """The rows a search may return: ``rows``, else the live ones if any died."""
        if rows is not None:
            return faiss.IDSelectorBatch(rows)
        if self._rows.n_dead == 0:
            return None
        bitmap = self._live_bitmap
        if bitmap is None:
            bitmap = np.packbits(~self._rows.dead_mask(), bitorder="little")
            self._live_bitmap = bitmap
        return faiss.IDSelectorBitmap(bitmap.size, faiss.swig_ptr(bitmap))

    def _exact_filter_limit(self) -> int:
        return max(
            _EXACT_FILTER_MIN_ROWS, int(_EXACT_FILTER_FRACTION * self._rows.n_rows)
        )

    def _hits(self, scores: VectorArray, labels: IdArray) -> list[list[Hit]]:
        results: list[list[Hit]] = []
        for score_row, label_row in zip(scores, labels, strict=True):
            found = label_row >= 0
            ids = self._rows.ids_of(label_row[found]).tolist()
            values = score_row[found].tolist()
            results.append(
                [Hit(id_, value) for id_, value in zip(ids, values, strict=True)]
            )
        return results

    # -- helpers ------------------------------------------------------------------

    def _vectors(self) -> VectorArray:
        """A view of every row's vector (valid until the next write)."""
        return _flat_vectors(self._storage())

    def _storage(self) -> Any:
        """The flat index holding every row's vector."""
        if self._mode == "exact":
            return self._index
        return faiss.downcast_index(self._index.storage)

    def _check_open(self) -> None:
        if self._closed:
            raise IndexBackendError(
                f"The FAISS index at {self.folder} is closed; open it again to use it."
            )

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise IndexBackendError(
                f"The FAISS index at {self.folder} is open read-only; only the "
                "process that opened it for writing (an ingest) can change it."
            )


def _plan_segments(
    existing: list[_FileRef], total_rows: int
) -> list[tuple[int, _FileRef | None]]:
    """The segments of the next version: (rows, kept file, or None to write).

    The rows past the existing segments become a new segment. Then the tail
    merges while it is larger (of a higher size tier) than the segment before
    it, or while its last ``_MERGE_FANOUT`` segments share one tier. Tiers
    thus never grow towards the tail and each holds fewer than
    ``_MERGE_FANOUT`` segments: a few dozen files for a billion rows.
    """
    plan: list[tuple[int, _FileRef | None]] = [(ref.rows, ref) for ref in existing]
    written = sum(ref.rows for ref in existing)
    if total_rows > written:
        plan.append((total_rows - written, None))
    while count := _tail_to_merge([rows for rows, _ in plan]):
        plan[-count:] = [(sum(rows for rows, _ in plan[-count:]), None)]
    return plan


def _tail_to_merge(rows: list[int]) -> int:
    """How many segments at the end of ``rows`` (their sizes) merge into one; 0: none."""
    if len(rows) < 2:
        return 0
    last = _tier(rows[-1])
    if _tier(rows[-2]) < last:
        return 2
    tail = rows[-_MERGE_FANOUT:]
    if len(tail) == _MERGE_FANOUT and all(_tier(size) == last for size in tail):
        return _MERGE_FANOUT
    return 0


def _tier(rows: int) -> int:
    """0 below ``_MERGE_BASE_ROWS`` rows, then one more per factor of the fan-out."""
    tier, size = 0, _MERGE_BASE_ROWS
    while rows >= size:
        tier, size = tier + 1, size * _MERGE_FANOUT
    return tier


def _flat_vectors(storage: Any) -> VectorArray:
    """A view of the vectors of a flat FAISS index (valid until it changes)."""
    n, dim = storage.ntotal, storage.d
    if n == 0:
        return np.zeros((0, dim), dtype=np.float32)
    view: VectorArray = faiss.rev_swig_ptr(storage.get_xb(), n * dim).reshape(n, dim)
    return view


def _add_in_chunks(graph: Any, vectors: VectorArray, folder: Path) -> None:
    """Add ``vectors`` to an HNSW graph, logging progress on large builds."""
    total = vectors.shape[0]
    for start in range(0, total, _BUILD_CHUNK_ROWS):
        graph.add(np.ascontiguousarray(vectors[start : start + _BUILD_CHUNK_ROWS]))
        if total > _BUILD_CHUNK_ROWS:
            logger.debug(
                "HNSW graph of %(folder)s: %(done)d of %(total)d rows added",
                {
                    "folder": folder,
                    "done": min(start + _BUILD_CHUNK_ROWS, total),
                    "total": total,
                },
            )


def _read_npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype of the ``.npy`` array starting at the handle's position."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
    if fortran_order:
        raise ValueError("its vectors are not in C order")
    return shape, dtype


def _read_exactly(handle: io.BufferedReader, rows: int, dim: int) -> VectorArray:
    chunk = np.empty((rows, dim), dtype=np.float32)
    if handle.readinto(chunk.data) != chunk.nbytes:
        raise EOFError("it ends early")
    return chunk


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
