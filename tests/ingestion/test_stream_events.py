"""Change events: what a stream message may say, and what it becomes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ingestion.errors import BadEvent
from ingestion.streaming.events import (
    MAX_EVENT_BYTES,
    Delete,
    Delivery,
    EventPayload,
    Upsert,
    encode_event,
    latest_per_document,
    parse_event,
)


def _delivery(body: Any, message_id: str = "1-0", position: str = "") -> Delivery:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Delivery(message_id, payload, 1_700_000_000.0, position=position)


def _parse(body: Any, **kwargs: Any) -> Upsert | Delete:
    return parse_event(_delivery(body), source="tickets", **kwargs)


@pytest.mark.parametrize("op", ["upsert", "add", "update"])
def test_every_upsert_synonym_becomes_an_upsert(op: str) -> None:
    change = _parse({"op": op, "key": "t/1", "content": "Printer on fire"})

    assert isinstance(change, Upsert), change
    assert change.document.content == "Printer on fire"
    assert change.doc_id == "tickets:t/1"


def test_an_upsert_carries_every_field_into_the_document() -> None:
    body = {
        "op": "upsert",
        "key": "t/1",
        "content": "<p>hello</p>",
        "media_type": "text/html",
        "title": "Printer on fire",
        "uri": "https://tickets.example/1",
        "metadata": {"team": "ops"},
        "access_labels": ["ops"],
        "modified_at": "2024-05-01T12:00:00+00:00",
    }
    change = parse_event(
        _delivery(body, position="000000000000042-0000000000"), source="tickets"
    )

    assert isinstance(change, Upsert)
    doc = change.document
    assert (doc.source, doc.key, doc.uri) == (
        "tickets",
        "t/1",
        "https://tickets.example/1",
    )
    assert (doc.media_type, doc.title) == ("text/html", "Printer on fire")
    assert dict(doc.metadata) == {"team": "ops"}
    assert doc.access_labels == ("ops",)
    assert doc.modified_at is not None and doc.modified_at.year == 2024
    assert doc.version == "000000000000042-0000000000", "the position is the version"


def test_an_upsert_without_uri_gets_a_stream_uri_and_the_message_id_as_version() -> (
    None
):
    change = _parse({"op": "upsert", "key": "t/1", "content": "x"})

    assert isinstance(change, Upsert)
    assert change.document.uri == "stream://tickets/t/1"
    assert change.document.version == "1-0"


def test_a_delete_needs_only_its_key() -> None:
    change = _parse({"op": "delete", "key": "t/1"})

    assert isinstance(change, Delete), change
    assert (change.source, change.key, change.doc_id) == (
        "tickets",
        "t/1",
        "tickets:t/1",
    )


@pytest.mark.parametrize("op", ["upsert", "add", "update"])
def test_an_upsert_without_content_is_a_bad_event(op: str) -> None:
    with pytest.raises(BadEvent, match="needs 'content'"):
        _parse({"op": op, "key": "t/1"})


def test_empty_content_is_still_content() -> None:
    change = _parse({"op": "upsert", "key": "t/1", "content": ""})

    assert isinstance(change, Upsert)
    assert change.document.content == ""


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"{not json", "not a JSON object"),
        (b"\xff\xfe\x00", "not a JSON object"),
        (b"", "not a JSON object"),
        (b"[1, 2]", "not an object"),
        (b'"upsert"', "not an object"),
        (b"null", "not an object"),
    ],
)
def test_a_message_that_is_not_a_json_object_is_a_bad_event(
    payload: bytes, says: str
) -> None:
    with pytest.raises(BadEvent, match=says) as caught:
        parse_event(_delivery(payload, message_id="7-1"), source="tickets")

    assert "7-1" in str(caught.value), "the error names the message"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"op": "upsert", "key": "t/1", "content": "x", "colour": "red"}, "colour"),
        ({"op": "rename", "key": "t/1"}, "op"),
        ({"key": "t/1", "content": "x"}, "op"),
        ({"op": "delete"}, "key"),
        ({"op": "delete", "key": ""}, "key"),
        ({"op": "delete", "key": "k" * 1025}, "key"),
        ({"op": "upsert", "key": "t/1", "content": 42}, "content"),
        ({"op": "upsert", "key": "t/1", "content": "x", "metadata": []}, "metadata"),
    ],
)
def test_an_invalid_event_names_the_field_at_fault(
    body: dict[str, Any], field: str
) -> None:
    with pytest.raises(BadEvent, match="not a valid change event") as caught:
        _parse(body)

    assert field in str(caught.value), caught.value


@pytest.mark.parametrize("key", ["t/\n1", "t/\x001", "\ttab", "bell\x07"])
def test_a_key_with_control_characters_is_a_bad_event(key: str) -> None:
    with pytest.raises(BadEvent, match="control characters"):
        _parse({"op": "delete", "key": key})


def test_a_key_with_unicode_is_fine() -> None:
    change = _parse({"op": "delete", "key": "Tickets/Zürich/ünïcødé ✓"})

    assert isinstance(change, Delete)
    assert change.key == "Tickets/Zürich/ünïcødé ✓"


def test_an_oversized_message_is_a_bad_event_before_it_is_decoded() -> None:
    # Not even JSON: the size check must come first and say so.
    payload = b"x" * (MAX_EVENT_BYTES + 1)

    with pytest.raises(BadEvent, match="over the event limit"):
        parse_event(_delivery(payload), source="tickets")


def test_a_message_of_exactly_the_limit_is_read() -> None:
    head = b'{"op": "upsert", "key": "big", "content": "'
    tail = b'"}'
    payload = head + b"a" * (MAX_EVENT_BYTES - len(head) - len(tail)) + tail
    assert len(payload) == MAX_EVENT_BYTES

    change = parse_event(_delivery(payload), source="tickets")

    assert isinstance(change, Upsert)


def test_the_source_labels_apply_when_an_event_names_none() -> None:
    change = _parse(
        {"op": "upsert", "key": "t/1", "content": "x"}, default_labels=("staff",)
    )

    assert isinstance(change, Upsert)
    assert change.document.access_labels == ("staff",)


def test_explicit_labels_replace_the_source_labels_even_when_empty() -> None:
    explicit = _parse(
        {"op": "upsert", "key": "t/1", "content": "x", "access_labels": ["ops"]},
        default_labels=("staff",),
    )
    public = _parse(
        {"op": "upsert", "key": "t/1", "content": "x", "access_labels": []},
        default_labels=("staff",),
    )

    assert isinstance(explicit, Upsert) and isinstance(public, Upsert)
    assert explicit.document.access_labels == ("ops",)
    assert public.document.access_labels == (), "an explicit empty list means public"


def test_encode_event_round_trips_through_parse_event() -> None:
    event = {
        "op": "update",
        "key": "t/1",
        "content": "Printer on fire",
        "title": "Printer",
        "metadata": {"team": "ops"},
        "access_labels": [],
    }

    payload = encode_event(event)
    change = parse_event(_delivery(payload), source="tickets")

    assert isinstance(change, Upsert)
    assert change.document.title == "Printer"
    assert dict(change.document.metadata) == {"team": "ops"}
    assert change.document.access_labels == ()


def test_encode_event_writes_only_what_was_given() -> None:
    payload = encode_event({"op": "delete", "key": "t/1"})

    assert json.loads(payload) == {"op": "delete", "key": "t/1"}


def test_encode_event_accepts_a_validated_payload() -> None:
    event = EventPayload(op="upsert", key="t/1", content="x")

    assert json.loads(encode_event(event)) == {
        "op": "upsert",
        "key": "t/1",
        "content": "x",
    }


@pytest.mark.parametrize(
    "event",
    [
        {"op": "upsert", "key": "t/1"},
        {"op": "delete", "key": "a\nb"},
        {"op": "delete", "key": "t/1", "extra": 1},
    ],
)
def test_encode_event_refuses_an_invalid_event(event: dict[str, Any]) -> None:
    with pytest.raises(BadEvent, match="not a valid change event"):
        encode_event(event)


def _upsert(key: str, content: str, message_id: str) -> Upsert:
    change = parse_event(
        _delivery({"op": "upsert", "key": key, "content": content}, message_id),
        source="s",
    )
    assert isinstance(change, Upsert)
    return change


def _delete(key: str, message_id: str) -> Delete:
    change = parse_event(
        _delivery({"op": "delete", "key": key}, message_id), source="s"
    )
    assert isinstance(change, Delete)
    return change


def test_latest_per_document_keeps_the_last_change_of_each_document() -> None:
    changes = [
        _upsert("a", "a1", "1"),
        _upsert("b", "b1", "2"),
        _upsert("a", "a2", "3"),
        _delete("b", "4"),
        _upsert("c", "c1", "5"),
        _upsert("a", "a3", "6"),
    ]

    latest = latest_per_document(changes)

    assert [c.delivery.message_id for c in latest] == ["4", "5", "6"]
    assert isinstance(latest[0], Delete)
    assert isinstance(latest[2], Upsert) and latest[2].document.content == "a3"


def test_latest_per_document_lets_an_upsert_after_a_delete_win() -> None:
    latest = latest_per_document([_delete("a", "1"), _upsert("a", "back", "2")])

    assert len(latest) == 1 and isinstance(latest[0], Upsert)


def test_latest_per_document_of_nothing_is_nothing() -> None:
    assert latest_per_document([]) == []
