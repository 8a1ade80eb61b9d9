"""Change events: what a streaming source carries, and how one becomes a change.

A message on a stream is one JSON object::

    {"op": "upsert", "key": "tickets/4711", "content": "...",
     "media_type": "text/markdown", "title": "Printer on fire",
     "metadata": {"team": "ops"}, "access_labels": ["ops"]}

    {"op": "delete", "key": "tickets/4711"}

``op`` is ``upsert`` (``add`` and ``update`` are accepted as synonyms) or
``delete``; ``key`` names the document within its source, as a path does for
a folder of files. Applying the same event twice changes nothing, so
at-least-once delivery is safe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import BadEvent
from ..models import SourceDocument, make_doc_id

__all__ = [
    "MAX_EVENT_BYTES",
    "Change",
    "Delete",
    "Delivery",
    "EventPayload",
    "Upsert",
    "encode_event",
    "latest_per_document",
    "parse_event",
]

MAX_EVENT_BYTES = 8 * 1024 * 1024
"""The largest message a consumer reads as an event; larger ones are dead-lettered."""

_OPS = {"upsert": "upsert", "add": "upsert", "update": "upsert", "delete": "delete"}


class EventPayload(BaseModel):
    """The JSON body of a change event, as producers write it."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["upsert", "add", "update", "delete"]
    key: str = Field(min_length=1, max_length=1024)
    content: str | None = None
    media_type: str = "text/markdown"
    uri: str | None = None
    title: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    access_labels: list[str] | None = None
    modified_at: datetime | None = None

    @field_validator("key")
    @classmethod
    def _no_control_characters(cls, key: str) -> str:
        if any(ord(ch) < 32 for ch in key):
            raise ValueError("key must not contain control characters")
        return key

    def model_post_init(self, _context: object) -> None:
        if _OPS[self.op] == "upsert" and self.content is None:
            raise ValueError(f"an {self.op!r} event needs 'content', the document text")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as a stream backend handed it over, not yet acknowledged.

    ``appended_at`` is when the stream accepted the message (seconds since the
    epoch): the start of its event-to-queryable lag. ``attempt`` counts
    deliveries, starting at 1. ``position`` orders messages of one stream as
    strings; it becomes the indexed document's version, so a late redelivery
    of an older event never overwrites a newer one.
    """

    message_id: str
    payload: bytes
    appended_at: float
    attempt: int = 1
    handle: Any = None
    position: str = ""

    @property
    def order(self) -> str:
        return self.position or self.message_id


@dataclass(frozen=True, slots=True)
class Upsert:
    """Index this version of a document, replacing any earlier one."""

    delivery: Delivery
    document: SourceDocument

    @property
    def doc_id(self) -> str:
        return self.document.doc_id


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove a document from the index (nothing happens if it is not there)."""

    delivery: Delivery
    source: str
    key: str

    @property
    def doc_id(self) -> str:
        return make_doc_id(self.source, self.key)


Change = Upsert | Delete


def parse_event(
    delivery: Delivery, *, source: str, default_labels: Sequence[str] = ()
) -> Change:
    """The change a message asks for; raises ``BadEvent`` saying what is wrong."""
    if len(delivery.payload) > MAX_EVENT_BYTES:
        raise BadEvent(
            f"message {delivery.message_id} is {len(delivery.payload):,} bytes, over "
            f"the event limit of {MAX_EVENT_BYTES:,}; send large documents through a "
            "batch source instead."
        )
    try:
        raw = json.loads(delivery.payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadEvent(
            f"message {delivery.message_id} is not a JSON object ({err}); producers "
            'must send {"op": "upsert", "key": ..., "content": ...} or '
            '{"op": "delete", "key": ...}.'
        ) from err
    if not isinstance(raw, dict):
        raise BadEvent(
            f"message {delivery.message_id} is JSON but not an object; send one "
            "event object per message."
        )
    try:
        event = EventPayload.model_validate(raw)
    except ValidationError as err:
        raise BadEvent(
            f"message {delivery.message_id} is not a valid change event: "
            f"{_problems(err)}."
        ) from err
    if _OPS[event.op] == "delete":
        return Delete(delivery, source, event.key)
    labels = (
        tuple(event.access_labels)
        if event.access_labels is not None
        else tuple(default_labels)
    )
    document = SourceDocument(
        source=source,
        key=event.key,
        uri=event.uri or f"stream://{source}/{event.key}",
        content=event.content or "",
        media_type=event.media_type,
        modified_at=event.modified_at,
        title=event.title,
        metadata=event.metadata,
        access_labels=labels,
        version=delivery.order,
    )
    return Upsert(delivery, document)


def encode_event(event: Mapping[str, Any] | EventPayload) -> bytes:
    """A validated event as the bytes a stream message carries; raises ``BadEvent``."""
    if not isinstance(event, EventPayload):
        try:
            event = EventPayload.model_validate(event)
        except ValidationError as err:
            raise BadEvent(f"not a valid change event: {_problems(err)}.") from err
    body = event.model_dump_json(
        exclude_none=True, exclude_defaults=True, by_alias=True
    )
    # ``op`` and ``key`` have no defaults, so they are always written.
    return body.encode("utf-8")


def _problems(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'event'}: {e['msg']}"
        for e in err.errors()
    )


def latest_per_document(changes: Sequence[Change]) -> list[Change]:
    """The last change of each document in a batch, in stream order.

    A batch that updates a document three times indexes only the final
    version; the earlier messages are acknowledged with the batch.
    """
    last: dict[str, int] = {}
    for i, change in enumerate(changes):
        last[change.doc_id] = i
    return [changes[i] for i in sorted(last.values())]
