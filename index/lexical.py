"""Full-text (lexical) search over the chunk rows of the catalog.

The catalog keeps one full-text index per database, in the same database as
the chunk rows and always changed in the same transaction as them, so a
lexical search sees exactly the chunks the catalog has committed:

* **SQLite**: one FTS5 table per generation, ``chunk_text_g{generation}``,
  whose rowid is the chunk's vector id and whose one column is its text.
  :class:`SqliteLexicalIndex` writes it when chunk rows are staged and purged.
  A generation whose chunk rows predate the table (a catalog written by an
  older ragline) has it built from those rows, in one transaction, the first
  time it is needed.
* **PostgreSQL**: a stored generated ``tsvector`` column on ``chunks`` with a
  GIN index, added when the catalog is opened; the database keeps it current
  by itself, so :class:`PostgresLexicalIndex` only searches.

Either way a search returns only ``live`` chunks of one generation, best
first, with a higher score for a better match. Scores rank the results of one
query; they are not comparable across queries or between the two databases.

Queries are free text, often a question or a piece of code. They never reach
the full-text query language as typed: :func:`query_terms` keeps the words,
drops common English ones, and the search matches chunks holding any of the
remaining words (each one a phrase, so ``lru_cache`` must appear as
``lru`` followed by ``cache``).

A search costs time in proportion to the chunks its words match, since every
match is scored before the best are kept. Words found in a large share of a
big collection (``value``, ``return`` in a programming manual) match tens of
thousands of chunks while saying little about any one of them: bm25 weighs
them by the log of their rarity. :func:`drop_common_terms` leaves such words
out when rarer ones remain, using the counts :meth:`LexicalIndex.counts`
reads (the catalog caches them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ingestion.errors import CatalogError

__all__ = [
    "MAX_TERMS",
    "STOPWORDS",
    "LexicalIndex",
    "PostgresLexicalIndex",
    "SqliteLexicalIndex",
    "UnsupportedLexicalIndex",
    "drop_common_terms",
    "lexical_index_for",
    "query_terms",
]

logger = logging.getLogger(__name__)

MAX_TERMS = 32
"""At most this many distinct words of a query are searched for."""

# Longer "words" are data (base64, minified code), not something typed to
# search for; the cap also keeps every term far below PostgreSQL's lexeme limit.
_MAX_TERM_CHARS = 128

_WORD = re.compile(r"\w+")
# How many ranked matches past k are read, for chunks that turn out not live.
_LIVE_SLACK = 32
_IDS_PER_QUERY = 500

_STOPWORD_LIST = """
    a about above after again against all am an and any are as at be because
    been before being below between both but by can could did do does doing
    down during each few for from further had has have having he her here hers
    herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours out over own
    same she should so some such than that the their theirs them then there
    these they this those through to too under until up very was we were what
    when where which while who whom whose why will with would you your yours
    d ll m re s t ve
"""

STOPWORDS = frozenset(_STOPWORD_LIST.split())
"""Words too common to say anything about a passage, question words included.

The one-letter and two-letter entries are what the word pattern leaves of
English contractions (``what's``, ``don't``, ``we'll``).
"""


def query_terms(query: str) -> list[str]:
    """The words of a query that a lexical search looks for.

    Words are runs of letters, digits and underscores, lowercased; stopwords,
    runs of underscores alone and over-long runs are dropped, and repeats are
    kept once, in order of first appearance, up to :data:`MAX_TERMS`. The
    result is safe to quote into a full-text query: it holds no operators.

    >>> query_terms("What does functools.lru_cache(maxsize=None) cache?")
    ['functools', 'lru_cache', 'maxsize', 'none', 'cache']
    """
    terms: dict[str, None] = {}
    for match in _WORD.finditer(query.lower()):
        word = match.group()
        if word in STOPWORDS or len(word) > _MAX_TERM_CHARS or not word.strip("_"):
            continue
        terms.setdefault(word)
        if len(terms) == MAX_TERMS:
            break
    return list(terms)


def drop_common_terms(
    terms: Sequence[str],
    counts: Sequence[int],
    total: int,
    max_share: float,
    min_chunks: int,
) -> list[str]:
    """``terms`` without those held by more than ``max_share`` of ``total`` chunks.

    ``counts[i]`` is the number of chunks holding ``terms[i]``. Nothing is
    dropped from a collection smaller than ``min_chunks``, where every search
    is fast anyway, and a query never loses all its words: when every word is
    common the rarest one stays.

    >>> drop_common_terms(["value", "lru_cache"], [30_000, 40], 100_000, 0.05, 10_000)
    ['lru_cache']
    """
    if total < min_chunks or len(terms) < 2:
        return list(terms)
    limit = max_share * total
    kept = [t for t, n in zip(terms, counts, strict=True) if n <= limit]
    if kept:
        return kept
    rarest = min(range(len(terms)), key=lambda i: counts[i])
    return [terms[rarest]]


class LexicalIndex(Protocol):
    """The full-text index of one catalog database.

    The catalog calls every method inside its own transaction (``conn``), so
    the index changes together with the chunk rows or not at all. ``chunk
    rows`` below means the rows of the catalog's ``chunks`` table of one
    generation, in every state; :meth:`search` alone looks at ``live`` ones.
    """

    def prepare(self, conn: Connection) -> None:
        """Create what the index needs in the database; run when the catalog opens."""

    def ensure(self, conn: Connection, generation_id: int) -> None:
        """Make sure the generation's index exists, building it from its chunk rows."""

    def add(
        self, conn: Connection, generation_id: int, rows: Sequence[tuple[int, str]]
    ) -> None:
        """Index newly inserted chunk rows, given as (vector id, text)."""

    def remove(
        self, conn: Connection, generation_id: int, vector_ids: sa.Select[tuple[int]]
    ) -> None:
        """Unindex the chunk rows the query selects, before they are deleted."""

    def mismatch(self, conn: Connection, generation_id: int) -> tuple[int, int] | None:
        """(entries indexed, chunk rows) when they differ, else None."""

    def rebuild(self, conn: Connection, generation_id: int) -> int:
        """Index the generation's chunk rows afresh; returns how many were indexed."""

    def search(
        self, conn: Connection, generation_id: int, terms: Sequence[str], k: int
    ) -> list[tuple[int, float]]:
        """(vector id, score) of the ``k`` best live chunks holding any of ``terms``."""

    def counts(
        self, conn: Connection, generation_id: int, terms: Sequence[str]
    ) -> tuple[int, list[int]]:
        """(chunks indexed, chunks holding each term), in every state.

        Chunks of all states are counted: the figures only need to be close,
        and a generation's chunks are nearly all live.
        """


def lexical_index_for(dialect: str, chunks: sa.Table) -> LexicalIndex:
    """The lexical index implementation for a database dialect name."""
    if dialect == "sqlite":
        return SqliteLexicalIndex(chunks)
    if dialect == "postgresql":
        return PostgresLexicalIndex(chunks)
    return UnsupportedLexicalIndex(dialect)


class SqliteLexicalIndex:
    """FTS5 tables, one per generation, written with the chunk rows.

    Each table holds one row per chunk row of its generation, whatever the
    chunk's state; the search joins back to ``chunks`` to keep only ``live``
    ones. Porter stemming makes ``caching`` find ``cached``; diacritics are
    folded, so ``cafe`` finds ``café``.
    """

    TOKENIZER = "porter unicode61 remove_diacritics 2"

    def __init__(self, chunks: sa.Table) -> None:
        self._chunks = chunks

    @staticmethod
    def table_name(generation_id: int) -> str:
        return f"chunk_text_g{int(generation_id)}"

    def prepare(self, conn: Connection) -> None:
        """Nothing to do: the tables are created per generation, when first needed."""

    def ensure(self, conn: Connection, generation_id: int) -> None:
        if self._exists(conn, generation_id):
            return
        _begin_write(conn)
        if self._exists(conn, generation_id):  # another process built it meanwhile
            return
        indexed = self._create_and_fill(conn, generation_id)
        if indexed:
            logger.info(
                "built the lexical index from existing chunks: generation=%s chunks=%d",
                generation_id,
                indexed,
            )

    def add(
        self, conn: Connection, generation_id: int, rows: Sequence[tuple[int, str]]
    ) -> None:
        if rows:
            table = self._table(generation_id)
            conn.execute(
                table.insert(), [{"rowid": vid, "text": text} for vid, text in rows]
            )

    def remove(
        self, conn: Connection, generation_id: int, vector_ids: sa.Select[tuple[int]]
    ) -> None:
        # A generation without a table yet has nothing to remove; the table is
        # built later from the chunk rows that remain.
        if self._exists(conn, generation_id):
            table = self._table(generation_id)
            conn.execute(table.delete().where(table.c.rowid.in_(vector_ids)))

    def mismatch(self, conn: Connection, generation_id: int) -> tuple[int, int] | None:
        """(entries indexed, chunk rows) when they differ; None also before the build.

        Counting the FTS5 ``docsize`` table (one small row per entry) is far
        cheaper than counting the FTS5 table itself, which reads every text.
        Both counts come from one statement, so from one snapshot even while
        a sync is writing.
        """
        if not self._exists(conn, generation_id):
            return None
        docsize = sa.table(f"{self.table_name(generation_id)}_docsize")
        indexed = sa.select(sa.func.count()).select_from(docsize).scalar_subquery()
        rows = (
            sa.select(sa.func.count())
            .where(self._chunks.c.generation_id == generation_id)
            .scalar_subquery()
        )
        counts = conn.execute(sa.select(indexed, rows)).one()
        return None if counts[0] == counts[1] else (int(counts[0]), int(counts[1]))

    def rebuild(self, conn: Connection, generation_id: int) -> int:
        _begin_write(conn)
        conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{self.table_name(generation_id)}"')
        return self._create_and_fill(conn, generation_id)

    def search(
        self, conn: Connection, generation_id: int, terms: Sequence[str], k: int
    ) -> list[tuple[int, float]]:
        """FTS5 ranks by bm25 (lower is better), so the score is its negation.

        FTS5 ranks its matches alone first, and only the head of that list is
        checked against the chunk rows for ``live`` ones: joining every match
        to the chunk rows before ranking costs as much again as the ranking.
        Chunks that are not live (a write in progress) are few, so the head is
        a little deeper than ``k``; when they leave fewer than ``k``, a deeper
        head is read, until the matches run out.
        """
        name = self.table_name(generation_id)
        match = " OR ".join(f'"{term}"' for term in terms)
        ranked = sa.text(
            f'SELECT rowid, -rank AS score FROM "{name}" WHERE "{name}" MATCH :match '
            "ORDER BY rank, rowid LIMIT :depth"
        )
        depth = k + _LIVE_SLACK
        while True:
            head = [
                (int(vid), float(score))
                for vid, score in conn.execute(ranked, {"match": match, "depth": depth})
            ]
            live = self._live(conn, generation_id, [vid for vid, _ in head])
            found = [(vid, score) for vid, score in head if vid in live]
            if len(found) >= k or len(head) < depth:
                return found[:k]
            depth *= 4

    def counts(
        self, conn: Connection, generation_id: int, terms: Sequence[str]
    ) -> tuple[int, list[int]]:
        """Counts the FTS5 matches of each term; the catalog caches the answers.

        Counting reads a term's list of chunks without scoring them, a small
        fraction of the cost of ranking them.
        """
        name = self.table_name(generation_id)
        total = conn.execute(sa.text(f'SELECT count(*) FROM "{name}_docsize"')).scalar()
        counted = sa.text(f'SELECT count(*) FROM "{name}" WHERE "{name}" MATCH :m')
        found = [
            int(conn.execute(counted, {"m": f'"{term}"'}).scalar() or 0)
            for term in terms
        ]
        return int(total or 0), found

    def _live(
        self, conn: Connection, generation_id: int, vector_ids: list[int]
    ) -> set[int]:
        chunks, live = self._chunks, set[int]()
        for start in range(0, len(vector_ids), _IDS_PER_QUERY):
            rows = conn.execute(
                sa.select(chunks.c.vector_id).where(
                    chunks.c.generation_id == generation_id,
                    chunks.c.state == "live",
                    chunks.c.vector_id.in_(vector_ids[start : start + _IDS_PER_QUERY]),
                )
            )
            live.update(int(vid) for vid in rows.scalars())
        return live

    def _table(self, generation_id: int) -> sa.TableClause:
        return sa.table(
            self.table_name(generation_id), sa.column("rowid"), sa.column("text")
        )

    def _exists(self, conn: Connection, generation_id: int) -> bool:
        found = conn.execute(
            sa.text("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :n"),
            {"n": self.table_name(generation_id)},
        ).first()
        return found is not None

    def _create_and_fill(self, conn: Connection, generation_id: int) -> int:
        name = self.table_name(generation_id)
        conn.exec_driver_sql(
            f'CREATE VIRTUAL TABLE IF NOT EXISTS "{name}" '
            f"USING fts5(text, tokenize='{self.TOKENIZER}')"
        )
        chunks = self._chunks
        source = sa.select(chunks.c.vector_id, chunks.c.text).where(
            chunks.c.generation_id == generation_id
        )
        result = conn.execute(
            self._table(generation_id).insert().from_select(["rowid", "text"], source)
        )
        return max(int(result.rowcount), 0)


class PostgresLexicalIndex:
    """A generated ``tsvector`` column on ``chunks`` with a GIN index.

    PostgreSQL computes the column on every insert, so nothing here writes
    it. Its text parser would read ``functools.lru_cache`` as one host name
    and ``3.11`` as one version number; the column replaces such punctuation
    with spaces first, so documents are split into the same words as the
    queries :func:`query_terms` makes.

    The column's expression is fixed when the column is added: :meth:`prepare`
    leaves an existing column as it is, so changing the expression needs a
    migration that drops and re-adds it.
    """

    COLUMN = "text_search"
    INDEX = "ix_chunks_text_search"
    # Punctuation that the parser would glue into hosts, paths, versions,
    # e-mail addresses, signed numbers, XML tags and entities.
    _SEPARATORS = "./:@\\<>&+-"

    def __init__(self, chunks: sa.Table) -> None:
        self._chunks = chunks

    def prepare(self, conn: Connection) -> None:
        """Add the column and its index unless present.

        Adding the column rewrites the ``chunks`` table once, so the first
        open after an upgrade takes time in proportion to the chunks held.
        The catalogs are checked first because ``ALTER TABLE`` locks the table
        even when there is nothing to add.
        """
        inspector = sa.inspect(conn)
        table = self._chunks.name
        if self.COLUMN not in {c["name"] for c in inspector.get_columns(table)}:
            logger.info("adding the full-text column to the catalog: table=%s", table)
            spaces = " " * len(self._SEPARATORS)
            conn.exec_driver_sql(
                f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {self.COLUMN} tsvector "
                f"GENERATED ALWAYS AS (to_tsvector('english', "
                f"translate(text, '{self._SEPARATORS}', '{spaces}'))) STORED"
            )
        if self.INDEX not in {i["name"] for i in inspector.get_indexes(table)}:
            conn.exec_driver_sql(
                f"CREATE INDEX IF NOT EXISTS {self.INDEX} "
                f"ON {table} USING gin ({self.COLUMN})"
            )

    def ensure(self, conn: Connection, generation_id: int) -> None:
        """Nothing to do: the column exists for every generation."""

    def add(
        self, conn: Connection, generation_id: int, rows: Sequence[tuple[int, str]]
    ) -> None:
        """Nothing to do: PostgreSQL computes the column on insert."""

    def remove(
        self, conn: Connection, generation_id: int, vector_ids: sa.Select[tuple[int]]
    ) -> None:
        """Nothing to do: the column goes with its row."""

    def mismatch(self, conn: Connection, generation_id: int) -> tuple[int, int] | None:
        """Always None: a generated column cannot disagree with its row."""
        return None

    def rebuild(self, conn: Connection, generation_id: int) -> int:
        """Nothing to rebuild; returns the number of chunk rows indexed."""
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(
                    self._chunks.c.generation_id == generation_id
                )
            ).scalar_one()
        )

    def search(
        self, conn: Connection, generation_id: int, terms: Sequence[str], k: int
    ) -> list[tuple[int, float]]:
        """Rank by cover density, scaled into [0, 1) and divided by log length.

        ``ts_rank_cd`` flag 1 divides by one plus the log of the chunk's
        length, flag 32 maps the rank into [0, 1). The terms hold no tsquery
        operators (see :func:`query_terms`), so joining them with ``|`` makes
        a query that always parses; it is bound as a parameter, never spliced
        into the SQL.
        """
        rows = conn.execute(
            sa.text(
                f"SELECT c.vector_id, ts_rank_cd(c.{self.COLUMN}, q, 33) AS score "
                f"FROM {self._chunks.name} AS c, to_tsquery('english', :query) AS q "
                "WHERE c.generation_id = :generation AND c.state = 'live' "
                f"AND c.{self.COLUMN} @@ q "
                "ORDER BY score DESC, c.vector_id LIMIT :k"
            ),
            {"generation": generation_id, "query": " | ".join(terms), "k": k},
        )
        return [(int(vid), float(score)) for vid, score in rows]

    def counts(
        self, conn: Connection, generation_id: int, terms: Sequence[str]
    ) -> tuple[int, list[int]]:
        """Counts each term through the GIN index; the catalog caches the answers."""
        chunks = self._chunks
        total = conn.execute(
            sa.select(sa.func.count()).where(chunks.c.generation_id == generation_id)
        ).scalar_one()
        counted = sa.text(
            f"SELECT count(*) FROM {chunks.name} WHERE generation_id = :generation "
            f"AND {self.COLUMN} @@ to_tsquery('english', :term)"
        )
        found = [
            int(
                conn.execute(
                    counted, {"generation": generation_id, "term": t}
                ).scalar_one()
            )
            for t in terms
        ]
        return int(total), found


class UnsupportedLexicalIndex:
    """Stands in on databases other than SQLite and PostgreSQL.

    Writes are no-ops, and a search raises an error that says what to do.
    """

    def __init__(self, dialect: str) -> None:
        self._dialect = dialect

    def prepare(self, conn: Connection) -> None:
        """Nothing to prepare."""

    def ensure(self, conn: Connection, generation_id: int) -> None:
        """Nothing to build."""

    def add(
        self, conn: Connection, generation_id: int, rows: Sequence[tuple[int, str]]
    ) -> None:
        """Nothing to index."""

    def remove(
        self, conn: Connection, generation_id: int, vector_ids: sa.Select[tuple[int]]
    ) -> None:
        """Nothing to unindex."""

    def mismatch(self, conn: Connection, generation_id: int) -> tuple[int, int] | None:
        return None

    def rebuild(self, conn: Connection, generation_id: int) -> int:
        return 0

    def counts(
        self, conn: Connection, generation_id: int, terms: Sequence[str]
    ) -> tuple[int, list[int]]:
        return 0, [0 for _ in terms]

    def search(
        self, conn: Connection, generation_id: int, terms: Sequence[str], k: int
    ) -> list[tuple[int, float]]:
        raise CatalogError(
            f"Lexical search needs a SQLite or PostgreSQL catalog, not {self._dialect}. "
            "Search in dense mode, or point catalog.url at PostgreSQL."
        )


def _begin_write(conn: Connection) -> None:
    """Start the SQLite write transaction now, so that DDL belongs to it.

    Python's sqlite3 module (3.11) begins a transaction only before the first
    INSERT, UPDATE or DELETE; a ``CREATE`` issued before that commits on its
    own, and a crash could leave an empty table behind. Inside a transaction
    already begun, DDL is part of it and nothing needs doing.
    """
    dbapi = conn.connection.dbapi_connection
    if not getattr(dbapi, "in_transaction", True):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
