"""Golden sets: loading JSONL, skipping bad lines by number, hashing, writing back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.datasets import DatasetError, dataset_hash, load_golden_set, write_golden_set
from eval.models import GoldenItem
from ingestion.errors import NotFound

GOOD = [
    {
        "id": "install",
        "question": "How do I install ragline?",
        "reference": "With pip.",
        "reference_uris": ["handbook/install.md"],
        "reference_chunk_ids": ["c1", "c2"],
        "collection": "docs",
        "metadata": {"topic": "setup"},
    },
    {"question": "What is a generation?", "reference_uri": "handbook/index.md"},
    {"id": "bare", "question": "Who wrote it?"},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_file(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "golden.jsonl", [json.dumps(row) for row in GOOD])


def test_a_good_file_loads_every_field(tmp_path: Path) -> None:
    golden = load_golden_set(good_file(tmp_path))

    assert golden.errors == ()
    assert golden.name == "golden"
    first, second, third = golden.items
    assert first == GoldenItem(
        id="install",
        question="How do I install ragline?",
        reference="With pip.",
        reference_uris=("handbook/install.md",),
        reference_chunk_ids=("c1", "c2"),
        collection="docs",
        metadata={"topic": "setup"},
    )
    assert second.id == "q2", "an item without an id is named after its line"
    assert second.reference_uris == ("handbook/index.md",)
    assert third == GoldenItem(id="bare", question="Who wrote it?")


def test_blank_lines_are_skipped_without_errors(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "g.jsonl", ["", json.dumps(GOOD[2]), "   ", ""])

    golden = load_golden_set(path)

    assert [item.id for item in golden.items] == ["bare"]
    assert golden.errors == ()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"question": "unclosed"', "not valid JSON"),
        ('["a", "list"]', "expected a JSON object"),
        ('{"id": "x"}', "no 'question'"),
        ('{"question": "   "}', "'question' is empty"),
        ('{"question": 42}', "'question' must be a string"),
        ('{"id": 7, "question": "q?"}', "'id' must be a string"),
        ('{"question": "q?", "reference_uris": "a.md"}', "must be a list of strings"),
        ('{"question": "q?", "reference_chunk_ids": [1]}', "must be a list of strings"),
        ('{"question": "q?", "metadata": []}', "'metadata' must be an object"),
        ('{"question": "q?", "refrence": "typo"}', "unknown key(s) 'refrence'"),
        (
            '{"question": "q?", "reference_uri": "a", "reference_uris": ["b"]}',
            "both 'reference_uri' and 'reference_uris'",
        ),
    ],
)
def test_a_bad_line_is_reported_by_number_and_the_rest_load(
    tmp_path: Path, line: str, expected: str
) -> None:
    path = write_lines(
        tmp_path / "g.jsonl",
        [json.dumps(GOOD[0]), line, json.dumps(GOOD[2])],
    )

    golden = load_golden_set(path)

    assert [item.id for item in golden.items] == ["install", "bare"]
    assert len(golden.errors) == 1, golden.errors
    error = golden.errors[0]
    assert error.line == 2
    assert expected in error.message, error.message
    assert str(error).startswith("line 2: ")


def test_a_duplicate_id_names_the_line_that_used_it_first(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "g.jsonl",
        [
            json.dumps({"id": "a", "question": "first?"}),
            json.dumps({"id": "b", "question": "other?"}),
            json.dumps({"id": "a", "question": "again?"}),
        ],
    )

    golden = load_golden_set(path)

    assert [item.question for item in golden.items] == ["first?", "other?"]
    assert [(e.line, e.message) for e in golden.errors] == [
        (3, "the id 'a' is already used on line 1; give each question its own id.")
    ]


def test_an_explicit_id_may_clash_with_a_default_one(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "g.jsonl",
        [
            json.dumps({"question": "unnamed?"}),
            json.dumps({"id": "q1", "question": "x"}),
        ],
    )

    golden = load_golden_set(path)

    assert [item.id for item in golden.items] == ["q1"]
    assert golden.errors[0].line == 2


def test_a_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="No golden set at"):
        load_golden_set(tmp_path / "absent.jsonl")


def test_a_file_that_is_not_utf8_is_a_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_bytes(b'{"question": "caf\xe9?"}\n')

    with pytest.raises(DatasetError, match="not UTF-8"):
        load_golden_set(path)


def test_the_hash_ignores_order_and_formatting(tmp_path: Path) -> None:
    reference = load_golden_set(good_file(tmp_path)).dataset_hash
    reordered = write_lines(
        tmp_path / "reordered.jsonl",
        [
            json.dumps(GOOD[2], indent=None, separators=(",", ":")),
            json.dumps({**GOOD[1], "id": "q2"}),
            json.dumps(dict(reversed(list(GOOD[0].items())))),
        ],
    )

    assert load_golden_set(reordered).dataset_hash == reference
    assert len(reference) == 64
    assert load_golden_set(good_file(tmp_path)).dataset_hash == reference, (
        "the same file must hash the same every time"
    )


def test_the_hash_changes_with_the_content(tmp_path: Path) -> None:
    items = list(load_golden_set(good_file(tmp_path)).items)
    reference = dataset_hash(items)
    changed = GoldenItem(id="bare", question="Who wrote it first?")

    assert dataset_hash([*items[:2], changed]) != reference
    assert dataset_hash(items[:2]) != reference


def test_written_sets_load_back_with_the_same_items_and_hash(tmp_path: Path) -> None:
    golden = load_golden_set(good_file(tmp_path))
    target = tmp_path / "out" / "copy.jsonl"

    written_hash = write_golden_set(golden.items, target)
    again = load_golden_set(target)

    assert again.items == golden.items
    assert again.errors == ()
    assert written_hash == golden.dataset_hash == again.dataset_hash
    assert '"reference_chunk_ids"' not in target.read_text().splitlines()[2], (
        "empty fields are left out of the written file"
    )


def test_writing_duplicate_ids_is_refused(tmp_path: Path) -> None:
    items = [GoldenItem(id="a", question="x?"), GoldenItem(id="a", question="y?")]

    with pytest.raises(DatasetError, match="more than one question"):
        write_golden_set(items, tmp_path / "g.jsonl")
    assert not (tmp_path / "g.jsonl").exists()
