"""The ``VectorIndex`` protocol every vector backend implements.

Invariants every backend keeps (the shared contract suite in
``tests/index/test_vector_contract.py`` checks them):

* Ids are positive 64-bit integers chosen by the caller. ``upsert`` of an id
  that exists replaces its vector, so writing the same batch twice is
  harmless: there are never two vectors with one id.
* Vectors are L2-normalised by the caller; ``score`` is the inner product
  (cosine similarity), higher is better, results best first.
* ``search`` with ``allowed_ids`` returns only those ids (access control and
  metadata filters are applied inside the search, not after it, so ``k``
  results come back whenever ``k`` allowed vectors exist).
* Writes become durable at ``flush``. After a crash, the index reopens in the
  state of the last completed ``flush``: never a torn state.
* ``delete`` of an id that is absent is not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["Hit", "IdArray", "VectorArray", "VectorIndex"]

IdArray = npt.NDArray[np.int64]
VectorArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: the vector's id and its cosine similarity to the query."""

    id: int
    score: float


@runtime_checkable
class VectorIndex(Protocol):
    """A persistent store of id-addressed vectors with top-k similarity search."""

    @property
    def dim(self) -> int: ...

    def upsert(self, ids: IdArray, vectors: VectorArray) -> None:
        """Add vectors, replacing any with the same id."""

    def delete(self, ids: IdArray | Sequence[int]) -> None:
        """Remove vectors by id; absent ids are ignored."""

    def search(
        self,
        queries: VectorArray,
        k: int,
        allowed_ids: IdArray | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` nearest vectors to each query row, best first."""

    def flush(self) -> None:
        """Make every write so far durable (an atomic commit point)."""

    def count(self) -> int:
        """How many vectors the index holds."""

    def ids(self) -> IdArray:
        """Every id the index holds, in no particular order."""

    def close(self) -> None:
        """Release files and locks; the index must be reopened to be used again."""

    def drop(self) -> None:
        """Delete the index and its storage for good."""
