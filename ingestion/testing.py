"""Fakes for testing code that uses ingestion's protocols.

:class:`HashEmbedder` stands in for a real embedding model in tests of the
code that calls an ``Embedder``: it is deterministic, needs no model files,
and texts sharing words get similar vectors, so search results make sense.
The real model is tested on its own and end to end.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from .embedding import VectorArray

__all__ = ["HashEmbedder"]

_WORD = re.compile(r"\w+")


class HashEmbedder:
    """Bag-of-words vectors by feature hashing; counts whitespace-separated tokens."""

    def __init__(self, dim: int = 64) -> None:
        self._dim = dim
        self.calls = 0
        self.texts_embedded = 0

    @property
    def model_id(self) -> str:
        return f"test/hash-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> VectorArray:
        self.calls += 1
        self.texts_embedded += len(texts)
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                bucket = int.from_bytes(
                    hashlib.blake2b(word.encode(), digest_size=4).digest()
                )
                out[row, bucket % self._dim] += 1.0
            out[row, 0] += 1e-3  # no all-zero rows
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]
