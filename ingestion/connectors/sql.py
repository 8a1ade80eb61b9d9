"""The ``sql`` connector: one document per row of a query.

The rules the sync engine relies on:

* A row's key is ``str()`` of its ``id_column`` value. When two rows share an
  id, the first is the document and each later one is a failed document, so
  one key never stands for two documents.
* With ``updated_at_column`` set, a row's validator is the ISO form of that
  value, and a row whose validator matches the catalog's is an unchanged
  document, built without reading its text. Without it, every row is read on
  every sync (the content hash still spares re-embedding).
* If the database cannot be reached, the query fails, or it lacks a column
  the settings name, ``SourceError`` is raised and nothing is deleted. Error
  messages and logs show the URL with its password masked.
* Rows are streamed (server-side cursor where the driver has one), so the
  connection stays open while the listing is consumed; the engine is disposed
  when the listing ends or is abandoned.
* A time without a time zone, in ``updated_at_column``, is taken as UTC.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterator, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import quote
from uuid import UUID

from pydantic import ConfigDict, Field, SecretStr, field_validator
from sqlalchemy import Connection, CursorResult, Engine, create_engine, text
from sqlalchemy.engine import RowMapping, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from ..config import SourceConfig
from ..errors import DocumentError, SourceError
from ..models import FailedDocument, Listing, SourceDocument, UnchangedDocument
from .base import register_connector

__all__ = ["SqlConfig", "SqlSource"]

logger = logging.getLogger(__name__)

_BATCH_ROWS = 500
_CONNECT_TIMEOUT_S = 10
_PSYCOPG_DRIVERS = frozenset(
    {"postgresql", "postgresql+psycopg", "postgresql+psycopg2"}
)


class SqlConfig(SourceConfig):
    """Settings of a ``type: sql`` source."""

    # Validation errors would otherwise echo the url, password included.
    model_config = ConfigDict(hide_input_in_errors=True)

    url: SecretStr = Field(
        description="SQLAlchemy database URL, such as "
        "postgresql+psycopg://user:password@host/db or sqlite:///path/to.db. "
        "PostgreSQL connections give up after 10 s unless the URL sets "
        "connect_timeout."
    )
    query: str = Field(description="The SELECT whose rows are the documents.")
    id_column: str = Field(description="Column holding each row's unique id.")
    text_column: str = Field(description="Column holding the document text.")
    updated_at_column: str | None = Field(
        default=None,
        description="Column holding the row's last change time; rows whose value "
        "is unchanged are not read again.",
    )
    title_column: str | None = Field(default=None, description="Title column.")
    uri_template: str | None = Field(
        default=None,
        description="Citation URI, formatted with the row's columns, such as "
        "'https://wiki.example.com/page/{id}'. Default: sql://<source name>/<id>.",
    )
    metadata_columns: tuple[str, ...] = Field(
        default=(), description="Columns copied into the document's metadata."
    )
    labels_column: str | None = Field(
        default=None,
        description="Column of comma-separated access labels (or an array) added "
        "to the source's labels for that row.",
    )
    media_type: Literal["text/plain", "text/markdown", "text/html"] = Field(
        default="text/plain", description="How the text column is parsed."
    )

    @field_validator("url")
    @classmethod
    def _url_parses(cls, url: SecretStr) -> SecretStr:
        try:
            make_url(url.get_secret_value())
        except (ArgumentError, ValueError) as err:
            raise ValueError(
                "The url is not a valid SQLAlchemy URL; write it like "
                "'postgresql+psycopg://user:password@host:5432/db'."
            ) from err
        return url

    @field_validator("uri_template")
    @classmethod
    def _template_parses(cls, template: str | None) -> str | None:
        if template is not None:
            try:
                _template_columns(template)
            except ValueError as err:
                raise ValueError(
                    f"uri_template {template!r} is not a valid format string "
                    f"({err}); name columns in braces, such as '{{id}}'."
                ) from err
        return template


@register_connector("sql", SqlConfig)
class SqlSource:
    """Lists the rows of a SQL query, streaming them from the database.

    Example::

        source = SqlSource(SqlConfig(
            name="kb", type="sql", collection="docs",
            url="sqlite:///kb.db", query="SELECT id, body, changed FROM articles",
            id_column="id", text_column="body", updated_at_column="changed",
        ))
        for listing in source.documents(known={}):
            ...
    """

    def __init__(self, config: SqlConfig) -> None:
        self.config = config
        self._url = make_url(config.url.get_secret_value())

    @property
    def masked_url(self) -> str:
        """The database URL with its password replaced by ``***``."""
        return self._url.render_as_string(hide_password=True)

    def documents(self, known: Mapping[str, str | None]) -> Iterator[Listing]:
        """Yield a listing for every row the query returns.

        Raises ``SourceError`` if the database cannot be reached, the query
        fails, or a configured column is missing from its result.
        """
        logger.info(
            "Listing source %(source)s from %(url)s",
            {"source": self.config.name, "url": self.masked_url},
        )
        engine = self._engine()
        try:
            yield from self._listings(engine, known)
        finally:
            engine.dispose()

    def _engine(self) -> Engine:
        connect_args = {}
        if (
            self._url.drivername in _PSYCOPG_DRIVERS
            and "connect_timeout" not in self._url.query
        ):
            connect_args["connect_timeout"] = _CONNECT_TIMEOUT_S
        try:
            return create_engine(self._url, connect_args=connect_args)
        except (ArgumentError, SQLAlchemyError, ImportError) as err:
            raise self._error(
                "could not load its database driver",
                "Install the driver the url names.",
                err,
            ) from err

    def _listings(
        self, engine: Engine, known: Mapping[str, str | None]
    ) -> Iterator[Listing]:
        with self._connect(engine) as connection:
            result = self._execute(connection)
            try:
                self._check_columns(list(result.keys()))
                reader = _RowReader(self.config, known)
                count = 0
                for count, row in enumerate(self._rows(result), start=1):
                    yield reader.listing(count, row)
            finally:
                result.close()

        logger.info(
            "Read %(rows)d rows of source %(source)s",
            {"rows": count, "source": self.config.name},
        )

    def _connect(self, engine: Engine) -> Connection:
        try:
            return engine.connect()
        except SQLAlchemyError as err:
            raise self._error(
                "could not connect to its database",
                "Check that the database is running and that the url is right.",
                err,
            ) from err

    def _execute(self, connection: Connection) -> CursorResult[Any]:
        try:
            return connection.execution_options(
                stream_results=True, yield_per=_BATCH_ROWS
            ).execute(text(self.config.query))
        except SQLAlchemyError as err:
            raise self._error("could not run its query", "Fix the query.", err) from err

    def _rows(self, result: CursorResult[Any]) -> Iterator[RowMapping]:
        try:
            yield from result.mappings()
        except SQLAlchemyError as err:
            raise self._error(
                "lost its database while reading rows",
                "Sync again once the database is back.",
                err,
            ) from err

    def _check_columns(self, returned: list[str]) -> None:
        for setting, column in _named_columns(self.config):
            if column not in returned:
                raise SourceError(
                    f"The query of source {self.config.name!r} returns no column "
                    f"{column!r}, which {setting} names; it returns "
                    f"{', '.join(returned) or 'no columns'}. Fix the query or "
                    "the setting."
                )

    def _error(self, what: str, remedy: str, err: BaseException) -> SourceError:
        """A ``SourceError`` naming the masked URL, the cause and the remedy."""
        cause = str(getattr(err, "orig", None) or err).strip()
        password = self._url.password
        if password:
            cause = cause.replace(str(password), "***")
        return SourceError(
            f"Source {self.config.name!r} ({self.masked_url}) {what} ({cause}). "
            f"{remedy}"
        )


class _RowReader:
    """Turns rows into listings, remembering ids to catch duplicates."""

    def __init__(self, config: SqlConfig, known: Mapping[str, str | None]) -> None:
        self._config = config
        self._known = known
        self._seen: set[str] = set()

    def listing(self, number: int, row: RowMapping) -> Listing:
        """The listing for row ``number`` (counted from 1)."""
        config = self._config
        raw_id = row[config.id_column]
        if raw_id is None:
            return self._failed(
                f"(row {number}: NULL id)",
                f"Row {number} has a NULL {config.id_column!r}; give every row an "
                "id or filter such rows out in the query.",
            )

        key = str(raw_id)
        if key in self._seen:
            return self._failed(
                key,
                f"Another row has the id {key!r}; the first one is kept. Make "
                f"{config.id_column!r} unique in the query.",
            )
        self._seen.add(key)

        try:
            return self._listing(key, row)
        except DocumentError as err:
            return self._failed(key, str(err))

    def _listing(self, key: str, row: RowMapping) -> Listing:
        config = self._config
        changed_at = row[config.updated_at_column] if config.updated_at_column else None
        version = _version(changed_at)
        if version is not None and self._known.get(key) == version:
            return UnchangedDocument(config.name, key)

        return SourceDocument(
            source=config.name,
            key=key,
            uri=self._uri(key, row),
            content=self._text(row),
            media_type=config.media_type,
            modified_at=_modified_at(changed_at),
            title=self._title(row),
            metadata={
                name: _scalar(name, row[name]) for name in config.metadata_columns
            },
            access_labels=self._labels(row),
            version=version,
        )

    def _text(self, row: RowMapping) -> str:
        column = self._config.text_column
        value = row[column]
        if value is None:
            raise DocumentError(
                f"The row's {column!r} is NULL; fill it in or filter the row out "
                "in the query."
            )
        if not isinstance(value, str):
            raise DocumentError(
                f"The row's {column!r} holds {type(value).__name__}, not text; "
                "cast it to text in the query."
            )
        return value

    def _title(self, row: RowMapping) -> str | None:
        if self._config.title_column is None:
            return None
        title = row[self._config.title_column]
        return None if title is None else str(title)

    def _labels(self, row: RowMapping) -> tuple[str, ...]:
        labels = tuple(self._config.access_labels)
        column = self._config.labels_column
        value = None if column is None else row[column]
        if value is None:
            return labels
        if isinstance(value, str):
            extra = [label.strip() for label in value.split(",")]
        elif isinstance(value, list | tuple):
            extra = [str(label).strip() for label in value]
        else:
            raise DocumentError(
                f"The row's {column!r} holds {type(value).__name__}; give labels "
                "as comma-separated text or an array."
            )
        return tuple(dict.fromkeys([*labels, *(label for label in extra if label)]))

    def _uri(self, key: str, row: RowMapping) -> str:
        template = self._config.uri_template
        if template is None:
            return _default_uri(self._config.name, key)
        try:
            return template.format_map(row)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise DocumentError(
                f"uri_template could not be filled in for this row ({err!r}); "
                "fix uri_template."
            ) from err

    def _failed(self, key: str, error: str) -> FailedDocument:
        logger.warning(
            "Row %(key)s of source %(source)s failed: %(error)s",
            {"key": key, "source": self._config.name, "error": error},
        )
        return FailedDocument(
            self._config.name, key, _default_uri(self._config.name, key), error
        )


def _named_columns(config: SqlConfig) -> Iterator[tuple[str, str]]:
    """Each column the settings name, with the setting that names it."""
    yield "id_column", config.id_column
    yield "text_column", config.text_column
    optional = {
        "updated_at_column": config.updated_at_column,
        "title_column": config.title_column,
        "labels_column": config.labels_column,
    }
    for setting, column in optional.items():
        if column is not None:
            yield setting, column
    for column in config.metadata_columns:
        yield "metadata_columns", column
    if config.uri_template is not None:
        for column in _template_columns(config.uri_template):
            yield "uri_template", column


def _template_columns(template: str) -> list[str]:
    """The column names a format string refers to (``{a}``, ``{a.b}``, ``{a[0]}``)."""
    columns = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        name = field.split(".", 1)[0].split("[", 1)[0]
        if not name or name.isdigit():
            raise ValueError("fields must name a column")
        columns.append(name)
    return columns


def _default_uri(source: str, key: str) -> str:
    return f"sql://{quote(source, safe='')}/{quote(key, safe='')}"


def _version(changed_at: Any) -> str | None:
    """The validator of a row: its change time in ISO form."""
    if changed_at is None:
        return None
    if isinstance(changed_at, datetime | date):
        return changed_at.isoformat()
    return str(changed_at)


def _modified_at(changed_at: Any) -> datetime | None:
    if isinstance(changed_at, str):
        try:
            changed_at = datetime.fromisoformat(changed_at)
        except ValueError:
            return None
    if isinstance(changed_at, datetime):
        if changed_at.tzinfo is None:
            return changed_at.replace(tzinfo=UTC)
        return changed_at.astimezone(UTC)
    if isinstance(changed_at, date):
        return datetime(changed_at.year, changed_at.month, changed_at.day, tzinfo=UTC)
    return None


def _scalar(column: str, value: Any) -> Any:
    """A metadata value JSON can hold."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, UUID):
        return str(value)
    raise DocumentError(
        f"The metadata column {column!r} holds {type(value).__name__}; cast it to "
        "text or a number in the query."
    )
