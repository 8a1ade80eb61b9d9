"""The ``ragline`` command end to end, on the demo handbook with the real model."""

from __future__ import annotations

import json

import pytest

from .conftest import Project

pytestmark = pytest.mark.slow


def test_ingest_then_search_finds_the_passage_that_answers(project: Project) -> None:
    project.run("ingest")

    results = project.search(
        "How many minutes before the page escalates to the backup?"
    )

    assert results, "search returned nothing"
    assert set(results[0]) == {"uri", "doc_id", "chunk_id", "score", "text"}, results[0]
    assert any("on-call.md" in r["uri"] for r in results), [r["uri"] for r in results]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True), "results must come best first"


def test_a_second_ingest_of_unchanged_files_changes_nothing(project: Project) -> None:
    project.run("ingest")
    before = project.live_chunk_texts()

    project.run("ingest")
    status = json.loads(project.run("sources", "status", "--json").stdout)["sources"]

    [handbook] = status
    assert handbook["last_status"] == "ok"
    assert handbook["changed"] == 0 and handbook["deleted"] == 0, handbook
    assert handbook["documents"] == handbook["seen"] == 12, handbook
    assert handbook["staleness_s"] is not None
    assert project.live_chunk_texts() == before


def test_a_changed_chunker_requires_a_new_generation(project: Project) -> None:
    project.run("ingest")
    project.configure(max_tokens=120)

    refused = project.run("ingest", check=False)
    assert refused.returncode == 1, refused.stderr
    assert "ragline index build --collection docs" in refused.stderr, refused.stderr

    project.run("index", "build", "--collection", "docs")
    listed = json.loads(project.run("index", "list", "--json").stdout)["generations"]
    assert [g["state"] for g in listed] == ["live", "ready"], listed

    project.run("index", "promote", "--collection", "docs")
    project.run("ingest")  # the new generation now matches the settings
    assert project.search("firmware release train day")
    assert project.run("index", "verify").returncode == 0

    project.run("index", "rollback", "--collection", "docs")
    listed = json.loads(project.run("index", "list", "--json").stdout)["generations"]
    assert [g["state"] for g in listed] == ["live", "rolled_back"], listed


def test_qdrant_local_mode_serves_the_same_commands(project: Project) -> None:
    project.configure(backend="qdrant")
    project.run("ingest")

    results = project.search("What is the per diem abroad?")

    assert any("expenses-travel.html" in r["uri"] for r in results), results
    assert project.run("index", "verify").returncode == 0


def test_bad_settings_exit_2_with_the_key_at_fault(project: Project) -> None:
    project.config.write_text(
        "collections:\n  - name: docs\n    colour: blue\n", encoding="utf-8"
    )

    result = project.run("ingest", check=False)

    assert result.returncode == 2, result.stderr
    assert "collections[0].colour: unknown key" in result.stderr, result.stderr


def test_invalid_yaml_exits_2(project: Project) -> None:
    project.config.write_text("collections: [\n", encoding="utf-8")

    result = project.run("sources", "status", check=False)

    assert result.returncode == 2
    assert "not valid YAML" in result.stderr, result.stderr


def test_bad_documents_are_reported_and_everything_else_is_indexed(
    project: Project,
) -> None:
    bad = project.handbook / "bad"
    bad.mkdir()
    (bad / "image.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 64)
    (bad / "latin1.md").write_bytes(
        "# R\xe9sum\xe9\n\nCaf\xe9 na\xefve.".encode("latin-1")
    )
    (bad / "empty.md").write_bytes(b"")
    (bad / "broken.html").write_text(
        "<html><body><h1>Broken page<p>Unclosed <b>tags and <div>text survive",
        encoding="utf-8",
    )
    with open(bad / "huge.txt", "wb") as handle:  # 50 MB, over the 20 MB default limit
        handle.truncate(50 * 1024 * 1024)

    result = project.run("ingest")

    for name in ("image.md", "latin1.md", "empty.md", "huge.txt"):
        assert f"bad/{name}" in result.stderr, (
            f"{name} should be reported\n{result.stderr}"
        )
    status = json.loads(project.run("sources", "status", "--json").stdout)["sources"][0]
    assert status["documents"] == 13, "the 12 handbook pages and the broken HTML page"
    assert status["failed"] == 4, status
    assert any(
        "broken.html" in r["uri"] for r in project.search("Broken page unclosed tags")
    )


def test_a_missing_source_folder_fails_the_source_and_deletes_nothing(
    project: Project,
) -> None:
    project.run("ingest")
    before = project.live_chunk_texts()
    project.handbook.rename(project.root / "elsewhere")

    result = project.run("ingest", check=False)

    assert result.returncode == 1, result.stderr
    assert "handbook" in result.stderr, result.stderr
    assert project.live_chunk_texts() == before
