"""The ingestion flows, run through Prefect against a temporary API server."""

from __future__ import annotations

import pytest

from flows.ingest import ingest_all, ingest_source
from tests.flows.conftest import CORPUS, FlowProject

pytestmark = pytest.mark.usefixtures("flows_opener")


def test_ingest_all_syncs_every_batch_source_into_a_clean_index(
    flow_project: FlowProject, real_embedder: object
) -> None:
    summaries = ingest_all(config=str(flow_project.config))

    assert [s.source for s in summaries] == ["handbook", "glossary"], summaries
    assert all(s.status == "ok" and s.failed == 0 for s in summaries), summaries
    runtime = flow_project.runtime(real_embedder)
    try:
        live = runtime.catalog.live_generation("docs")
        assert live is not None, "the first sync must create a live generation"
        documents, chunks = runtime.catalog.counts(live.id)
        assert documents == len(CORPUS), f"expected {len(CORPUS)}, got {documents}"
        assert chunks >= documents, f"every document has chunks, got {chunks}"
        assert runtime.verify() == {live.index_name: []}, runtime.verify()
    finally:
        runtime.close()


def test_ingest_source_again_writes_nothing_for_unchanged_documents(
    flow_project: FlowProject,
) -> None:
    first = ingest_source("handbook", config=str(flow_project.config))
    again = ingest_source("handbook", config=str(flow_project.config))

    assert first.added == 2 and first.chunks_written > 0, first
    assert again.unchanged == 2, again
    assert again.chunks_written == 0, f"an unchanged source was rewritten: {again}"
