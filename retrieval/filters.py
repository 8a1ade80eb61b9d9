"""Who may see a passage, and which passages a query asks for.

Access control: every document carries the access labels of its source (or
of its own record). A caller holds a set of labels; it sees a document when
the document has no labels (public) or when it holds at least one of them.
A scope that ``sees_everything`` is for administrators and trusted batch
jobs only.

Filters narrow a search by source, document, URI prefix, time of the last
change at the source, and document metadata. Both are checked against the
catalog's current record of every candidate, so a document whose labels just
changed is judged by its new labels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import Field, field_validator

from ingestion.config import StrictModel

__all__ = ["AccessScope", "Filterable", "SearchFilters"]

Scalar = str | int | float | bool


class Filterable(Protocol):
    """What filters read of a candidate (the catalog's chunk record has it all)."""

    @property
    def doc_id(self) -> str: ...
    @property
    def uri(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def access_labels(self) -> tuple[str, ...]: ...
    @property
    def modified_at(self) -> datetime | None: ...
    @property
    def metadata(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class AccessScope:
    """The document access labels a caller holds."""

    labels: frozenset[str] = frozenset()
    sees_everything: bool = False

    @classmethod
    def of(cls, labels: Iterable[str]) -> AccessScope:
        return cls(frozenset(labels))

    @classmethod
    def everything(cls) -> AccessScope:
        return cls(sees_everything=True)

    def allows(self, document_labels: Iterable[str]) -> bool:
        """Whether a document with these labels is visible in this scope."""
        if self.sees_everything:
            return True
        wanted = set(document_labels)
        return not wanted or not wanted.isdisjoint(self.labels)

    @property
    def fingerprint(self) -> str:
        """A stable key for the scope: callers with equal fingerprints see the same."""
        if self.sees_everything:
            return "*"
        joined = "\x1f".join(sorted(self.labels))
        return hashlib.sha256(joined.encode()).hexdigest()[:32]


class SearchFilters(StrictModel):
    """Conditions every returned passage meets; unset fields do not filter."""

    sources: list[str] | None = Field(
        default=None, description="Only passages of these sources."
    )
    doc_ids: list[str] | None = Field(
        default=None, description="Only passages of these documents."
    )
    uri_prefix: str | None = Field(
        default=None, description="Only documents whose URI starts with this."
    )
    modified_after: datetime | None = Field(
        default=None, description="Only documents changed at the source after this."
    )
    modified_before: datetime | None = None
    metadata: dict[str, Scalar | list[Scalar]] = Field(
        default_factory=dict,
        description="Document metadata that must match: a value, or a list of "
        "accepted values.",
    )

    @field_validator("sources", "doc_ids")
    @classmethod
    def _not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError(
                "an empty list matches nothing; leave the field out instead"
            )
        return value

    @field_validator("modified_after", "modified_before")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        # A time without a zone is read as UTC, the zone the catalog keeps.
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @property
    def is_empty(self) -> bool:
        return self == _NO_FILTERS

    def matches(self, record: Filterable) -> bool:
        """Whether a candidate meets every condition."""
        if self.sources is not None and record.source not in self.sources:
            return False
        if self.doc_ids is not None and record.doc_id not in self.doc_ids:
            return False
        if self.uri_prefix is not None and not record.uri.startswith(self.uri_prefix):
            return False
        if not self._in_time_range(record.modified_at):
            return False
        return all(
            _metadata_matches(record.metadata.get(key), wanted)
            for key, wanted in self.metadata.items()
        )

    def canonical(self) -> str:
        """The filters as canonical JSON, for cache keys and logs."""
        return json.dumps(
            self.model_dump(mode="json", exclude_defaults=True), sort_keys=True
        )

    def _in_time_range(self, modified_at: datetime | None) -> bool:
        if self.modified_after is None and self.modified_before is None:
            return True
        if modified_at is None:
            return False
        if self.modified_after is not None and modified_at <= self.modified_after:
            return False
        return self.modified_before is None or modified_at < self.modified_before


_NO_FILTERS = SearchFilters()


def _metadata_matches(value: Any, wanted: Scalar | list[Scalar]) -> bool:
    accepted = wanted if isinstance(wanted, list) else [wanted]
    if isinstance(value, list):
        return any(item in accepted for item in value)
    return value in accepted
