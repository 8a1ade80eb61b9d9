"""Check the retrieval question set against the Python 3.11 HTML manual.

Every line of ``bench/manual_questions.jsonl`` is a JSON object with a
``question``, the ``page`` that answers it (a path relative to the manual's
HTML directory) and a short ``answer`` quoted from that page. This script
checks that each page exists and that each answer appears in the page's text
(tags stripped, entities decoded, whitespace collapsed, case-insensitive).

It prints one line per failure and exits with status 1 if any check fails.

Usage: python bench/check_questions.py [--manual DIR] [--questions FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_MANUAL = Path("/usr/share/doc/python3.11/html")
DEFAULT_QUESTIONS = Path(__file__).resolve().parent / "manual_questions.jsonl"
REQUIRED_KEYS = ("question", "page", "answer")

_SKIPPED_TAGS = frozenset({"script", "style"})
_WHITESPACE = re.compile(r"\s+")


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML page, leaving out scripts and styles."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._parts: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED_TAGS:
            self._skip_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED_TAGS and self._skip_depth:
            self._skip_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self._parts.append(data)

    def text(self) -> str:
        return "".join(self._parts)


def normalize(text: str) -> str:
    """Collapse runs of whitespace to one space, trim, and lower-case."""
    return _WHITESPACE.sub(" ", text).strip().casefold()


def page_text(path: Path) -> str:
    """Return the normalized visible text of the HTML page at ``path``."""
    extractor = _TextExtractor()
    extractor.feed(path.read_text(encoding="utf-8", errors="replace"))
    extractor.close()
    return normalize(extractor.text())


def check(questions_file: Path, manual: Path) -> tuple[int, list[str]]:
    """Check every question; return how many were read and the failure lines."""
    failures: list[str] = []
    texts: dict[Path, str] = {}
    count = 0
    lines = questions_file.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        count += 1
        where = f"{questions_file.name}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            failures.append(f"{where}: invalid JSON ({exc})")
            continue
        if not isinstance(item, dict):
            failures.append(f"{where}: not a JSON object")
            continue
        missing = [k for k in REQUIRED_KEYS if not isinstance(item.get(k), str)]
        if missing:
            failures.append(f"{where}: missing or non-string {', '.join(missing)}")
            continue
        page = manual / item["page"]
        if not page.is_file():
            failures.append(f"{where}: page not found: {item['page']}")
            continue
        if page not in texts:
            texts[page] = page_text(page)
        if normalize(item["answer"]) not in texts[page]:
            failures.append(
                f"{where}: answer not on {item['page']}: {item['answer']!r}"
            )
    return count, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check the retrieval question set against the Python manual."
    )
    parser.add_argument(
        "--manual",
        type=Path,
        default=DEFAULT_MANUAL,
        help=f"the manual's HTML directory (default: {DEFAULT_MANUAL})",
    )
    parser.add_argument(
        "--questions",
        type=Path,
        default=DEFAULT_QUESTIONS,
        help="the question set (default: bench/manual_questions.jsonl)",
    )
    args = parser.parse_args(argv)
    if not args.manual.is_dir():
        print(f"manual directory not found: {args.manual}")
        return 1
    if not args.questions.is_file():
        print(f"question file not found: {args.questions}")
        return 1
    count, failures = check(args.questions, args.manual)
    for failure in failures:
        print(failure)
    if failures:
        print(f"{len(failures)} of {count} questions failed")
        return 1
    print(f"all {count} questions passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
