"""Argument checks shared by the vector backends."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ingestion.errors import IndexBackendError

from .base import IdArray, VectorArray

__all__ = ["as_ids", "as_queries", "checked_batch"]


def as_ids(ids: IdArray | Sequence[int]) -> IdArray:
    """``ids`` as a 1-D int64 array."""
    array = np.asarray(ids)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise IndexBackendError(
            f"Ids must be a 1-D sequence of integers, not an array of {array.dtype} "
            f"with shape {array.shape}."
        )
    return array.astype(np.int64, copy=False)


def checked_batch(
    ids: IdArray | Sequence[int], vectors: VectorArray, dim: int
) -> tuple[IdArray, VectorArray]:
    """Ids and vectors of an upsert, checked; duplicate ids keep their last vector."""
    id_array = as_ids(ids)
    if id_array.size and id_array.min() <= 0:
        raise IndexBackendError(
            f"Ids must be positive 64-bit integers; got {int(id_array.min())}."
        )
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise IndexBackendError(
            f"The vectors have shape {matrix.shape}, but this index holds vectors of "
            f"dimension {dim}: embed with the model the index was built for."
        )
    if matrix.shape[0] != id_array.size:
        raise IndexBackendError(
            f"Got {id_array.size} ids for {matrix.shape[0]} vectors; give one id "
            "per vector."
        )
    if not np.isfinite(matrix).all():
        raise IndexBackendError(
            "Some vectors hold NaN or infinite values; fix the embedder."
        )
    unique, last = np.unique(id_array[::-1], return_index=True)
    if unique.size < id_array.size:
        keep = np.sort(id_array.size - 1 - last)
        return id_array[keep], matrix[keep]
    return id_array, matrix


def as_queries(queries: VectorArray, dim: int) -> VectorArray:
    """Queries as a C-contiguous float32 ``(n, dim)`` array; a vector becomes a row."""
    matrix = np.ascontiguousarray(queries, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix.reshape(1, -1)
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise IndexBackendError(
            f"The queries have shape {np.shape(queries)}, but this index holds vectors "
            f"of dimension {dim}: embed them with the model the index was built for."
        )
    return matrix
