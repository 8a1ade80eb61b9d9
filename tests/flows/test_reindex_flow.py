"""The reindex flow: rebuild on a pipeline change, judge, promote while serving."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from flows.gates import GateContext, GateResult
from flows.ingest import ingest_all
from flows.reindex import reindex_collection
from ragline.serve import LiveCollections
from tests.flows.conftest import FlowProject

pytestmark = pytest.mark.usefixtures("flows_opener")


def reject_everything(context: GateContext) -> GateResult:
    """A promotion gate that fails every candidate."""
    return GateResult(False, [f"generation {context.candidate.id} rejected"], {})


class Searcher:
    """Searches the live collection in a thread, as the service does, noting generations."""

    def __init__(self, collections: LiveCollections) -> None:
        self.collections = collections
        self.generations: list[int] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                hits = self.collections.retriever("docs").search("who is on call", 3)
                assert hits, "a search of the live generation found nothing"
                self.generations.append(self.collections.index_sizes()["docs"][0])
            except BaseException as err:  # noqa: BLE001 - every failure is recorded
                self.errors.append(err)
            time.sleep(0.02)

    def wait_for(self, generation: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and generation not in self.generations[-1:]:
            time.sleep(0.05)


@pytest.fixture
def searcher(flow_project: FlowProject, real_embedder: object) -> Iterator[Searcher]:
    ingest_all(config=str(flow_project.config))
    runtime = flow_project.runtime(real_embedder)
    searcher = Searcher(LiveCollections(runtime, check_seconds=0.05))
    searcher.thread.start()
    yield searcher
    searcher.stop.set()
    searcher.thread.join()
    runtime.close()


def test_changed_chunking_promotes_a_new_generation_while_searches_go_on(
    flow_project: FlowProject, searcher: Searcher
) -> None:
    config = str(flow_project.config)
    first = reindex_collection("docs", config=config)
    assert first.decision == "unchanged", first
    searcher.wait_for(first.live_generation or -1)

    flow_project.configure(max_tokens=120)
    result = reindex_collection("docs", config=config)
    searcher.wait_for(result.candidate_generation or -1)

    assert result.decision == "promoted", result
    assert result.previous_generation == first.live_generation, result
    assert result.live_generation == result.candidate_generation, result
    assert result.metrics["hit_rate"] == 1.0, result.metrics
    assert not searcher.errors, f"searches failed during reindex: {searcher.errors!r}"
    seen = searcher.generations
    assert seen[0] == first.live_generation and seen[-1] == result.live_generation, seen
    assert seen == sorted(seen), f"searches went back to the old generation: {seen}"


def test_failing_gate_keeps_the_old_generation_live(
    flow_project: FlowProject, searcher: Searcher
) -> None:
    flow_project.configure(gate="tests.flows.test_reindex_flow:reject_everything")
    before = reindex_collection("docs", config=str(flow_project.config))
    assert before.decision == "unchanged", before

    result = reindex_collection("docs", config=str(flow_project.config), force=True)

    assert result.decision == "kept", result
    assert result.reasons == [f"generation {result.candidate_generation} rejected"]
    assert result.live_generation == before.live_generation, result
    time.sleep(0.2)  # several checks of the service
    assert not searcher.errors, f"searches failed: {searcher.errors!r}"
    assert set(searcher.generations) == {before.live_generation}, searcher.generations


def test_a_collection_fed_by_a_stream_is_not_rebuilt(flow_project: FlowProject) -> None:
    text = flow_project.config.read_text(encoding="utf-8")
    stream = (
        "  - name: tickets\n    type: redis_stream\n    collection: docs\n"
        "    stream: ragline-test:never-read\n"
    )
    flow_project.config.write_text(
        text.replace("flows:\n", stream + "flows:\n", 1), encoding="utf-8"
    )

    result = reindex_collection("docs", config=str(flow_project.config), force=True)

    assert result.decision == "kept", result
    assert result.candidate_generation is None
    assert "streaming source(s) tickets" in result.reasons[0], result.reasons
