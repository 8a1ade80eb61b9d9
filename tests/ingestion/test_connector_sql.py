"""The sql connector against SQLite and the local PostgreSQL server.

Every test that takes the ``articles`` fixture runs twice: on a temporary
SQLite file and on a uniquely named table in the PostgreSQL database named
by ``RAGLINE_TEST_POSTGRES_URL``. An unreachable PostgreSQL fails the test:
start it with ``bash .ci/services``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from pydantic import ValidationError
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    Table,
    Text,
    create_engine,
    delete,
    insert,
    make_url,
    update,
)
from sqlalchemy.exc import OperationalError

from ingestion.connectors.base import connector_for
from ingestion.connectors.sql import SqlConfig, SqlSource
from ingestion.errors import SourceError
from ingestion.models import (
    FailedDocument,
    Listing,
    SourceDocument,
    UnchangedDocument,
)

POSTGRES_URL = os.environ.get(
    "RAGLINE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

MONDAY = datetime(2024, 5, 6, 9, 30, tzinfo=UTC)
TUESDAY = datetime(2024, 5, 7, 9, 30, tzinfo=UTC)


class Articles:
    """A uniquely named ``articles`` table and the rows the test puts in it."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        self.metadata = MetaData()
        self.table = Table(
            f"ragline_test_{uuid4().hex[:12]}",
            self.metadata,
            Column("id", Integer),
            Column("body", Text),
            Column("title", Text),
            Column("changed", DateTime(timezone=True)),
            Column("lang", Text),
            Column("groups", Text),
        )
        self.metadata.create_all(engine)

    @property
    def name(self) -> str:
        return self.table.name

    def add(self, *rows: dict[str, Any]) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(self.table), list(rows))

    def change(self, row_id: int, **values: Any) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(self.table).where(self.table.c.id == row_id).values(**values)
            )

    def remove(self, row_id: int) -> None:
        with self.engine.begin() as connection:
            connection.execute(delete(self.table).where(self.table.c.id == row_id))

    def drop(self) -> None:
        self.metadata.drop_all(self.engine)


def connect_postgres() -> Engine:
    engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5})
    try:
        with engine.connect():
            pass
    except OperationalError as err:
        engine.dispose()
        masked = make_url(POSTGRES_URL).render_as_string(hide_password=True)
        pytest.fail(
            f"PostgreSQL at {masked} is unreachable ({err.orig}). Start it with "
            "'bash .ci/services' or point RAGLINE_TEST_POSTGRES_URL at a server.",
            pytrace=False,
        )
    return engine


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def articles(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Articles]:
    if request.param == "postgres":
        url, engine = POSTGRES_URL, connect_postgres()
    else:
        url = f"sqlite:///{tmp_path / 'kb.db'}"
        engine = create_engine(url)

    table = Articles(engine, url)
    try:
        yield table
    finally:
        table.drop()
        engine.dispose()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def make_source(articles: Articles, **settings: Any) -> SqlSource:
    defaults: dict[str, Any] = {
        "name": "kb",
        "type": "sql",
        "collection": "docs",
        "url": articles.url,
        "query": f"SELECT id, body, title, changed, lang, groups FROM {articles.name}",
        "id_column": "id",
        "text_column": "body",
    }
    return SqlSource(SqlConfig(**{**defaults, **settings}))


def list_all(
    source: SqlSource, known: Mapping[str, str | None] | None = None
) -> dict[str, Listing]:
    listings = list(source.documents(known or {}))
    keys = [listing.key for listing in listings]
    assert len(keys) == len(set(keys)), f"a key was listed twice: {keys}"
    return {listing.key: listing for listing in listings}


def known_versions(listings: Mapping[str, Listing]) -> dict[str, str | None]:
    return {
        key: listing.version
        for key, listing in listings.items()
        if isinstance(listing, SourceDocument)
    }


def test_the_sql_type_is_registered() -> None:
    config_model, factory = connector_for("sql")

    assert (config_model, factory) == (SqlConfig, SqlSource)


def test_invalid_url_is_rejected_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as caught:
        SqlConfig(
            name="kb",
            type="sql",
            collection="docs",
            url="postgresql+psycopg://me:hunter2@db:notaport/kb",
            query="SELECT 1",
            id_column="id",
            text_column="body",
        )

    assert "hunter2" not in str(caught.value), "the password must not be shown"


def test_rows_become_documents_with_their_details(articles: Articles) -> None:
    articles.add(
        {"id": 1, "body": "One", "title": "First", "changed": MONDAY, "lang": "en",
         "groups": "hr, staff"},
        {"id": 2, "body": "Two", "title": None, "changed": MONDAY, "lang": "fr",
         "groups": None},
    )  # fmt: skip
    source = make_source(
        articles,
        updated_at_column="changed",
        title_column="title",
        metadata_columns=("lang",),
        labels_column="groups",
        access_labels=("all",),
        media_type="text/markdown",
    )

    listings = list_all(source)

    assert sorted(listings) == ["1", "2"], sorted(listings)
    first = listings["1"]
    assert isinstance(first, SourceDocument), first
    assert (first.content, first.title) == ("One", "First"), first
    assert first.media_type == "text/markdown", first.media_type
    assert first.uri == "sql://kb/1", first.uri
    assert first.metadata == {"lang": "en"}, first.metadata
    assert first.access_labels == ("all", "hr", "staff"), first.access_labels
    assert first.modified_at == MONDAY, first.modified_at
    assert first.version, "rows with updated_at carry a validator"


def test_unchanged_row_is_not_read_again(articles: Articles) -> None:
    articles.add({"id": 1, "body": "One", "changed": MONDAY})
    source = make_source(articles, updated_at_column="changed")
    known = known_versions(list_all(source))

    articles.change(1, body=None)  # a row read again would now fail

    assert list_all(source, known) == {"1": UnchangedDocument("kb", "1")}


def test_changed_row_is_read_again(articles: Articles) -> None:
    articles.add({"id": 1, "body": "One", "changed": MONDAY})
    source = make_source(articles, updated_at_column="changed")
    known = known_versions(list_all(source))

    articles.change(1, body="One, edited", changed=TUESDAY)
    listing = list_all(source, known)["1"]

    assert isinstance(listing, SourceDocument), listing
    assert listing.content == "One, edited", listing.content
    assert listing.modified_at == TUESDAY, listing.modified_at


def test_removed_row_is_not_listed(articles: Articles) -> None:
    articles.add({"id": 1, "body": "One"}, {"id": 2, "body": "Two"})
    source = make_source(articles)
    known = known_versions(list_all(source))

    articles.remove(2)

    assert sorted(list_all(source, known)) == ["1"], "a removed row is not yielded"


def test_rows_without_updated_at_are_always_read(articles: Articles) -> None:
    articles.add({"id": 1, "body": "One"})
    source = make_source(articles)

    listing = list_all(source, {"1": None})["1"]

    assert isinstance(listing, SourceDocument), listing
    assert listing.version is None, listing.version


def test_null_text_is_a_failed_document(articles: Articles) -> None:
    articles.add({"id": 1, "body": None}, {"id": 2, "body": "Two"})

    listings = list_all(make_source(articles))

    failed = listings["1"]
    assert isinstance(failed, FailedDocument), failed
    assert "'body' is NULL" in failed.error, failed.error
    assert isinstance(listings["2"], SourceDocument), "the other rows go on"


def test_duplicate_id_fails_the_later_row(articles: Articles) -> None:
    articles.add({"id": 1, "body": "first"}, {"id": 1, "body": "second"})
    query = f"SELECT id, body FROM {articles.name} ORDER BY body"

    listings = list(make_source(articles, query=query).documents({}))

    assert [type(item) for item in listings] == [SourceDocument, FailedDocument]
    assert "Another row has the id '1'" in listings[1].error, listings[1]


def test_uri_template_is_filled_with_the_row(articles: Articles) -> None:
    articles.add({"id": 7, "body": "Seven", "lang": "en"})
    source = make_source(articles, uri_template="https://kb.example/{lang}/{id}")

    listing = list_all(source)["7"]

    assert listing.uri == "https://kb.example/en/7", listing.uri


def test_missing_column_raises_source_error_listing_the_columns(
    articles: Articles,
) -> None:
    source = make_source(articles, text_column="content")

    with pytest.raises(SourceError, match="no column 'content'") as caught:
        list(source.documents({}))

    assert "id, body, title" in str(caught.value), "the returned columns are listed"


def test_column_named_only_by_the_uri_template_is_checked(articles: Articles) -> None:
    source = make_source(articles, uri_template="https://kb.example/{slug}")

    with pytest.raises(SourceError, match="no column 'slug', which uri_template"):
        list(source.documents({}))


def test_invalid_query_raises_source_error(articles: Articles) -> None:
    source = make_source(articles, query="SELECT id, body FROM no_such_table")

    with pytest.raises(SourceError, match="could not run its query") as caught:
        list(source.documents({}))

    assert caught.value.__cause__ is not None, "the database error is chained"


def test_unreachable_database_raises_quickly_with_the_password_masked(
    closed_port: int,
) -> None:
    source = SqlSource(
        SqlConfig(
            name="kb",
            type="sql",
            collection="docs",
            url=f"postgresql+psycopg://reader:hunter2@127.0.0.1:{closed_port}/kb",
            query="SELECT 1",
            id_column="id",
            text_column="body",
        )
    )
    started = time.monotonic()

    with pytest.raises(SourceError, match="could not connect") as caught:
        list(source.documents({}))

    assert time.monotonic() - started < 5, "a refused connection should fail fast"
    assert "hunter2" not in str(caught.value), caught.value
    assert "reader:***@" in str(caught.value), caught.value


def test_unopenable_sqlite_file_raises_source_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'missing-folder' / 'kb.db'}"
    source = SqlSource(
        SqlConfig(
            name="kb",
            type="sql",
            collection="docs",
            url=url,
            query="SELECT 1 AS id, 'x' AS body",
            id_column="id",
            text_column="body",
        )
    )

    with pytest.raises(SourceError, match="could not connect"):
        list(source.documents({}))


def test_null_id_is_a_failed_document(articles: Articles) -> None:
    articles.add({"id": None, "body": "orphan"}, {"id": 2, "body": "two"})
    query = f"SELECT id, body FROM {articles.name} ORDER BY body"

    listings = list(make_source(articles, query=query).documents({}))

    assert isinstance(listings[0], FailedDocument), listings
    assert "NULL 'id'" in listings[0].error, listings[0].error
    assert isinstance(listings[1], SourceDocument), "the other rows go on"


def test_abandoned_listing_releases_the_database(articles: Articles) -> None:
    articles.add({"id": 1, "body": "One"}, {"id": 2, "body": "Two"})
    documents = make_source(articles).documents({})

    next(documents)
    documents.close()

    articles.drop()  # PostgreSQL would block here if a transaction were left open
    articles.metadata.create_all(articles.engine)


@pytest.mark.postgres
def test_array_labels_column_adds_labels() -> None:
    engine = connect_postgres()
    engine.dispose()
    source = SqlSource(
        SqlConfig(
            name="kb",
            type="sql",
            collection="docs",
            url=POSTGRES_URL,
            query="SELECT 1 AS id, 'x' AS body, ARRAY['hr', 'staff'] AS groups",
            id_column="id",
            text_column="body",
            labels_column="groups",
        )
    )

    listing = list_all(source)["1"]

    assert isinstance(listing, SourceDocument), listing
    assert listing.access_labels == ("hr", "staff"), listing.access_labels
