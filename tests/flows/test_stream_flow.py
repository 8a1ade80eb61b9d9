"""The stream consumer flow, run through Prefect against a real Redis stream."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from flows.streaming import stream_ingest
from tests.flows.conftest import FlowProject

pytestmark = pytest.mark.usefixtures("flows_opener")

REDIS_URL = "redis://127.0.0.1:6379/0"


def test_stream_ingest_applies_events_and_reports_what_it_did(
    flow_project: FlowProject, real_embedder: object
) -> None:
    stream = f"ragline-test:{uuid.uuid4().hex[:8]}:flow"
    text = flow_project.config.read_text(encoding="utf-8")
    source = (
        f"  - name: tickets\n    type: redis_stream\n    collection: docs\n"
        f"    stream: '{stream}'\n    poll_wait: 200ms\n"
    )
    flow_project.config.write_text(
        text.replace("flows:\n", source + "flows:\n", 1), encoding="utf-8"
    )
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.xadd(
            stream,
            {
                "event": json.dumps(
                    {
                        "op": "upsert",
                        "key": "T-9",
                        "content": "The freight elevator needs a key card after 8 pm.",
                    }
                )
            },
        )
        client.xadd(stream, {"event": "{not json"})

        summary = stream_ingest(
            "tickets", config=str(flow_project.config), idle_exit_s=1.0
        )

        assert summary["events"] == 2 and summary["applied"] == 1, summary
        assert summary["dead_lettered"] == 1, summary
        assert client.xlen(f"{stream}.dead") == 1
        runtime = flow_project.runtime(real_embedder)
        try:
            hits = runtime.search("docs", "freight elevator key card", 3)
            assert hits[0].uri == "stream://tickets/T-9", [h.uri for h in hits]
        finally:
            runtime.close()
    finally:
        client.delete(stream, f"{stream}.dead")
        client.close()
