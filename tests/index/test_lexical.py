"""Lexical search over the catalog, run on SQLite and on the PostgreSQL server.

The contract tests hold on both databases; the tests of the FTS5 tables'
upkeep (backfill, rebuild, repair) are SQLite's own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa

from index.catalog import Catalog, DocumentRecord
from index.lexical import MAX_TERMS, SqliteLexicalIndex, query_terms
from ingestion.errors import CatalogError
from ingestion.models import Chunk, make_chunk_id, vector_id

FILLER = [
    "The scheduler runs each flow on a worker from the default pool.",
    "Budgets are reserved before a provider call and settled after it.",
    "Access labels decide which teams may read a document.",
    "A generation is promoted by swapping the alias in one transaction.",
]


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    catalog = Catalog(catalog_url)
    yield catalog
    catalog.close()


@pytest.fixture
def sqlite_catalog(tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    yield catalog
    catalog.close()


def _chunks(doc_id: str, content_hash: str, texts: Sequence[str]) -> list[Chunk]:
    return [
        Chunk(make_chunk_id(doc_id, content_hash, i), doc_id, i, text, 0, len(text))
        for i, text in enumerate(texts)
    ]


def _record(doc_id: str, content_hash: str, chunk_count: int) -> DocumentRecord:
    return DocumentRecord(
        doc_id=doc_id,
        source="s",
        key=doc_id.split(":", 1)[1],
        uri=f"file:///{doc_id}",
        title=None,
        content_hash=content_hash,
        version=None,
        modified_at=None,
        access_labels=(),
        metadata={},
        chunk_count=chunk_count,
    )


def _publish(
    catalog: Catalog,
    gen_id: int,
    doc_id: str,
    texts: Sequence[str],
    version: str = "h1",
) -> list[int]:
    """Write a document version through the whole protocol; its vector ids."""
    chunks = _chunks(doc_id, version, texts)
    catalog.stage_chunks(gen_id, chunks)
    retired = catalog.commit_documents(
        gen_id,
        [_record(doc_id, version, len(chunks))],
        {doc_id: [c.chunk_id for c in chunks]},
    )
    catalog.purge_chunks(gen_id, retired, "deleting")
    return [vector_id(c.chunk_id) for c in chunks]


def _ids(results: Sequence[tuple[int, float]]) -> list[int]:
    return [vid for vid, _ in results]


def _generation_with_filler(catalog: Catalog) -> int:
    gen = catalog.create_generation("docs", "fp", {}, "faiss")
    _publish(catalog, gen.id, "s:filler", FILLER)
    return gen.id


# -- query terms ---------------------------------------------------------------


def test_query_terms_keep_identifiers_and_drop_question_words() -> None:
    terms = query_terms("What raises StopAsyncIteration in functools.lru_cache?")

    assert terms == ["raises", "stopasynciteration", "functools", "lru_cache"], terms


def test_query_terms_are_deduplicated_and_capped() -> None:
    words = " ".join(f"word{i} word{i}" for i in range(MAX_TERMS + 10))

    terms = query_terms(words)

    assert len(terms) == MAX_TERMS, terms
    assert terms[:2] == ["word0", "word1"], "first appearances come first"


def test_query_terms_drop_underscore_runs_and_contraction_leftovers() -> None:
    terms = query_terms("__ _ what's we'll it's you've")

    assert terms == [], terms


# -- the contract, on both databases -------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected_text"),
    [
        ("functools.lru_cache", "functools.lru_cache(maxsize=None)"),
        ("What raises StopAsyncIteration?", "StopAsyncIteration"),
        ("os.path.join", "os.path.join(a, b)"),
        ("new in 3.11", "Python 3.11"),
    ],
)
def test_an_exact_identifier_finds_the_chunk_that_holds_it(
    catalog: Catalog, query: str, expected_text: str
) -> None:
    gen_id = _generation_with_filler(catalog)
    texts = [
        "Decorate a function with functools.lru_cache(maxsize=None) to memoize it.",
        "An asynchronous iterator raises StopAsyncIteration when it is exhausted.",
        "Build paths portably with os.path.join(a, b) instead of slashes.",
        "Python 3.11 adds exception groups and the except* syntax.",
    ]
    ids = _publish(catalog, gen_id, "s:a", texts)
    expected = ids[next(i for i, t in enumerate(texts) if expected_text in t)]

    results = catalog.lexical_search(gen_id, query, 3)

    assert results and results[0][0] == expected, (query, results, expected)


def test_a_word_finds_other_forms_of_its_stem(catalog: Catalog) -> None:
    gen_id = _generation_with_filler(catalog)
    [cached] = _publish(catalog, gen_id, "s:a", ["Results are cached on disk."])

    results = catalog.lexical_search(gen_id, "caching", 5)

    assert _ids(results) == [cached], results


@pytest.mark.parametrize(
    "query", ["", "   ", "what is the", "Who are they and why?", "?!...", "()[]{}"]
)
def test_a_query_of_stopwords_or_punctuation_returns_nothing(
    catalog: Catalog, query: str
) -> None:
    gen_id = _generation_with_filler(catalog)

    assert catalog.lexical_search(gen_id, query, 5) == [], query


@pytest.mark.parametrize(
    "query",
    [
        '"alias',
        "alias*",
        "NEAR(alias swapping)",
        "-alias",
        "alias:swapping",
        "column:alias",
        "alias's",
        "alias AND OR NOT swapping",
        "alias' OR 1=1; --",
        "alias | swapping & !promoted <-> x",
        "^alias {alias} (alias",
        "alias\\ \x00 \t\n",
    ],
)
def test_query_syntax_characters_are_searched_as_plain_words(
    catalog: Catalog, query: str
) -> None:
    gen_id = catalog.create_generation("docs", "fp", {}, "faiss").id
    ids = _publish(catalog, gen_id, "s:a", FILLER)
    alias_chunk = ids[3]

    results = catalog.lexical_search(gen_id, query, 5)

    assert alias_chunk in _ids(results), (query, results)


def test_pending_and_deleting_chunks_never_appear(catalog: Catalog) -> None:
    gen_id = _generation_with_filler(catalog)
    [old] = _publish(catalog, gen_id, "s:a", ["The zeppelin manual, first edition."])
    new_chunks = _chunks("s:a", "h2", ["The zeppelin manual, second edition."])
    [new] = [vector_id(c.chunk_id) for c in new_chunks]

    catalog.stage_chunks(gen_id, new_chunks)
    while_pending = catalog.lexical_search(gen_id, "zeppelin", 5)
    retired = catalog.commit_documents(
        gen_id, [_record("s:a", "h2", 1)], {"s:a": [new_chunks[0].chunk_id]}
    )
    while_deleting = catalog.lexical_search(gen_id, "zeppelin", 5)

    assert _ids(while_pending) == [old], "a pending chunk must not be found"
    assert retired == [old], retired
    assert _ids(while_deleting) == [new], "a deleting chunk must not be found"


def test_live_chunks_are_found_behind_many_better_ranked_pending_ones(
    catalog: Catalog,
) -> None:
    gen_id = _generation_with_filler(catalog)
    [live] = _publish(catalog, gen_id, "s:live", ["A zeppelin flew over the hangar."])
    pending = _chunks(
        "s:busy", "h1", [f"Zeppelin zeppelin zeppelin, page {i}." for i in range(100)]
    )
    catalog.stage_chunks(gen_id, pending)

    found = catalog.lexical_search(gen_id, "zeppelin", 3)

    assert _ids(found) == [live], "pending chunks ranked higher must be skipped"


def test_purged_chunks_disappear(catalog: Catalog) -> None:
    gen_id = _generation_with_filler(catalog)
    _publish(catalog, gen_id, "s:a", ["The zeppelin manual."])

    retired = catalog.begin_delete_documents(gen_id, ["s:a"])
    catalog.purge_chunks(gen_id, retired, "deleting")

    assert catalog.lexical_search(gen_id, "zeppelin", 5) == []
    assert catalog.integrity_problems(gen_id) == [], "the index must shrink with it"


def test_a_purge_leaves_chunks_in_another_state_searchable(catalog: Catalog) -> None:
    gen_id = _generation_with_filler(catalog)
    [live] = _publish(catalog, gen_id, "s:a", ["The zeppelin manual."])

    catalog.purge_chunks(gen_id, [live], "pending")

    assert _ids(catalog.lexical_search(gen_id, "zeppelin", 5)) == [live]
    assert catalog.integrity_problems(gen_id) == []


def test_another_generations_chunks_do_not_leak(catalog: Catalog) -> None:
    first = _generation_with_filler(catalog)
    second = catalog.create_generation("docs", "fp2", {}, "faiss").id
    [mine] = _publish(catalog, first, "s:a", ["The zeppelin manual, old build."])
    [theirs] = _publish(catalog, second, "s:a", ["The zeppelin manual, new build."])

    assert _ids(catalog.lexical_search(first, "zeppelin", 5)) == [mine]
    assert _ids(catalog.lexical_search(second, "zeppelin", 5)) == [theirs]


def test_results_come_best_first_with_repeated_rare_words_ranked_higher(
    catalog: Catalog,
) -> None:
    gen_id = _generation_with_filler(catalog)
    texts = [
        "One zeppelin crossed the sea at dawn with its crew of twelve sailors.",
        "Zeppelin after zeppelin crossed the sea, a zeppelin fleet at dawn.",
        "Two zeppelin crews crossed the sea and a zeppelin landed at dawn.",
        "Ships crossed the sea at dawn with their crews of twelve sailors each.",
    ]
    once, thrice, twice, _never = _publish(catalog, gen_id, "s:a", texts)

    results = catalog.lexical_search(gen_id, "zeppelin sea", 10)

    assert _ids(results)[:3] == [thrice, twice, once], results
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True), "scores must fall, best first"
    assert len(results) == 4, "a chunk matching any one word is found"


def test_k_limits_the_results(catalog: Catalog) -> None:
    gen_id = catalog.create_generation("docs", "fp", {}, "faiss").id
    _publish(catalog, gen_id, "s:a", [f"zeppelin number {i}" for i in range(12)])

    assert len(catalog.lexical_search(gen_id, "zeppelin", 5)) == 5
    assert catalog.lexical_search(gen_id, "zeppelin", 0) == []


def test_common_words_are_left_out_when_rarer_ones_remain(catalog: Catalog) -> None:
    gen_id = catalog.create_generation("docs", "fp", {}, "faiss").id
    # "value" is in 19 of 20 chunks, "zeppelin" in one: with the common word
    # left out, only the chunk with the rare word matches.
    texts = [f"The value number {i} of the table." for i in range(19)]
    [*_, rare] = _publish(catalog, gen_id, "s:a", [*texts, "A zeppelin value."])

    every_word = catalog.lexical_search(gen_id, "zeppelin value", 50)
    rare_only = catalog.lexical_search(
        gen_id, "zeppelin value", 50, common_share=0.5, common_min_chunks=10
    )

    assert len(every_word) == 20, every_word
    assert _ids(rare_only) == [rare], rare_only


def test_common_words_stay_in_small_collections_and_alone(catalog: Catalog) -> None:
    gen_id = catalog.create_generation("docs", "fp", {}, "faiss").id
    _publish(catalog, gen_id, "s:a", [f"The value number {i}." for i in range(19)])
    _publish(catalog, gen_id, "s:b", ["A zeppelin value.", "More value here."])

    small = catalog.lexical_search(
        gen_id, "zeppelin value", 50, common_share=0.5, common_min_chunks=1000
    )
    # Every word common: the rarest one ("number", in 19 of 21) is searched.
    all_common = catalog.lexical_search(
        gen_id, "value number", 50, common_share=0.1, common_min_chunks=10
    )

    assert len(small) == 21, small
    assert len(all_common) == 19, all_common


def test_reopening_the_catalog_keeps_the_lexical_index(catalog_url: str) -> None:
    first = Catalog(catalog_url)
    gen_id = first.create_generation("docs", "fp", {}, "faiss").id
    [found] = _publish(first, gen_id, "s:a", ["The zeppelin manual."])
    first.close()

    second = Catalog(catalog_url)
    try:
        assert _ids(second.lexical_search(gen_id, "zeppelin", 5)) == [found]
    finally:
        second.close()


# -- SQLite's FTS5 tables -------------------------------------------------------


def _drop_fts_table(catalog: Catalog, gen_id: int) -> None:
    with catalog.engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE {SqliteLexicalIndex.table_name(gen_id)}")


def _fts_tables(catalog: Catalog) -> list[str]:
    with catalog.engine.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT name FROM sqlite_master "
                    "WHERE type = 'table' AND sql LIKE '%fts5%'"
                )
            ).scalars()
        )


def test_chunks_written_before_the_lexical_index_existed_are_backfilled(
    sqlite_catalog: Catalog,
) -> None:
    gen_id = _generation_with_filler(sqlite_catalog)
    [found] = _publish(sqlite_catalog, gen_id, "s:a", ["The zeppelin manual."])
    _drop_fts_table(sqlite_catalog, gen_id)

    results = sqlite_catalog.lexical_search(gen_id, "zeppelin", 5)

    assert _ids(results) == [found], results
    assert sqlite_catalog.integrity_problems(gen_id) == []


def test_staging_into_a_generation_without_its_table_backfills_it_first(
    sqlite_catalog: Catalog,
) -> None:
    gen_id = _generation_with_filler(sqlite_catalog)
    [old] = _publish(sqlite_catalog, gen_id, "s:a", ["The zeppelin manual."])
    _drop_fts_table(sqlite_catalog, gen_id)

    [new] = _publish(sqlite_catalog, gen_id, "s:b", ["A zeppelin atlas."])

    assert sorted(_ids(sqlite_catalog.lexical_search(gen_id, "zeppelin", 5))) == sorted(
        [old, new]
    )
    assert sqlite_catalog.integrity_problems(gen_id) == []


def test_an_interrupted_backfill_leaves_no_half_built_table(
    sqlite_catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen_id = _generation_with_filler(sqlite_catalog)
    _drop_fts_table(sqlite_catalog, gen_id)
    fill = SqliteLexicalIndex._create_and_fill

    def fill_then_fail(self: SqliteLexicalIndex, conn: sa.Connection, gen: int) -> int:
        fill(self, conn, gen)
        conn.exec_driver_sql("SELECT no_such_function()")
        return 0

    monkeypatch.setattr(SqliteLexicalIndex, "_create_and_fill", fill_then_fail)
    with pytest.raises(CatalogError):
        sqlite_catalog.lexical_search(gen_id, "alias", 5)

    assert _fts_tables(sqlite_catalog) == [], "the table must roll back with its rows"


def test_staging_chunks_twice_indexes_them_once(sqlite_catalog: Catalog) -> None:
    gen_id = sqlite_catalog.create_generation("docs", "fp", {}, "faiss").id
    chunks = _chunks("s:a", "h1", ["The zeppelin manual."])

    sqlite_catalog.stage_chunks(gen_id, chunks)
    sqlite_catalog.stage_chunks(gen_id, chunks)

    assert sqlite_catalog.integrity_problems(gen_id) == [
        "an interrupted write left 1 pending and 0 deleting chunks; "
        "the next `ragline ingest` completes it"
    ]


def test_a_lexical_mismatch_is_reported_and_a_rebuild_fixes_it(
    sqlite_catalog: Catalog,
) -> None:
    gen_id = _generation_with_filler(sqlite_catalog)
    [lost] = _publish(sqlite_catalog, gen_id, "s:a", ["The zeppelin manual."])
    with sqlite_catalog.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"DELETE FROM {SqliteLexicalIndex.table_name(gen_id)} WHERE rowid = :v"
            ),
            {"v": lost},
        )

    problems = sqlite_catalog.integrity_problems(gen_id)
    indexed = sqlite_catalog.rebuild_lexical(gen_id)

    assert problems == [
        "the lexical index holds 4 chunks but the catalog has 5; "
        "the next `ragline ingest` rebuilds it"
    ], problems
    assert indexed == 5, indexed
    assert sqlite_catalog.integrity_problems(gen_id) == []
    assert _ids(sqlite_catalog.lexical_search(gen_id, "zeppelin", 5)) == [lost]


def test_the_next_sync_run_repairs_a_lexical_mismatch(
    sqlite_catalog: Catalog,
) -> None:
    gen_id = _generation_with_filler(sqlite_catalog)
    [lost] = _publish(sqlite_catalog, gen_id, "s:a", ["The zeppelin manual."])
    with sqlite_catalog.engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM {SqliteLexicalIndex.table_name(gen_id)}")
    sqlite_catalog.register_source("s", "docs", "files", "cfg")

    sqlite_catalog.start_run("s", gen_id, full=False)

    assert sqlite_catalog.integrity_problems(gen_id) == []
    assert _ids(sqlite_catalog.lexical_search(gen_id, "zeppelin", 5)) == [lost]


def test_a_generation_gets_its_own_table(sqlite_catalog: Catalog) -> None:
    first = _generation_with_filler(sqlite_catalog)
    second = _generation_with_filler(sqlite_catalog)

    assert sorted(_fts_tables(sqlite_catalog)) == [
        f"chunk_text_g{first}",
        f"chunk_text_g{second}",
    ]
