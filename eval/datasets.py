"""Golden sets: questions with what a good answer rests on, one JSON object a line.

Each line of a golden set file is an object::

    {"id": "install-1", "question": "How do I install ragline?",
     "reference": "With pip install ragline.",
     "reference_uris": ["handbook/install.md"],
     "reference_chunk_ids": [], "collection": "docs", "metadata": {"topic": "setup"}}

Only ``question`` is required. ``id`` defaults to ``q<line number>``;
``reference_uri`` (one string) may stand in for ``reference_uris``. Blank
lines are skipped. A line that is not valid JSON, lacks a question, has a
value of the wrong type, an unknown key or an id used before is reported as a
:class:`LineError` with its line number and skipped; the other lines load.

The :func:`dataset_hash` of a set identifies its content: it is the SHA-256 of
the items in a normal form (sorted by id, strings stripped, keys sorted), so
reordering lines, reformatting JSON or writing the set back with
:func:`write_golden_set` keeps the hash, while changing any question,
reference or id changes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingestion.errors import NotFound, RaglineError

from .models import GoldenItem

__all__ = [
    "DatasetError",
    "GoldenSet",
    "LineError",
    "dataset_hash",
    "load_golden_set",
    "write_golden_set",
]

logger = logging.getLogger(__name__)

_KEYS = frozenset(
    {
        "id",
        "question",
        "reference",
        "reference_uris",
        "reference_uri",
        "reference_chunk_ids",
        "collection",
        "metadata",
    }
)


class DatasetError(RaglineError, ValueError):
    """A golden set cannot be read or written as a whole."""


@dataclass(frozen=True, slots=True)
class LineError:
    """A line of a golden set file that was skipped, and why."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class GoldenSet:
    """The questions read from a golden set file and the lines that were skipped."""

    name: str
    """The file's name without its suffix; runs record it as their dataset."""
    path: Path
    items: tuple[GoldenItem, ...]
    errors: tuple[LineError, ...]
    dataset_hash: str


def load_golden_set(path: str | os.PathLike[str]) -> GoldenSet:
    """Read a golden set; bad lines are skipped and listed in ``errors``.

    Raises :class:`~ingestion.errors.NotFound` when the file does not exist
    and :class:`DatasetError` when it cannot be read as UTF-8 text.
    """
    file = Path(path)
    text = _read_text(file)
    items: list[GoldenItem] = []
    errors: list[LineError] = []
    first_line_of: dict[str, int] = {}

    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = _parse_line(line, number)
        except _BadLine as bad:
            errors.append(LineError(number, str(bad)))
            continue
        if item.id in first_line_of:
            errors.append(
                LineError(
                    number,
                    f"the id {item.id!r} is already used on line "
                    f"{first_line_of[item.id]}; give each question its own id.",
                )
            )
            continue
        first_line_of[item.id] = number
        items.append(item)

    for error in errors:
        logger.warning("golden set line skipped: file=%s %s", file, error)
    logger.info(
        "golden set loaded: file=%s items=%d skipped=%d", file, len(items), len(errors)
    )
    return GoldenSet(
        name=file.stem,
        path=file,
        items=tuple(items),
        errors=tuple(errors),
        dataset_hash=dataset_hash(items),
    )


def write_golden_set(items: Iterable[GoldenItem], path: str | os.PathLike[str]) -> str:
    """Write items as a golden set file (replacing it whole) and return its hash.

    Empty optional fields are left out, so the file stays easy to edit by
    hand. Raises :class:`DatasetError` on duplicate ids or metadata that JSON
    cannot hold.
    """
    items = list(items)
    _check_unique_ids(items)
    try:
        lines = [
            json.dumps(_compact(item), ensure_ascii=False, sort_keys=False)
            for item in items
        ]
    except (TypeError, ValueError) as err:
        raise DatasetError(
            f"Cannot write the golden set {path}: an item's metadata is not JSON "
            f"({err}). Keep metadata to strings, numbers, lists and mappings."
        ) from err

    file = Path(path)
    temporary = file.with_name(f".{file.name}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        temporary.replace(file)
    except OSError as err:
        raise DatasetError(f"Cannot write the golden set {file}: {err}.") from err
    logger.info("golden set written: file=%s items=%d", file, len(items))
    return dataset_hash(items)


def dataset_hash(items: Iterable[GoldenItem]) -> str:
    """The SHA-256 of the items in normal form; see the module docstring."""
    normal = sorted((_normal(item) for item in items), key=lambda row: row["id"])
    encoded = json.dumps(
        normal, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    )
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


# -- parsing --------------------------------------------------------------------


class _BadLine(Exception):
    """Why one line cannot become an item; becomes a :class:`LineError`."""


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise NotFound(
            f"No golden set at {file}; give the path of a JSONL file with one "
            "question object per line."
        ) from err
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"The golden set {file} is not UTF-8 text ({err.reason} at byte "
            f"{err.start}); save it as UTF-8."
        ) from err
    except OSError as err:
        raise DatasetError(f"Cannot read the golden set {file}: {err}.") from err


def _parse_line(line: str, number: int) -> GoldenItem:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadLine(f"not valid JSON: {err.msg} at column {err.colno}.") from err
    if not isinstance(raw, dict):
        raise _BadLine(
            f"expected a JSON object with a 'question', got {type(raw).__name__}."
        )
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise _BadLine(
            f"unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
            f"{', '.join(sorted(_KEYS))} (put anything else under 'metadata')."
        )

    question = _text(raw, "question", required=True)
    item_id = _text(raw, "id") or f"q{number}"
    metadata = raw.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise _BadLine("'metadata' must be an object.")
    return GoldenItem(
        id=item_id,
        question=question or "",
        reference=_text(raw, "reference"),
        reference_uris=_uris(raw),
        reference_chunk_ids=_strings(raw, "reference_chunk_ids"),
        collection=_text(raw, "collection"),
        metadata=metadata,
    )


def _text(raw: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise _BadLine(f"no {key!r}; every line needs one.")
        return None
    if not isinstance(value, str):
        raise _BadLine(f"{key!r} must be a string, not {type(value).__name__}.")
    value = value.strip()
    if not value:
        if required:
            raise _BadLine(f"{key!r} is empty.")
        return None
    return value


def _strings(raw: dict[str, Any], key: str) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _BadLine(f"{key!r} must be a list of strings.")
    return tuple(dict.fromkeys(v.strip() for v in value if v.strip()))


def _uris(raw: dict[str, Any]) -> tuple[str, ...]:
    if "reference_uri" not in raw:
        return _strings(raw, "reference_uris")
    if raw.get("reference_uris"):
        raise _BadLine(
            "both 'reference_uri' and 'reference_uris' are given; list every uri "
            "under 'reference_uris'."
        )
    single = _text(raw, "reference_uri")
    return (single,) if single else ()


# -- writing and hashing --------------------------------------------------------


def _normal(item: GoldenItem) -> dict[str, Any]:
    return {
        "id": item.id.strip(),
        "question": item.question.strip(),
        "reference": (item.reference or "").strip() or None,
        "reference_uris": [u.strip() for u in item.reference_uris],
        "reference_chunk_ids": [c.strip() for c in item.reference_chunk_ids],
        "collection": item.collection or None,
        "metadata": item.metadata,
    }


def _compact(item: GoldenItem) -> dict[str, Any]:
    """The item's normal form without its empty fields, as written to a file."""
    return {key: value for key, value in _normal(item).items() if value}


def _check_unique_ids(items: Sequence[GoldenItem]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DatasetError(
                f"The id {item.id!r} is given to more than one question; a golden "
                "set needs one id per question."
            )
        seen.add(item.id)
