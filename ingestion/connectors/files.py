"""The ``files`` connector: documents from a local folder tree.

The rules the sync engine relies on:

* A document's key is its path relative to ``path``, in POSIX form. A JSON or
  JSONL file holds one document per record, keyed ``<relative path>#<id>``.
* The tree is walked completely before the first document is yielded. If the
  root folder, or a subfolder that could hold an included file, cannot be
  listed, ``SourceError`` is raised and nothing is deleted.
* Patterns are relative to ``path``: ``*`` and ``?`` stay within one name,
  ``**`` spans any number of folders. Wildcards in *include* patterns do not
  match a name that starts with a dot, so hidden files and folders are
  skipped unless an include pattern names them (``.github/**``, ``**/.env``).
  Wildcards in *exclude* patterns match every name.
* Symbolic links are ignored unless ``follow_symlinks`` is set. A followed
  link whose target is missing is a failed document; a link back to one of
  its own parent folders is not followed. A folder reached by two paths is
  listed under both.
* A file's validator is ``"<st_mtime_ns>:<st_size>"``. Every record of a
  records file carries its file's validator, so an unchanged records file is
  not opened at all.
* When a records file cannot be read as a whole, every record the catalog
  knows from it is reported failed (so each keeps its last good version); a
  file with no known records is reported failed under its own path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from pydantic import Field, field_validator

from ..config import SourceConfig, StrictModel
from ..errors import DocumentError, DocumentTooLarge, SourceError
from ..models import FailedDocument, Listing, SourceDocument, UnchangedDocument
from .base import register_connector

__all__ = ["FilesConfig", "FilesSource", "RecordsConfig"]

logger = logging.getLogger(__name__)

_RECORDS = "records"

_MEDIA_TYPES: dict[str, str] = {
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".txt": "text/plain",
    ".text": "text/plain",
    ".rst": "text/plain",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
    ".json": _RECORDS,
    ".jsonl": _RECORDS,
}

_RECORD_MEDIA_TYPE = "text/plain"


class RecordsConfig(StrictModel):
    """How the objects of a ``.json`` or ``.jsonl`` file become documents."""

    id_field: str = Field(
        default="id",
        description="Field holding the record id; records without it are "
        "numbered line<n> (JSONL, from 1) or item<n> (JSON, from 0).",
    )
    text_field: str = Field(default="text", description="Field holding the text.")
    title_field: str | None = Field(
        default="title", description="Field holding the title, if any."
    )
    labels_field: str | None = Field(
        default=None,
        description="Field holding a list of access labels added to the "
        "source's labels for that record.",
    )


class FilesConfig(SourceConfig):
    """Settings of a ``type: files`` source."""

    path: Path = Field(description="The folder to index.")
    include: tuple[str, ...] = Field(
        default=("**/*",),
        description="Glob patterns, relative to path, of the files to index.",
    )
    exclude: tuple[str, ...] = Field(
        default=(),
        description="Glob patterns, relative to path, of files to leave out.",
    )
    follow_symlinks: bool = Field(
        default=False, description="Follow symbolic links to files and folders."
    )
    records: RecordsConfig = Field(default_factory=RecordsConfig)

    @field_validator("include", "exclude")
    @classmethod
    def _patterns_are_relative(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            parts = pattern.split("/")
            if not pattern.strip("/") or pattern.startswith("/") or ".." in parts:
                raise ValueError(
                    f"Pattern {pattern!r} must be a non-empty path relative to "
                    "'path', without '..', such as 'docs/**/*.md'."
                )
        return patterns


@register_connector("files", FilesConfig)
class FilesSource:
    """Lists the files of a folder tree; JSON and JSONL files give one document
    per record.

    Example::

        source = FilesSource(FilesConfig(
            name="handbook", type="files", collection="docs",
            path=Path("handbook"), include=("**/*.md",),
        ))
        for listing in source.documents(known={}):
            ...
    """

    def __init__(self, config: FilesConfig) -> None:
        self.config = config
        self._filter = _PathFilter(config.include, config.exclude)

    def documents(self, known: Mapping[str, str | None]) -> Iterator[Listing]:
        """Yield a listing for every included file (or record), sorted by path.

        Raises ``SourceError`` before yielding anything if the tree cannot be
        listed completely.
        """
        root = self._check_root()
        paths = _walk(root, self._filter, self.config)
        logger.info(
            "Listing source %(source)s: %(files)d files under %(root)s",
            {"source": self.config.name, "files": len(paths), "root": root},
        )
        known_keys = _SortedKeys(known)

        for relpath in paths:
            yield from self._file_listings(root, relpath, known, known_keys)

    def _check_root(self) -> Path:
        root = self.config.path.absolute()
        try:
            info = os.stat(root)
        except (FileNotFoundError, NotADirectoryError) as err:
            raise SourceError(
                f"The folder {root} of source {self.config.name!r} does not exist; "
                "check 'path' in the settings."
            ) from err
        except OSError as err:
            raise SourceError(
                f"The folder {root} of source {self.config.name!r} cannot be read "
                f"({err.strerror}); check its permissions."
            ) from err

        if not stat.S_ISDIR(info.st_mode):
            raise SourceError(
                f"The path {root} of source {self.config.name!r} is not a folder; "
                "'path' must name a folder."
            )
        return root

    def _file_listings(
        self,
        root: Path,
        relpath: str,
        known: Mapping[str, str | None],
        known_keys: _SortedKeys,
    ) -> Iterator[Listing]:
        file = _File(relpath, root / relpath)
        media_type = _MEDIA_TYPES.get(file.path.suffix.lower())
        if media_type is None:
            yield self._failed(relpath, file.uri, _unsupported_message(file.path))
            return

        record_keys = known_keys.under(file.record_prefix)
        try:
            info = _regular_file_stat(file.path)
        except DocumentError as err:
            yield from self._failures(file, str(err), record_keys)
            return
        if info is None:
            logger.debug("File %s vanished while listing", relpath)
            return

        if media_type == _RECORDS:
            yield from self._record_listings(file, info, known, record_keys)
        else:
            yield self._plain_listing(file, info, media_type, known)

    def _plain_listing(
        self,
        file: _File,
        info: os.stat_result,
        media_type: str,
        known: Mapping[str, str | None],
    ) -> Listing:
        validator = _validator(info)
        if info.st_size > self.config.max_document_bytes:
            return self._failed(file.relpath, file.uri, self._too_large(info.st_size))
        if known.get(file.relpath) == validator:
            return UnchangedDocument(self.config.name, file.relpath)

        try:
            content = _read_bounded(file.path, self.config.max_document_bytes)
        except DocumentError as err:
            return self._failed(file.relpath, file.uri, str(err))

        return SourceDocument(
            source=self.config.name,
            key=file.relpath,
            uri=file.uri,
            content=content,
            media_type=media_type,
            modified_at=_modified_at(info),
            metadata={"path": file.relpath},
            access_labels=tuple(self.config.access_labels),
            version=validator,
        )

    def _record_listings(
        self,
        file: _File,
        info: os.stat_result,
        known: Mapping[str, str | None],
        record_keys: list[str],
    ) -> Iterator[Listing]:
        validator = _validator(info)
        if record_keys and all(known[key] == validator for key in record_keys):
            for key in record_keys:
                yield UnchangedDocument(self.config.name, key)
            return

        reader = _RecordReader(self.config, file, validator, _modified_at(info))
        seen: set[str] = set()
        try:
            for listing in reader.listings(info.st_size):
                seen.add(listing.key)
                yield listing
        except DocumentError as err:
            unseen = [key for key in record_keys if key not in seen]
            yield from self._failures(file, str(err), unseen)

    def _failures(
        self, file: _File, error: str, record_keys: list[str]
    ) -> Iterator[FailedDocument]:
        """Report a file-level failure under each known record key, or the path."""
        for key in record_keys or [file.relpath]:
            yield self._failed(key, file.uri, error)

    def _failed(self, key: str, uri: str, error: str) -> FailedDocument:
        logger.warning(
            "Document %(key)s of source %(source)s failed: %(error)s",
            {"key": key, "source": self.config.name, "error": error},
        )
        return FailedDocument(self.config.name, key, uri, error)

    def _too_large(self, size: int) -> str:
        return _too_large_message(size, self.config.max_document_bytes)


@dataclass(frozen=True, slots=True)
class _File:
    relpath: str
    path: Path

    @property
    def uri(self) -> str:
        return self.path.as_uri()

    @property
    def record_prefix(self) -> str:
        return f"{self.relpath}#"


class _RecordReader:
    """Turns the objects of one JSON or JSONL file into listings."""

    def __init__(
        self,
        config: FilesConfig,
        file: _File,
        validator: str,
        modified_at: datetime,
    ) -> None:
        self._config = config
        self._fields = config.records
        self._file = file
        self._validator = validator
        self._modified_at = modified_at

    def listings(self, size: int) -> Iterator[Listing]:
        """Yield one listing per record, the later of two records with one id
        failed; raise ``DocumentError`` if the file as a whole cannot be read."""
        if self._file.path.suffix.lower() == ".jsonl":
            listings = self._jsonl_listings()
        else:
            listings = self._json_listings(size)

        seen: set[str] = set()
        for listing in listings:
            if listing.key in seen:
                listing = self._failed(
                    listing.key,
                    f"Another record of {self._file.relpath} has the same id; the "
                    "first one is kept. Give every record a unique id.",
                )
            seen.add(listing.key)
            yield listing

    def _jsonl_listings(self) -> Iterator[Listing]:
        limit = self._config.max_document_bytes
        try:
            with self._file.path.open("rb") as handle:
                for number, line in _bounded_lines(handle, limit):
                    if line is None or line.strip():
                        yield self._line_listing(number, line)
        except OSError as err:
            raise _read_error(err) from err

    def _line_listing(self, number: int, line: bytes | None) -> Listing:
        fallback_id = f"line{number}"
        if line is None:
            return self._failed(
                self._key(fallback_id),
                f"Line {number} is longer than max_document_bytes "
                f"({self._config.max_document_bytes}); shorten the record or raise "
                "the limit.",
            )
        try:
            parsed = json.loads(line)
        except ValueError as err:
            return self._failed(
                self._key(fallback_id),
                f"Line {number} is not valid JSON ({err}); fix the line.",
            )
        return self._listing(fallback_id, parsed)

    def _json_listings(self, size: int) -> Iterator[Listing]:
        limit = self._config.max_document_bytes
        if size > limit:
            raise DocumentTooLarge(_too_large_message(size, limit))

        try:
            parsed = json.loads(_read_bounded(self._file.path, limit))
        except ValueError as err:
            raise DocumentError(
                f"The file is not valid JSON ({err}); fix it or exclude it."
            ) from err

        items = [parsed] if isinstance(parsed, dict) else parsed
        if not isinstance(items, list):
            raise DocumentError(
                "The file holds neither a JSON object nor a list of objects; "
                "fix it or exclude it."
            )
        for index, item in enumerate(items):
            yield self._listing(f"item{index}", item)

    def _listing(self, fallback_id: str, parsed: Any) -> Listing:
        if not isinstance(parsed, dict):
            return self._failed(
                self._key(fallback_id),
                f"Record {fallback_id} is not a JSON object; fix it in the file.",
            )
        try:
            record_id = self._record_id(parsed, fallback_id)
        except DocumentError as err:
            return self._failed(self._key(fallback_id), str(err))

        key = self._key(record_id)
        try:
            return self._document(key, record_id, parsed)
        except DocumentError as err:
            return self._failed(key, str(err))

    def _document(self, key: str, record_id: str, record: dict[str, Any]) -> Listing:
        text = record.get(self._fields.text_field)
        if not isinstance(text, str):
            raise DocumentError(
                f"The record has no string field {self._fields.text_field!r}; add "
                "it or set records.text_field to the field that holds the text."
            )

        return SourceDocument(
            source=self._config.name,
            key=key,
            uri=f"{self._file.uri}#{quote(record_id, safe='')}",
            content=text,
            media_type=_RECORD_MEDIA_TYPE,
            modified_at=self._modified_at,
            title=self._title(record),
            metadata=self._metadata(record),
            access_labels=self._labels(record),
            version=self._validator,
        )

    def _record_id(self, record: dict[str, Any], fallback_id: str) -> str:
        value = record.get(self._fields.id_field)
        if value is None:
            return fallback_id
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise DocumentError(
            f"Record {fallback_id} has an id field {self._fields.id_field!r} that is "
            "neither a string nor a number; fix it in the file."
        )

    def _title(self, record: dict[str, Any]) -> str | None:
        if self._fields.title_field is None:
            return None
        title = record.get(self._fields.title_field)
        return None if title is None else str(title)

    def _metadata(self, record: dict[str, Any]) -> dict[str, Any]:
        fields = self._fields
        roles = {fields.id_field, fields.text_field, fields.title_field}
        roles.add(fields.labels_field)
        return {
            name: value
            for name, value in record.items()
            if name not in roles and _is_scalar(value)
        }

    def _labels(self, record: dict[str, Any]) -> tuple[str, ...]:
        labels = tuple(self._config.access_labels)
        field = self._fields.labels_field
        value = None if field is None else record.get(field)
        if value is None:
            return labels
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise DocumentError(
                f"The record's field {field!r} is not a list of label strings; "
                "fix it in the file."
            )
        return tuple(dict.fromkeys([*labels, *value]))

    def _key(self, record_id: str) -> str:
        return f"{self._file.record_prefix}{record_id}"

    def _failed(self, key: str, error: str) -> FailedDocument:
        logger.warning(
            "Document %(key)s of source %(source)s failed: %(error)s",
            {"key": key, "source": self._config.name, "error": error},
        )
        return FailedDocument(self._config.name, key, self._file.uri, error)


class _Glob:
    """One include or exclude pattern, compiled to regular expressions.

    With ``match_hidden`` false, no wildcard matches a leading dot.
    """

    def __init__(self, pattern: str, *, match_hidden: bool) -> None:
        self.segments = tuple(part for part in pattern.split("/") if part)
        self.match_hidden = match_hidden
        self._segment_regexes = tuple(
            re.compile(_segment_regex(part, match_hidden)) for part in self.segments
        )
        self._regex = re.compile(_path_regex(self.segments, match_hidden))
        self._folder_regex = _folder_regex(self.segments)

    def matches(self, relpath: str) -> bool:
        return self._regex.fullmatch(relpath) is not None

    def may_match_below(self, folder: tuple[str, ...]) -> bool:
        """Whether a file somewhere below ``folder`` could match."""
        for index, name in enumerate(folder):
            if index >= len(self.segments):
                return False
            if self.segments[index] == "**":
                return self._stars_may_match(folder[index:], self.segments[index:])
            if index == len(self.segments) - 1:
                return False
            if not self._segment_regexes[index].fullmatch(name):
                return False
        return True

    def covers_folder(self, folder: str) -> bool:
        """Whether this pattern matches every file below ``folder``."""
        if self._folder_regex is None:
            return False
        return self._folder_regex.fullmatch(folder) is not None

    def _stars_may_match(
        self, names: tuple[str, ...], segments: tuple[str, ...]
    ) -> bool:
        if self.match_hidden or not any(name.startswith(".") for name in names):
            return True
        return any(segment.startswith(".") for segment in segments)


class _PathFilter:
    """Decides which files are included and which folders are worth walking."""

    def __init__(self, include: Iterable[str], exclude: Iterable[str]) -> None:
        self._include = [_Glob(pattern, match_hidden=False) for pattern in include]
        self._exclude = [_Glob(pattern, match_hidden=True) for pattern in exclude]

    def selects(self, relpath: str) -> bool:
        return any(glob.matches(relpath) for glob in self._include) and not any(
            glob.matches(relpath) for glob in self._exclude
        )

    def may_select_below(self, folder: tuple[str, ...]) -> bool:
        relpath = "/".join(folder)
        if any(glob.covers_folder(relpath) for glob in self._exclude):
            return False
        return any(glob.may_match_below(folder) for glob in self._include)


class _SortedKeys:
    """The known keys, sorted so the keys under a prefix are found quickly."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = sorted(keys)

    def under(self, prefix: str) -> list[str]:
        start = end = bisect_left(self._keys, prefix)
        while end < len(self._keys) and self._keys[end].startswith(prefix):
            end += 1
        return self._keys[start:end]


@dataclass(frozen=True, slots=True)
class _Folder:
    path: Path
    parts: tuple[str, ...]
    ancestors: frozenset[tuple[int, int]] = frozenset()


def _walk(root: Path, path_filter: _PathFilter, config: FilesConfig) -> list[str]:
    """The sorted relative paths of the included files below ``root``."""
    found: list[str] = []
    pending = [_Folder(root, ())]

    while pending:
        folder = pending.pop()
        ancestors = _ancestors_with(folder) if config.follow_symlinks else frozenset()
        if ancestors is None:
            continue
        for entry in _scan(folder.path, config.name):
            relparts = (*folder.parts, entry.name)
            if entry.is_symlink() and not config.follow_symlinks:
                logger.debug("Skipping symbolic link %s", entry.path)
            elif entry.is_dir(follow_symlinks=config.follow_symlinks):
                if path_filter.may_select_below(relparts):
                    pending.append(_Folder(Path(entry.path), relparts, ancestors))
            elif path_filter.selects("/".join(relparts)):
                found.append("/".join(relparts))

    return sorted(found)


def _scan(folder: Path, source: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as err:
        raise SourceError(
            f"Source {source!r} could not list the folder {folder} "
            f"({err.strerror}); fix its permissions or exclude it."
        ) from err


def _ancestors_with(folder: _Folder) -> frozenset[tuple[int, int]] | None:
    """The folder's ancestors and itself, or None if a link led back to one."""
    try:
        info = os.stat(folder.path)
    except OSError:
        return folder.ancestors  # listing the folder will report the error
    identity = (info.st_dev, info.st_ino)
    if identity in folder.ancestors:
        logger.debug("Not following %s: it leads back to a parent folder", folder.path)
        return None
    return folder.ancestors | {identity}


def _regular_file_stat(path: Path) -> os.stat_result | None:
    """The file's status, following links; None when the file is gone."""
    try:
        info = os.stat(path)
    except FileNotFoundError as err:
        if os.path.lexists(path):
            raise DocumentError(
                "The symbolic link points to a missing file; fix or remove the link."
            ) from err
        return None
    except OSError as err:
        raise _read_error(err) from err

    if not stat.S_ISREG(info.st_mode):
        raise DocumentError(
            "The path is not a regular file (it is a FIFO, socket or device); "
            "exclude it."
        )
    return info


def _read_bounded(path: Path, limit: int) -> bytes:
    """Read at most ``limit`` bytes, failing if the file holds more."""
    try:
        with path.open("rb") as handle:
            content = handle.read(limit + 1)
    except OSError as err:
        raise _read_error(err) from err

    if len(content) > limit:
        raise DocumentTooLarge(_too_large_message(len(content), limit))
    return content


def _bounded_lines(handle: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """Number the lines of ``handle``; a line longer than ``limit`` gives None."""
    number = 0
    while line := handle.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            _skip_rest_of_line(handle)
            yield number, None
        else:
            yield number, line


def _skip_rest_of_line(handle: IO[bytes]) -> None:
    while (chunk := handle.readline(1 << 16)) and not chunk.endswith(b"\n"):
        pass


def _read_error(err: OSError) -> DocumentError:
    return DocumentError(
        f"The file could not be read ({err.strerror or err}); check its permissions."
    )


def _too_large_message(size: int, limit: int) -> str:
    return (
        f"The file is {size} bytes, more than max_document_bytes ({limit}); "
        "raise the limit or exclude the file."
    )


def _unsupported_message(path: Path) -> str:
    supported = ", ".join(sorted(_MEDIA_TYPES))
    kind = f"ending in {path.suffix!r}" if path.suffix else "without a suffix"
    return (
        f"Files {kind} are not supported (supported: {supported}); "
        "exclude the file or convert it."
    )


def _validator(info: os.stat_result) -> str:
    return f"{info.st_mtime_ns}:{info.st_size}"


def _modified_at(info: os.stat_result) -> datetime:
    return datetime.fromtimestamp(info.st_mtime_ns / 1e9, tz=UTC)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _path_regex(segments: tuple[str, ...], match_hidden: bool) -> str:
    """A regular expression matching whole relative paths."""
    name = "[^/]+" if match_hidden else r"(?!\.)[^/]+"
    pieces: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            pieces.append(f"{name}(?:/{name})*" if last else f"(?:{name}/)*")
        else:
            regex = _segment_regex(segment, match_hidden)
            pieces.append(regex if last else f"{regex}/")
    return "".join(pieces)


def _folder_regex(segments: tuple[str, ...]) -> re.Pattern[str] | None:
    """For a pattern ending in ``/**``: the folders whose every file it matches."""
    if not segments or segments[-1] != "**":
        return None
    return re.compile(_path_regex(segments[:-1], True) if len(segments) > 1 else ".*")


def _segment_regex(segment: str, match_hidden: bool) -> str:
    """A regular expression matching one name against one pattern segment."""
    if segment == "**":
        return "[^/]+" if match_hidden else r"(?!\.)[^/]+"
    body = "".join(_translate(segment))
    if match_hidden or segment.startswith("."):
        return body
    return r"(?!\.)" + body


def _translate(segment: str) -> Iterator[str]:
    index = 0
    while index < len(segment):
        char = segment[index]
        end = segment.find("]", index + 2) if char == "[" else -1
        if char == "*":
            yield "[^/]*"
        elif char == "?":
            yield "[^/]"
        elif end > 0:
            yield _char_class(segment[index + 1 : end])
            index = end
        else:
            yield re.escape(char)
        index += 1


def _char_class(body: str) -> str:
    negated = body.startswith("!")
    chars = body[1:] if negated else body
    escaped = "".join(char if char == "-" else re.escape(char) for char in chars)
    return f"[^/{escaped}]" if negated else f"[{escaped}]"
