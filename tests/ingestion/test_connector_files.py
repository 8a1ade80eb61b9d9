"""The files connector against real folder trees in a temporary directory."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ingestion.connectors.base import connector_for
from ingestion.connectors.files import FilesConfig, FilesSource
from ingestion.errors import SourceError
from ingestion.models import (
    FailedDocument,
    Listing,
    SourceDocument,
    UnchangedDocument,
)


def make_source(root: Path, **settings: Any) -> FilesSource:
    config = FilesConfig(
        name="notes", type="files", collection="docs", path=root, **settings
    )
    return FilesSource(config)


def list_all(
    source: FilesSource, known: Mapping[str, str | None] | None = None
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


def write(root: Path, relpath: str, content: str | bytes) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def write_jsonl(root: Path, relpath: str, lines: list[Any]) -> Path:
    rendered = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    return write(root, relpath, "\n".join(rendered) + "\n")


def bump_mtime(path: Path) -> None:
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def forbid_open(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Make ``Path.open`` fail for the paths given, as an unreadable file would."""
    forbidden: set[Path] = set()
    real_open = Path.open

    def guarded_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self in forbidden:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", guarded_open)
    return forbidden.add


@pytest.fixture
def scandir_fails_for(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Make ``os.scandir`` fail for the folders given, as an unreadable one would."""
    failing: set[str] = set()
    real_scandir = os.scandir

    def guarded_scandir(path: Any) -> Iterator[os.DirEntry[str]]:
        if str(path) in failing:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", guarded_scandir)
    return lambda folder: failing.add(str(folder))


def test_the_files_type_is_registered() -> None:
    config_model, factory = connector_for("files")

    assert config_model is FilesConfig, config_model
    assert factory is FilesSource, factory


def test_unknown_setting_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="extra"):
        make_source(tmp_path, includes=("*.md",))


def test_pattern_leaving_the_folder_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="relative"):
        make_source(tmp_path, include=("../*.md",))


def test_text_files_become_documents_with_their_details(tmp_path: Path) -> None:
    guide = write(tmp_path, "guide/intro.md", "# Intro\n")
    write(tmp_path, "notes.txt", "plain")
    write(tmp_path, "page.HTML", "<p>hi</p>")
    write(tmp_path, "paper.pdf", b"%PDF-1.4")

    listings = list_all(make_source(tmp_path, access_labels=("staff",)))

    media_types = {
        key: getattr(doc, "media_type", None) for key, doc in listings.items()
    }
    assert media_types == {
        "guide/intro.md": "text/markdown",
        "notes.txt": "text/plain",
        "page.HTML": "text/html",
        "paper.pdf": "application/pdf",
    }, media_types
    intro = listings["guide/intro.md"]
    assert isinstance(intro, SourceDocument), intro
    assert intro.content == b"# Intro\n", intro.content
    assert intro.uri == guide.as_uri(), intro.uri
    assert intro.access_labels == ("staff",), intro.access_labels
    info = guide.stat()
    assert intro.version == f"{info.st_mtime_ns}:{info.st_size}", intro.version
    assert intro.modified_at is not None, "modified_at is missing"
    assert intro.modified_at.tzinfo == UTC, intro.modified_at


def test_files_are_listed_in_sorted_order(tmp_path: Path) -> None:
    for relpath in ("b.md", "a/z.md", "a/b/c.md", "c.txt", "a.md"):
        write(tmp_path, relpath, "x")

    keys = [listing.key for listing in make_source(tmp_path).documents({})]

    assert keys == sorted(keys), keys
    assert len(keys) == 5, keys


def test_include_and_exclude_patterns_select_files(tmp_path: Path) -> None:
    for relpath in (
        "top.md",
        "docs/a.md",
        "docs/deep/b.md",
        "docs/deep/draft.md",
        "docs/c.txt",
        "build/out.md",
    ):
        write(tmp_path, relpath, "x")

    source = make_source(
        tmp_path,
        include=("**/*.md",),
        exclude=("build/**", "**/draft.md"),
    )

    assert sorted(list_all(source)) == [
        "docs/a.md",
        "docs/deep/b.md",
        "top.md",
    ], "only Markdown outside build/ and not named draft.md should be listed"


def test_hidden_files_are_skipped_unless_an_include_names_them(tmp_path: Path) -> None:
    for relpath in ("a.md", ".env.md", ".git/config.md", ".github/ci.md", "x/.h.md"):
        write(tmp_path, relpath, "x")

    default = list_all(make_source(tmp_path))
    explicit = list_all(make_source(tmp_path, include=("**/*.md", ".github/**")))

    assert sorted(default) == ["a.md"], "hidden files must be skipped by default"
    assert sorted(explicit) == [".github/ci.md", "a.md"], sorted(explicit)


def test_unchanged_file_is_not_read_again(
    tmp_path: Path, forbid_open: Callable[[Path], None]
) -> None:
    path = write(tmp_path, "a.md", "first")
    source = make_source(tmp_path)
    known = known_versions(list_all(source))

    forbid_open(path)
    listings = list_all(source, known)

    assert listings == {"a.md": UnchangedDocument("notes", "a.md")}, listings


def test_changed_file_is_read_again(tmp_path: Path) -> None:
    path = write(tmp_path, "a.md", "first")
    source = make_source(tmp_path)
    known = known_versions(list_all(source))

    path.write_text("second version", encoding="utf-8")
    bump_mtime(path)
    listing = list_all(source, known)["a.md"]

    assert isinstance(listing, SourceDocument), listing
    assert listing.content == b"second version", listing.content
    assert listing.version != known["a.md"], "the validator should have changed"


def test_removed_file_is_not_listed(tmp_path: Path) -> None:
    write(tmp_path, "keep.md", "x")
    gone = write(tmp_path, "gone.md", "x")
    source = make_source(tmp_path)
    known = known_versions(list_all(source))

    gone.unlink()

    assert sorted(list_all(source, known)) == ["keep.md"], (
        "a removed file is not listed"
    )


def test_unreadable_file_is_a_failed_document(
    tmp_path: Path, forbid_open: Callable[[Path], None]
) -> None:
    forbid_open(write(tmp_path, "secret.md", "x"))
    write(tmp_path, "open.md", "x")

    listings = list_all(make_source(tmp_path))

    failed = listings["secret.md"]
    assert isinstance(failed, FailedDocument), failed
    assert "Permission denied" in failed.error, failed.error
    assert isinstance(listings["open.md"], SourceDocument), "other files go on"


def test_dangling_symlink_is_a_failed_document_when_links_are_followed(
    tmp_path: Path,
) -> None:
    (tmp_path / "broken.md").symlink_to(tmp_path / "missing.md")

    listing = list_all(make_source(tmp_path, follow_symlinks=True))["broken.md"]

    assert isinstance(listing, FailedDocument), listing
    assert "missing file" in listing.error, listing.error


def test_symlinks_are_ignored_unless_followed(tmp_path: Path) -> None:
    write(tmp_path, "real/a.md", "x")
    (tmp_path / "link.md").symlink_to(tmp_path / "real" / "a.md")
    (tmp_path / "linked").symlink_to(tmp_path / "real", target_is_directory=True)

    ignored = list_all(make_source(tmp_path))
    followed = list_all(make_source(tmp_path, follow_symlinks=True))

    assert sorted(ignored) == ["real/a.md"], sorted(ignored)
    assert sorted(followed) == ["link.md", "linked/a.md", "real/a.md"], sorted(followed)


def test_symlink_loop_is_listed_once(tmp_path: Path) -> None:
    write(tmp_path, "a/x.md", "x")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)

    listings = list_all(make_source(tmp_path, follow_symlinks=True))

    assert sorted(listings) == ["a/x.md"], sorted(listings)


def test_fifo_is_a_failed_document(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.txt")

    listing = list_all(make_source(tmp_path))["pipe.txt"]

    assert isinstance(listing, FailedDocument), listing
    assert "not a regular file" in listing.error, listing.error


def test_oversized_file_is_failed_without_reading(
    tmp_path: Path, forbid_open: Callable[[Path], None]
) -> None:
    forbid_open(write(tmp_path, "big.md", "x" * 101))

    listing = list_all(make_source(tmp_path, max_document_bytes=100))["big.md"]

    assert isinstance(listing, FailedDocument), listing
    assert "max_document_bytes" in listing.error, listing.error


def test_unsupported_file_type_names_the_supported_ones(tmp_path: Path) -> None:
    write(tmp_path, "report.docx", b"PK")

    listing = list_all(make_source(tmp_path))["report.docx"]

    assert isinstance(listing, FailedDocument), listing
    assert "'.docx'" in listing.error, listing.error
    assert ".md" in listing.error, "the error should list the supported suffixes"


def test_missing_root_folder_raises_source_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(SourceError, match="does not exist") as caught:
        list(make_source(missing).documents({}))

    assert str(missing) in str(caught.value), "the error should name the folder"


def test_root_that_is_a_file_raises_source_error(tmp_path: Path) -> None:
    path = write(tmp_path, "file.md", "x")

    with pytest.raises(SourceError, match="not a folder"):
        list(make_source(path).documents({}))


def test_root_below_a_file_raises_source_error(tmp_path: Path) -> None:
    path = write(tmp_path, "file.md", "x") / "sub"

    with pytest.raises(SourceError, match="does not exist"):
        list(make_source(path).documents({}))


def test_unreadable_root_folder_raises_source_error(
    tmp_path: Path, scandir_fails_for: Callable[[Path], None]
) -> None:
    write(tmp_path, "a.md", "x")
    scandir_fails_for(tmp_path)

    with pytest.raises(SourceError, match="could not list") as caught:
        list(make_source(tmp_path).documents({}))

    assert isinstance(caught.value.__cause__, PermissionError), "cause is chained"


def test_unreadable_subfolder_raises_before_any_document(
    tmp_path: Path, scandir_fails_for: Callable[[Path], None]
) -> None:
    write(tmp_path, "a.md", "x")
    write(tmp_path, "locked/b.md", "x")
    scandir_fails_for(tmp_path / "locked")

    documents = make_source(tmp_path).documents({})

    with pytest.raises(SourceError, match="locked"):
        next(documents)


def test_unreadable_folder_that_cannot_hold_matches_is_not_listed(
    tmp_path: Path, scandir_fails_for: Callable[[Path], None]
) -> None:
    write(tmp_path, "docs/a.md", "x")
    write(tmp_path, "build/b.md", "x")
    write(tmp_path, "other/c.md", "x")
    scandir_fails_for(tmp_path / "build")
    scandir_fails_for(tmp_path / "other")

    source = make_source(tmp_path, include=("docs/**",), exclude=("build/**",))

    assert sorted(list_all(source)) == ["docs/a.md"], "pruned folders are not read"


def test_jsonl_records_become_documents(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path,
        "kb/faq.jsonl",
        [
            {"id": 7, "text": "Seven", "title": "T7", "lang": "en", "tags": ["x"]},
            {"text": "No id"},
            {"id": "b", "text": "Bee", "groups": ["hr", "staff"]},
        ],
    )
    source = make_source(
        tmp_path,
        access_labels=("staff",),
        records={"labels_field": "groups"},
    )

    listings = list_all(source)

    assert sorted(listings) == [
        "kb/faq.jsonl#7",
        "kb/faq.jsonl#b",
        "kb/faq.jsonl#line2",
    ]
    seven = listings["kb/faq.jsonl#7"]
    assert isinstance(seven, SourceDocument), seven
    assert (seven.content, seven.media_type, seven.title) == (
        "Seven",
        "text/plain",
        "T7",
    )
    assert seven.metadata == {"lang": "en"}, "only the other scalar fields are kept"
    assert seven.uri == f"{path.as_uri()}#7", seven.uri
    info = path.stat()
    assert seven.version == f"{info.st_mtime_ns}:{info.st_size}", seven.version
    bee = listings["kb/faq.jsonl#b"]
    assert isinstance(bee, SourceDocument), bee
    assert bee.access_labels == ("staff", "hr"), bee.access_labels


def test_malformed_jsonl_line_fails_and_the_others_go_on(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path,
        "faq.jsonl",
        [{"id": 1, "text": "one"}, "{not json", "", {"id": 3, "body": "no text"}],
    )

    listings = list_all(make_source(tmp_path))

    assert isinstance(listings["faq.jsonl#1"], SourceDocument), listings
    bad_line = listings["faq.jsonl#line2"]
    assert isinstance(bad_line, FailedDocument), bad_line
    assert "Line 2 is not valid JSON" in bad_line.error, bad_line.error
    no_text = listings["faq.jsonl#3"]
    assert isinstance(no_text, FailedDocument), no_text
    assert "text_field" in no_text.error, no_text.error
    assert len(listings) == 3, "the blank line is not a record"


def test_duplicate_record_id_fails_the_later_record(tmp_path: Path) -> None:
    write_jsonl(tmp_path, "faq.jsonl", [{"id": 1, "text": "a"}, {"id": 1, "text": "b"}])

    listings = list(make_source(tmp_path).documents({}))

    assert isinstance(listings[0], SourceDocument), listings
    assert isinstance(listings[1], FailedDocument), listings
    assert "same id" in listings[1].error, listings[1].error


def test_jsonl_line_over_the_limit_fails_alone(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path,
        "faq.jsonl",
        [{"id": 1, "text": "x" * 200}, {"id": 2, "text": "short"}],
    )

    listings = list_all(make_source(tmp_path, max_document_bytes=100))

    assert isinstance(listings["faq.jsonl#line1"], FailedDocument), listings
    assert isinstance(listings["faq.jsonl#2"], SourceDocument), listings


def test_json_file_holds_a_list_or_one_object(tmp_path: Path) -> None:
    write(tmp_path, "list.json", json.dumps([{"text": "a"}, {"id": "k", "text": "b"}]))
    write(tmp_path, "one.json", json.dumps({"text": "alone"}))

    listings = list_all(make_source(tmp_path))

    assert sorted(listings) == ["list.json#item0", "list.json#k", "one.json#item0"]


def test_unchanged_records_file_is_not_read_again(
    tmp_path: Path, forbid_open: Callable[[Path], None]
) -> None:
    path = write_jsonl(tmp_path, "faq.jsonl", [{"id": 1, "text": "a"}, {"text": "b"}])
    source = make_source(tmp_path)
    known = known_versions(list_all(source))

    forbid_open(path)
    listings = list_all(source, known)

    assert listings == {
        "faq.jsonl#1": UnchangedDocument("notes", "faq.jsonl#1"),
        "faq.jsonl#line2": UnchangedDocument("notes", "faq.jsonl#line2"),
    }, listings


def test_changed_records_file_drops_removed_records(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path, "faq.jsonl", [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}]
    )
    source = make_source(tmp_path)
    known = known_versions(list_all(source))

    write_jsonl(tmp_path, "faq.jsonl", [{"id": 2, "text": "b, edited"}])
    bump_mtime(path)
    listings = list_all(source, known)

    assert sorted(listings) == ["faq.jsonl#2"], "record 1 is gone"


def test_unreadable_records_file_fails_every_known_record(
    tmp_path: Path, forbid_open: Callable[[Path], None]
) -> None:
    path = write_jsonl(
        tmp_path, "faq.jsonl", [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}]
    )
    source = make_source(tmp_path)
    known = known_versions(list_all(source))

    bump_mtime(path)
    forbid_open(path)
    listings = list_all(source, known)

    assert sorted(listings) == ["faq.jsonl#1", "faq.jsonl#2"], sorted(listings)
    assert all(isinstance(item, FailedDocument) for item in listings.values()), listings


def test_unreadable_new_records_file_fails_under_its_path(
    tmp_path: Path, forbid_open: Callable[[Path], None]
) -> None:
    write(tmp_path, "broken.json", "[{")
    forbid_open(write_jsonl(tmp_path, "locked.jsonl", [{"text": "a"}]))

    listings = list_all(make_source(tmp_path))

    assert sorted(listings) == ["broken.json", "locked.jsonl"], sorted(listings)
    broken, locked = listings["broken.json"], listings["locked.jsonl"]
    assert isinstance(broken, FailedDocument), broken
    assert "not valid JSON" in broken.error, broken.error
    assert isinstance(locked, FailedDocument), locked
    assert "Permission denied" in locked.error, locked.error
