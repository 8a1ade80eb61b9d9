"""Events pushed through the runtime become searchable, on both stream backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestion.embedding import CachedEmbedder
from ragline.runtime import Runtime
from ragline.settings import parse_settings

from .conftest import SOURCE, StreamKit


@pytest.fixture
def runtime(kit: StreamKit, tmp_path: Path, real_embedder: Any) -> Iterator[Runtime]:
    settings = parse_settings(
        {
            "data_dir": "./data",
            "collections": [{"name": "docs", "index": "faiss"}],
            "sources": [kit.source(batch_max_events=8)],
        },
        base_dir=tmp_path,
    )
    runtime = Runtime(settings)
    runtime._embedders[settings.embedder] = CachedEmbedder(
        real_embedder, runtime.catalog
    )
    yield runtime
    runtime.close()


def _keys(runtime: Runtime, query: str) -> set[str]:
    return {hit.doc_id for hit in runtime.search("docs", query, 10)}


def _texts(runtime: Runtime, query: str) -> list[str]:
    return [hit.text for hit in runtime.search("docs", query, 10)]


def test_add_update_and_delete_events_reach_search(runtime: Runtime) -> None:
    runtime.push(
        SOURCE, {"op": "add", "key": "t/1", "content": "The printer is on fire."}
    )
    runtime.push(
        SOURCE, {"op": "add", "key": "t/2", "content": "The VPN drops at six."}
    )
    runtime.consume(SOURCE, idle_exit_s=0.5)

    assert {f"{SOURCE}:t/1", f"{SOURCE}:t/2"} <= _keys(runtime, "printer fire")

    runtime.push(
        SOURCE, {"op": "update", "key": "t/1", "content": "The printer was replaced."}
    )
    runtime.push(SOURCE, {"op": "delete", "key": "t/2"})
    stats = runtime.consume(SOURCE, idle_exit_s=0.5)

    assert (stats.events, stats.applied, stats.dead_lettered) == (2, 2, 0), stats
    texts = _texts(runtime, "printer")
    assert "The printer was replaced." in texts
    assert "The printer is on fire." not in texts
    assert f"{SOURCE}:t/2" not in _keys(runtime, "VPN drops")
    assert runtime.verify() == {"docs-g1": []}
    assert runtime.stream_backend(SOURCE).backlog() == 0


def test_poison_messages_are_dead_lettered_while_the_rest_flow_on(
    kit: StreamKit, runtime: Runtime
) -> None:
    backend = runtime.stream_backend(SOURCE)
    runtime.push(
        SOURCE, {"op": "upsert", "key": "a", "content": "Alpha owns the build."}
    )
    backend.append(b"{this is not json")
    backend.append(b'{"op": "upsert", "key": "no-content"}')
    runtime.push(SOURCE, {"op": "upsert", "key": "b", "content": "Beta runs support."})

    stats = runtime.consume(SOURCE, idle_exit_s=0.5)

    assert (stats.applied, stats.dead_lettered) == (2, 2), stats
    letters = dict(kit.dead_letters())
    assert "not a JSON object" in letters[b"{this is not json"]
    assert "needs 'content'" in letters[b'{"op": "upsert", "key": "no-content"}']
    assert {f"{SOURCE}:a", f"{SOURCE}:b"} <= _keys(runtime, "who owns the build")
    assert backend.backlog() == 0


def test_the_source_is_fresh_after_consuming(runtime: Runtime) -> None:
    runtime.push(
        SOURCE, {"op": "upsert", "key": "a", "content": "Alpha owns the build."}
    )

    runtime.consume(SOURCE, idle_exit_s=0.5)

    (row,) = [r for r in runtime.source_rows() if r["source"] == SOURCE]
    assert not row.get("never_synced"), row
    assert row["staleness_s"] is not None and row["staleness_s"] < 60, row
    assert row["documents"] == 1, row
