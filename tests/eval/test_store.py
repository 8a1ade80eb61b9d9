"""Evaluation runs in the catalog database, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from eval.models import AnswerRecord, Cell, RunInfo, RunRecord
from eval.store import EvalStore, new_run_id, run_info_from_dict, run_info_to_dict
from ingestion.errors import CatalogError, NotFound

from .builders import make_run

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def full_run(run_id: str = "20260301-120000-aaaaaa") -> RunRecord:
    info = RunInfo(
        run_id=run_id,
        created_at=T0,
        dataset="handbook",
        dataset_hash="ab" * 32,
        collection="docs",
        metrics=("faithfulness", "context_recall"),
        git_commit="0123456789abcdef0123456789abcdef01234567",
        index_generation=4,
        judge_model="smollm2-135m",
        judge_model_hash="cd" * 32,
        prompt_version="v2",
        ragas_version="0.2.15",
        target="http://127.0.0.1:8000",
        label="nightly",
        seconds=12.5,
        extra={"sample": {"rate": 0.1, "seed": 7}, "tags": ["a", "b"], "ok": True},
    )
    answers = [
        AnswerRecord(
            question_id="q1",
            question="Où est la documentation ?",
            answer="Dans le manuel.",
            contexts=("first passage", "second passage"),
            context_uris=("a.md", "b.md"),
            context_chunk_ids=("c1", "c2"),
            cited_chunk_ids=("c1",),
            latency_ms=812.25,
        ),
        AnswerRecord(
            question_id="q2",
            question="And then?",
            answer="",
            contexts=(),
            context_uris=(),
            context_chunk_ids=(),
            error="The generator timed out.",
        ),
    ]
    cells = [
        Cell("q1", "faithfulness", "scored", score=0.8333333333333334, reason="ok"),
        Cell("q1", "context_recall", "not_applicable"),
        Cell("q2", "faithfulness", "error", error_type="Timeout", error="slow"),
        Cell("q2", "context_recall", "error", error_type="Timeout", error="slow"),
    ]
    return RunRecord(info=info, answers=answers, cells=cells)


@pytest.fixture
def store(catalog_url: str):
    store = EvalStore(catalog_url)
    yield store
    store.close()


def test_a_run_round_trips_whole(store: EvalStore) -> None:
    run = full_run()

    store.save(run)
    loaded = store.load(run.info.run_id)

    assert loaded.info == run.info
    assert loaded.info.created_at.tzinfo is not None
    assert loaded.answers == run.answers
    assert loaded.cells == run.cells


def test_times_in_other_zones_come_back_as_the_same_instant(store: EvalStore) -> None:
    east = timezone(timedelta(hours=5, minutes=30))
    run = full_run()
    run.info = replace(run.info, created_at=T0.astimezone(east))

    store.save(run)

    assert store.load(run.info.run_id).info.created_at == T0


def test_saving_again_replaces_the_run(store: EvalStore) -> None:
    run = full_run()
    store.save(run)
    run.cells = run.cells[:1]
    run.answers = run.answers[:1]

    store.save(run)
    loaded = store.load(run.info.run_id)

    assert loaded.cells == run.cells
    assert loaded.answers == run.answers


def test_a_run_can_be_loaded_without_its_answers(store: EvalStore) -> None:
    store.save(full_run())

    loaded = store.load("20260301-120000-aaaaaa", answers=False)

    assert loaded.answers == []
    assert len(loaded.cells) == 4


def test_an_unknown_run_names_recent_ones(store: EvalStore) -> None:
    with pytest.raises(NotFound, match="no evaluation run is stored yet"):
        store.load("nope")
    store.save(full_run())

    with pytest.raises(NotFound, match=r"recent runs: 20260301-120000-aaaaaa"):
        store.load("20990101-000000-ffffff")


def test_a_unique_prefix_finds_a_run_and_an_ambiguous_one_is_refused(
    store: EvalStore,
) -> None:
    store.save(full_run("20260301-120000-aaaaaa"))
    store.save(full_run("20260301-120000-abbbbb"))

    assert store.info("20260301-120000-ab").run_id == "20260301-120000-abbbbb"
    with pytest.raises(NotFound, match="start of more than one run"):
        store.info("20260301-120000-a")


def test_runs_are_listed_newest_first_and_filtered(store: EvalStore) -> None:
    for i, (dataset, collection) in enumerate(
        [("g1", "docs"), ("g2", "docs"), ("g1", "wiki"), ("g1", "docs")]
    ):
        store.save(
            make_run(
                f"r{i}",
                {"faithfulness": [0.5]},
                dataset=dataset,
                collection=collection,
                created_at=T0 + timedelta(minutes=i),
            )
        )

    assert [r.run_id for r in store.list()] == ["r3", "r2", "r1", "r0"]
    assert [r.run_id for r in store.list(limit=2)] == ["r3", "r2"]
    assert [r.run_id for r in store.list(dataset="g1")] == ["r3", "r2", "r0"]
    assert [r.run_id for r in store.list(collection="docs")] == ["r3", "r1", "r0"]
    assert [r.run_id for r in store.list(dataset="g1", collection="docs")] == [
        "r3",
        "r0",
    ]


def test_latest_gives_the_newest_earlier_run_of_a_dataset(store: EvalStore) -> None:
    for i, dataset in enumerate(["g1", "g2", "g1", "g2", "g1"]):
        store.save(
            make_run(
                f"r{i}",
                {"m": [0.5]},
                dataset=dataset,
                created_at=T0 + timedelta(minutes=i),
            )
        )

    assert store.latest(dataset="g1").run_id == "r4"
    assert store.latest(dataset="g1", before="r4").run_id == "r2"
    assert store.latest(dataset="g2", before="r4").run_id == "r3"
    assert store.latest(dataset="g1", before="r0") is None
    with pytest.raises(NotFound):
        store.latest(dataset="g1", before="missing")


def test_runs_of_the_same_second_are_ordered_by_id(store: EvalStore) -> None:
    for run_id in ("20260301-120000-bbbbbb", "20260301-120000-aaaaaa"):
        store.save(make_run(run_id, {"m": [0.5]}, created_at=T0))

    assert store.latest(before="20260301-120000-bbbbbb").run_id == (
        "20260301-120000-aaaaaa"
    )
    assert store.latest(before="20260301-120000-aaaaaa") is None


def test_delete_removes_a_run_and_its_rows(store: EvalStore, catalog_url: str) -> None:
    store.save(full_run())

    store.delete("20260301-120000-aaaaaa")

    assert store.list() == []
    engine = sa.create_engine(catalog_url)
    with engine.connect() as conn:
        cells = conn.execute(sa.text("SELECT count(*) FROM eval_cells")).scalar()
    engine.dispose()
    assert cells == 0
    with pytest.raises(NotFound):
        store.delete("20260301-120000-aaaaaa")


def test_a_second_store_on_the_same_database_sees_the_runs(catalog_url: str) -> None:
    with EvalStore(catalog_url) as first:
        first.save(full_run())
    with EvalStore(catalog_url) as second:
        assert [r.run_id for r in second.list()] == ["20260301-120000-aaaaaa"]


def test_extra_fields_json_cannot_hold_are_refused(store: EvalStore) -> None:
    run = full_run()
    run.info = replace(run.info, extra={"when": datetime.now(UTC)})

    with pytest.raises(CatalogError, match="extra fields cannot be stored as JSON"):
        store.save(run)
    assert store.list() == [], "a refused run leaves nothing behind"


def test_run_ids_are_short_sortable_and_unique() -> None:
    early = new_run_id(datetime(2026, 12, 4, 15, 30, 12, tzinfo=UTC))
    late = new_run_id(datetime(2026, 12, 4, 15, 30, 13, tzinfo=UTC))

    assert re.fullmatch(r"20261204-153012-[0-9a-f]{6}", early), early
    assert early < late
    assert len({new_run_id() for _ in range(200)}) == 200


def test_run_info_round_trips_through_json_form() -> None:
    info = full_run().info

    assert run_info_from_dict(run_info_to_dict(info)) == info
