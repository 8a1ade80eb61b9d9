"""Fixtures shared by the whole suite.

The real embedding model is loaded once per session; PostgreSQL tests get a
schema of their own that is dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestion.embedding import set_offline_environment

set_offline_environment()

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PYTHON_MANUAL = Path("/usr/share/doc/python3.11/html")
POSTGRES_URL = os.environ.get(
    "RAGLINE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def real_embedder():
    """The default sentence-transformers model, loaded once for the session."""
    from ingestion.config import EmbedderConfig
    from ingestion.embedding import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(EmbedderConfig())
    embedder.embed(["warm up"])
    return embedder


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search path is a fresh schema, dropped afterwards."""
    import sqlalchemy as sa

    schema = f"ragline_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5})
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as err:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_URL} ({err.orig}); start it "
            "with `bash .ci/services` or set RAGLINE_TEST_POSTGRES_URL."
        )
    sep = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The catalog database URL, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return request.getfixturevalue("postgres_url")
