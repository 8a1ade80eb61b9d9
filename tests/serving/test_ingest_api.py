"""``POST /ingest/{source}``: pushes land in the real Redis stream, governed and audited.

The service appends each accepted event to the source's stream; a consumer
(here a second runtime, as a separate ``ragline stream`` process would be)
makes it searchable through the same service. Freshness of the stream shows
up in ``/freshness`` and ``/metrics``.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from ingestion.embedding import CachedEmbedder
from ragline.runtime import Runtime
from ragline.serve import build_app
from ragline.settings import Settings, parse_settings
from serving.gateway.providers import ScriptedProvider
from serving.gateway.store import ApiKeyStore
from tests.conftest import EXAMPLES

REDIS_URL = "redis://127.0.0.1:6379/0"


def _settings(root: Path, stream: str) -> dict[str, Any]:
    return {
        "data_dir": str(root / "data"),
        "collections": [{"name": "docs"}, {"name": "private"}],
        "sources": [
            {
                "name": "handbook",
                "type": "files",
                "collection": "docs",
                "path": str(root / "handbook"),
                "include": ["**/*.md"],
            },
            {
                "name": "tickets",
                "type": "redis_stream",
                "collection": "docs",
                "url": REDIS_URL,
                "stream": stream,
                "batch_max_wait": "20ms",
                "poll_wait": "200ms",
                "max_backlog": 5,
                "max_staleness": "1h",
            },
            {
                "name": "vault",
                "type": "redis_stream",
                "collection": "private",
                "url": REDIS_URL,
                "stream": f"{stream}:vault",
            },
        ],
        "serve": {"index_check_seconds": 0},
        "gateway": {
            "identity": {"api_keys": {"cache_seconds": 0}},
            "policy": {
                "teams": {
                    "support": {
                        "collections": ["docs"],
                        "models": ["default"],
                        "ingest": ["tickets"],
                    },
                    "readers": {"collections": ["docs"], "models": ["default"]},
                    # May push to the vault, but not use its collection.
                    "sneaky": {"collections": ["docs"], "ingest": ["vault"]},
                }
            },
            "rate_limits": {"backend": "memory"},
            "loop_guard": {"backend": "memory"},
        },
    }


@dataclass
class Pushing:
    client: TestClient
    settings: Settings
    keys: dict[str, str]
    redis: redis.Redis
    stream: str
    consumer: Runtime

    def push(self, who: str, event: dict[str, Any], source: str = "tickets") -> Any:
        return self.client.post(
            f"/ingest/{source}",
            json=event,
            headers={"Authorization": f"Bearer {self.keys[who]}"},
        )

    def search(self, who: str, query: str) -> list[str]:
        response = self.client.post(
            "/search",
            json={"query": query, "collection": "docs", "top_k": 3},
            headers={"Authorization": f"Bearer {self.keys[who]}"},
        )
        assert response.status_code == 200, response.text
        return [r["uri"] for r in response.json()["results"]]


def _runtime(settings: Settings, embedder: Any) -> Runtime:
    runtime = Runtime(settings)
    for collection in settings.collections:
        config = settings.embedder_for(collection)
        runtime._embedders[config] = CachedEmbedder(embedder, runtime.catalog)
    return runtime


@pytest.fixture(scope="module")
def pushing(
    tmp_path_factory: pytest.TempPathFactory, real_embedder: Any
) -> Iterator[Pushing]:
    root = tmp_path_factory.mktemp("pushing")
    shutil.copytree(EXAMPLES / "handbook", root / "handbook")
    stream = f"ragline-test:{uuid.uuid4().hex[:8]}:tickets"
    settings = parse_settings(_settings(root, stream), base_dir=root)
    runtime = _runtime(settings, real_embedder)
    assert all(r.status == "ok" for r in runtime.ingest())
    # One process writes a FAISS index at a time: the service only reads it,
    # and the consumer below (a `ragline stream` process in production) writes.
    runtime.close()
    store = ApiKeyStore(settings.catalog_url())
    keys = {
        "sam": store.create("sam", "support")[1],
        "rita": store.create("rita", "readers")[1],
        "sly": store.create("sly", "sneaky")[1],
    }
    store.close()
    consumer = _runtime(settings, real_embedder)
    client_redis = redis.Redis.from_url(REDIS_URL)
    app = build_app(runtime, provider=ScriptedProvider(["ok [1]"]), warm_up=False)
    try:
        with TestClient(app) as client:
            yield Pushing(client, settings, keys, client_redis, stream, consumer)
    finally:
        consumer.close()
        for key in (stream, f"{stream}.dead", f"{stream}:vault"):
            client_redis.delete(key)
        client_redis.close()


def test_an_accepted_push_is_in_the_stream_and_becomes_searchable(
    pushing: Pushing,
) -> None:
    event = {
        "op": "upsert",
        "key": "T-1",
        "title": "Badge reader",
        "content": "The badge reader at the loading dock rejects blue visitor cards.",
    }
    response = pushing.push("sam", event)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["accepted"] is True and body["collection"] == "docs"
    stored = pushing.redis.xrange(
        pushing.stream, body["message_id"], body["message_id"]
    )
    assert stored, "the accepted event is stored in the stream"

    stats = pushing.consumer.consume("tickets", idle_exit_s=0.5)
    assert stats.applied == 1, stats
    assert "stream://tickets/T-1" in pushing.search("rita", "badge reader loading dock")

    response = pushing.push("sam", {"op": "delete", "key": "T-1"})
    assert response.status_code == 202, response.text
    pushing.consumer.consume("tickets", idle_exit_s=0.5)
    assert "stream://tickets/T-1" not in pushing.search(
        "rita", "badge reader loading dock"
    )


def test_freshness_and_metrics_show_the_stream(pushing: Pushing) -> None:
    pushing.push("sam", {"op": "upsert", "key": "T-2", "content": "Printer jam."})
    pushing.consumer.consume("tickets", idle_exit_s=0.5)
    rows = {r["source"]: r for r in pushing.client.get("/freshness").json()["sources"]}
    tickets = rows["tickets"]
    assert tickets["max_staleness_s"] == 3600 and tickets["stale"] is False, tickets
    assert tickets["events_applied"] >= 1 and tickets["event_lag_s"] >= 0, tickets
    assert rows["vault"]["never_synced"] is True
    metrics = pushing.client.get("/metrics").text
    assert (
        'ragline_source_staleness_seconds{collection="docs",source="tickets"}'
        in metrics
    )
    assert 'ragline_source_stale{collection="docs",source="tickets"} 0.0' in metrics
    assert (
        'ragline_source_event_lag_seconds{collection="docs",quantile="max"' in metrics
    )


@pytest.mark.parametrize(
    ("who", "source", "status", "phrase"),
    [
        ("rita", "tickets", 403, "may not push events to the source 'tickets'"),
        ("sly", "vault", 403, "may not use the collection 'private'"),
        ("sam", "handbook", 403, "may not push events to the source 'handbook'"),
    ],
    ids=["no-ingest-right", "collection-not-granted", "not-granted-source"],
)
def test_pushes_need_the_ingest_right_and_the_collection(
    pushing: Pushing, who: str, source: str, status: int, phrase: str
) -> None:
    response = pushing.push(who, {"op": "delete", "key": "x"}, source=source)
    assert response.status_code == status, response.text
    assert phrase in response.json()["error"]


def test_a_push_without_credentials_is_401(pushing: Pushing) -> None:
    response = pushing.client.post("/ingest/tickets", json={"op": "delete", "key": "x"})
    assert response.status_code == 401, response.text


@pytest.mark.parametrize(
    ("event", "phrase"),
    [
        ({"op": "upsert", "key": "x"}, "needs 'content'"),
        ({"op": "rename", "key": "x"}, "op"),
        ({"op": "delete"}, "key"),
        ({"op": "delete", "key": "x", "colour": "red"}, "colour"),
    ],
    ids=["no-content", "unknown-op", "no-key", "unknown-field"],
)
def test_an_invalid_event_is_422_and_not_stored(
    pushing: Pushing, event: dict[str, Any], phrase: str
) -> None:
    before = pushing.redis.xlen(pushing.stream)
    response = pushing.push("sam", event)
    assert response.status_code == 422, response.text
    assert phrase in response.text
    assert pushing.redis.xlen(pushing.stream) == before


def test_a_full_backlog_refuses_pushes_with_503_and_retry_after(
    pushing: Pushing,
) -> None:
    for i in range(5):  # max_backlog is 5; nothing consumes meanwhile
        response = pushing.push("sam", {"op": "delete", "key": f"gone-{i}"})
        assert response.status_code == 202, response.text
    response = pushing.push("sam", {"op": "delete", "key": "one-too-many"})
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "5"
    assert "consumer is behind" in response.json()["error"]
    pushing.consumer.consume("tickets", idle_exit_s=0.5)
    response = pushing.push("sam", {"op": "delete", "key": "after-catch-up"})
    assert response.status_code == 202, response.text
    pushing.consumer.consume("tickets", idle_exit_s=0.5)
