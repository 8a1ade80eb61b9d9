"""The freshness check: a stale source raises a Prefect event, a log line and a webhook."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import flows.freshness
from flows.freshness import STALE_EVENT, check_freshness
from flows.ingest import ingest_all
from tests.flows.conftest import FlowProject

pytestmark = pytest.mark.usefixtures("flows_opener")


class Receiver:
    """A local HTTP endpoint that records the JSON bodies posted to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                receiver.headers.append(dict(self.headers))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()
    thread.join()


@pytest.fixture
def emitted(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every event the check emits, as Prefect's emitter returned it."""
    events: list[Any] = []
    real = flows.freshness.emit_event

    def recording(*args: Any, **kwargs: Any) -> Any:
        event = real(*args, **kwargs)
        events.append(event)
        return event

    monkeypatch.setattr(flows.freshness, "emit_event", recording)
    return events


def test_a_source_past_its_objective_raises_event_log_and_webhook(
    flow_project: FlowProject,
    receiver: Receiver,
    emitted: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    flow_project.configure(glossary_staleness="100ms", webhook_url=receiver.url)
    ingest_all(config=str(flow_project.config))
    time.sleep(0.3)  # the glossary is now past its 100 ms objective

    with caplog.at_level(logging.WARNING, logger="flows.freshness"):
        breaches = check_freshness(config=str(flow_project.config))

    assert [b.source for b in breaches] == ["glossary"], breaches
    assert breaches[0].staleness_s is not None and breaches[0].staleness_s > 0.1
    assert len(emitted) == 1 and emitted[0] is not None, "no event went to Prefect"
    assert emitted[0].event == STALE_EVENT
    assert emitted[0].resource.id == "ragline.source.glossary", emitted[0].resource
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "flows.freshness" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1 and "source=glossary" in warnings[0], warnings
    assert "max_staleness_s=0.1" in warnings[0], warnings
    assert [b["source"] for b in receiver.bodies] == ["glossary"], receiver.bodies
    assert receiver.bodies[0]["event"] == STALE_EVENT, receiver.bodies[0]
    assert receiver.headers[0].get("X-Ragline-Test") == "yes", receiver.headers[0]


def test_a_never_synced_source_is_a_breach_and_a_dead_webhook_is_not_fatal(
    flow_project: FlowProject,
    emitted: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/alerts"
    flow_project.configure(webhook_url=dead)

    with caplog.at_level(logging.WARNING, logger="flows.freshness"):
        breaches = check_freshness(config=str(flow_project.config))

    assert sorted(b.source for b in breaches) == ["glossary", "handbook"], breaches
    assert all(b.never_synced for b in breaches), breaches
    assert len(emitted) == 2, emitted
    messages = [r.getMessage() for r in caplog.records if r.name == "flows.freshness"]
    assert sum("freshness webhook failed" in m for m in messages) == 2, messages
    assert not any(dead in m for m in messages), "the webhook URL was logged"
