"""Steps both backends share, so that they key, store and check entries alike."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from .base import (
    CachedAnswer,
    CacheStats,
    Embedding,
    HitKind,
    VersionLookup,
    normalize_question,
)

__all__ = [
    "Counters",
    "as_unit_vector",
    "decode_entry",
    "encode_entry",
    "entry_id",
    "is_current",
]


def entry_id(question: str) -> str:
    """The id of a question's entry within its scope: a hash of its normal form."""
    normal = normalize_question(question)
    return hashlib.sha256(normal.encode("utf-8")).hexdigest()[:32]


def encode_entry(
    payload: Mapping[str, Any], cited_versions: Mapping[str, str]
) -> bytes:
    """The one serialised form of an entry, encoded once per put."""
    entry = {"versions": dict(cited_versions), "payload": dict(payload)}
    try:
        text = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"The answer payload cannot be cached because it is not JSON-able: {err}. "
            "Cache plain dicts, lists, strings and numbers only."
        ) from err
    return text.encode("utf-8")


def decode_entry(blob: bytes) -> tuple[dict[str, str], dict[str, Any]]:
    """The cited versions and the payload of a stored entry.

    Raises ``ValueError`` if the blob is not an entry (written by someone else
    under the same prefix, or cut short).
    """
    entry = json.loads(blob)
    if not isinstance(entry, dict):
        raise ValueError("the stored value is not a JSON object")
    versions, payload = entry.get("versions"), entry.get("payload")
    if not isinstance(versions, dict) or not isinstance(payload, dict):
        raise ValueError("the stored value lacks 'versions' or 'payload'")
    return versions, payload


def is_current(cited: Mapping[str, str], current_versions: VersionLookup) -> bool:
    """Whether every cited document still has the version the answer was made from."""
    if not cited:
        return True
    current = current_versions(list(cited))
    return all(current.get(doc_id) == version for doc_id, version in cited.items())


def as_unit_vector(embedding: Embedding) -> Embedding | None:
    """``embedding`` as a flat float32 vector of length one; ``None`` if it has none.

    Embedders already normalise; doing it again costs microseconds and keeps
    the threshold a true cosine whatever the caller passes.
    """
    vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if vector.size == 0 or not np.isfinite(norm) or norm == 0.0:
        return None
    return vector / np.float32(norm)


class Counters:
    """Thread-safe hit and miss counts behind ``stats()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {name: 0 for name in CacheStats.__dataclass_fields__}

    def lookup(self, kind: HitKind, answer: CachedAnswer | None) -> None:
        self._add(f"{kind}_hits" if answer is not None else f"{kind}_misses")

    def stale(self) -> None:
        self._add("stale")

    def error(self) -> None:
        self._add("errors")

    def snapshot(self) -> CacheStats:
        with self._lock:
            return CacheStats(**self._counts)

    def _add(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1
