"""Cut parsed, Markdown-flavoured text into passages that fit the embedder.

The text is read as a sequence of *sections*, each starting at an ATX heading
line (``#`` to ``######``; a ``#`` line inside a fenced code block is code,
and Setext underlined headings are not recognised). A section's *units* are
its heading line, paragraphs, list blocks, tables and fenced code blocks:
blank-line separated blocks, a code block running from fence to fence. Each
unit is made of *pieces*: the sentences of a paragraph, the sentences of each
list item or table row, the lines of a code block. A piece still longer than
``max_tokens`` is cut between words, and a word longer than ``max_tokens``
(a long run of CJK text, a blob with no spaces) between characters, so no
chunk is over ``max_tokens`` unless the counter counts a single character
as more than ``max_tokens`` tokens.

Packing rules:

* Units are packed greedily into a chunk while its token count stays within
  ``max_tokens``; a unit that does not fit in an empty chunk is packed piece
  by piece. A chunk is not closed right after its section heading when the
  next unit could be packed piece by piece instead.
* Consecutive chunks overlap: a new chunk starts with the last whole pieces
  of the previous one that add up to at most ``overlap_tokens``, taken only
  from the section the new chunk's own text belongs to, and never the
  previous chunk's first piece. When the last piece alone is longer than
  ``overlap_tokens`` there is no overlap.
* Chunks never span two section groups. A group is normally one section. A
  section under a quarter of ``max_tokens`` is *small*: it absorbs the
  following section when that one is its sibling or descendant (not a
  shallower heading) and the two together fit in ``max_tokens``; a small
  section with no text beyond its heading absorbs the next one whatever its
  size. Absorbing repeats while the group is still small, so a run of tiny
  sections becomes one chunk.
* A chunk's ``heading_path`` is the path of the section its first character
  belongs to: a merged chunk carries the path of its first section.

Token counts come from the ``count_tokens`` callable, called once per round
with every string to count. A piece is counted on its own; a run of pieces is
estimated as the sum of its pieces' counts, less the count of the empty
string (a tokenizer's special tokens) for every piece but one. Every chunk is
then counted exactly; when one is over the limit (possible only with a
tokenizer that is not additive across whitespace), its section group is
packed again with a budget lowered by the excess, until every chunk fits.

Every chunk satisfies ``chunk.text == text[chunk.start:chunk.end]``; chunks
are ordered by ``seq`` and by ``start``, and together cover every
non-whitespace character of the text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from .config import ChunkingConfig
from .models import Chunk, ParsedDocument, make_chunk_id

__all__ = ["CHUNKER_VERSION", "Chunker", "TokenCounter", "embedding_text"]

CHUNKER_VERSION = "1"
"""Changes whenever the chunks made from some text change; part of the
pipeline fingerprint, so a new chunker never mixes into an old generation."""

TokenCounter = Callable[[Sequence[str]], list[int]]
"""Counts the tokens of each string of a batch."""

_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})")
_LIST_ITEM = re.compile(r"[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]")
_SENTENCE_END = re.compile(r"[.!?…]+[\"'’”)\]]*\s+(?=[^\sa-z])|[。！？]+[」』”]*\s*")
_WORD = re.compile(r"\S+")

_MIN_SECTION_SHARE = 4
_PREFIX_HEADINGS = 3
_PREFIX_HEADING_CHARS = 60


@dataclass(frozen=True, slots=True)
class _Section:
    level: int  # 0 for the text before the first heading
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Unit:
    start: int
    end: int
    kind: str  # "heading", "code", "list", "table" or "text"
    section: int


@dataclass(frozen=True, slots=True)
class _Piece:
    start: int
    end: int
    unit: int
    section: int
    is_heading: bool
    depth: int = 0  # 0: sentence or line; 1: word; 2 and more: characters


class Chunker:
    """Cuts parsed documents into chunks of at most ``max_tokens`` tokens.

    ``count_tokens`` counts the tokens of a batch of strings, the way the
    embedding model will see them::

        chunker = Chunker(ChunkingConfig(max_tokens=200, overlap_tokens=32),
                          lambda texts: [len(text.split()) for text in texts])
        chunks = chunker.chunk(doc_id, content_hash, parsed)

    The rules are described in the module documentation.
    """

    def __init__(self, config: ChunkingConfig, count_tokens: TokenCounter) -> None:
        self.config = config
        self._count_tokens = count_tokens
        self._empty_tokens: int | None = None

    def chunk(
        self, doc_id: str, content_hash: str, parsed: ParsedDocument
    ) -> list[Chunk]:
        """Cut ``parsed.text`` into chunks.

        Chunks are numbered from 0; their ids derive from ``doc_id``,
        ``content_hash`` and the number. Text with nothing but whitespace has
        no chunks.
        """
        text = parsed.text
        sections, units = _read_structure(text)
        if not units:
            return []

        pieces, tokens = self._counted_pieces(text, units)
        plan = _Plan(self.config, pieces, tokens, self._empty())
        groups = list(plan.groups(sections))
        ranges, counts = self._pack_within_limit(text, pieces, plan, groups)

        return [
            Chunk(
                chunk_id=make_chunk_id(doc_id, content_hash, seq),
                doc_id=doc_id,
                seq=seq,
                text=text[pieces[first].start : pieces[last - 1].end],
                start=pieces[first].start,
                end=pieces[last - 1].end,
                heading_path=sections[pieces[first].section].path,
                token_count=count,
            )
            for seq, ((first, last), count) in enumerate(
                zip(ranges, counts, strict=True)
            )
        ]

    def _empty(self) -> int:
        """Tokens the counter gives every string whatever its text."""
        if self._empty_tokens is None:
            self._empty_tokens = self._count_tokens([""])[0]
        return self._empty_tokens

    def _counted_pieces(
        self, text: str, units: Sequence[_Unit]
    ) -> tuple[list[_Piece], list[int]]:
        """Every piece of every unit with its token count, each within the limit.

        Pieces over ``max_tokens`` are cut finer (words, then characters) and
        the parts counted again, one batch per round.
        """
        limit = self.config.max_tokens
        done: list[tuple[_Piece, int]] = []
        pending = [
            piece
            for index, unit in enumerate(units)
            for piece in _unit_pieces(text, unit, index)
        ]
        while pending:
            counts = self._count_tokens([text[p.start : p.end] for p in pending])
            next_round: list[_Piece] = []
            for piece, count in zip(pending, counts, strict=True):
                if count <= limit or piece.end - piece.start == 1:
                    done.append((piece, count))
                else:
                    next_round.extend(_cut_finer(text, piece))
            pending = next_round
        done.sort(key=lambda item: item[0].start)
        return [piece for piece, _ in done], [count for _, count in done]

    def _pack_within_limit(
        self,
        text: str,
        pieces: Sequence[_Piece],
        plan: _Plan,
        groups: Sequence[tuple[int, int]],
    ) -> tuple[list[tuple[int, int]], list[int]]:
        """Pack every group and count its chunks exactly.

        A group with a chunk over the limit is packed again with a budget
        lowered by the excess, until its chunks fit or the budget reaches
        zero, where every chunk is a single piece, counted within the limit.
        """
        limit = self.config.max_tokens
        budgets = dict.fromkeys(groups, limit)
        packed: dict[tuple[int, int], tuple[list[tuple[int, int]], list[int]]] = {}
        pending = list(groups)
        while pending:
            spans = {group: list(plan.pack(group, budgets[group])) for group in pending}
            texts = [
                text[pieces[first].start : pieces[last - 1].end]
                for group in pending
                for first, last in spans[group]
            ]
            counts = iter(self._count_tokens(texts))
            retry: list[tuple[int, int]] = []
            for group in pending:
                group_counts = [next(counts) for _ in spans[group]]
                excess = max(group_counts) - limit
                if excess > 0 and budgets[group] > 0:
                    budgets[group] -= excess
                    retry.append(group)
                else:
                    packed[group] = (spans[group], group_counts)
            pending = retry
        ranges = [span for group in groups for span in packed[group][0]]
        counts_in_order = [count for group in groups for count in packed[group][1]]
        return ranges, counts_in_order


class _Plan:
    """Groups sections and packs their pieces into chunk ranges.

    A range ``(first, last)`` is the chunk made of ``pieces[first:last]``. A
    run of pieces is estimated at the sum of their counts, less the empty
    string's count for every piece but one (``_tokens``).
    """

    def __init__(
        self,
        config: ChunkingConfig,
        pieces: Sequence[_Piece],
        tokens: Sequence[int],
        empty: int,
    ) -> None:
        self._max = config.max_tokens
        self._overlap = config.overlap_tokens
        self._pieces = pieces
        self._empty = empty
        self._prefix = [0]
        for count in tokens:
            self._prefix.append(self._prefix[-1] + count - empty)

    def _tokens(self, first: int, last: int) -> int:
        return self._empty + self._prefix[last] - self._prefix[first]

    # Section groups.

    def groups(self, sections: Sequence[_Section]) -> Iterator[tuple[int, int]]:
        """Piece ranges of the section groups, small sections merged forward."""
        group: tuple[int, int, int] | None = None  # first section, piece range
        for section, first, last in self._section_spans(len(sections)):
            if group is not None and self._absorbs(sections, group, section, last):
                group = (group[0], group[1], last)
                continue
            if group is not None:
                yield group[1], group[2]
            group = (section, first, last)
        if group is not None:
            yield group[1], group[2]

    def _section_spans(self, count: int) -> list[tuple[int, int, int]]:
        """``(section, first piece, last piece)`` of each section with pieces."""
        bounds: dict[int, list[int]] = {}
        for index, piece in enumerate(self._pieces):
            bounds.setdefault(piece.section, [index, index])[1] = index + 1
        return [(s, bounds[s][0], bounds[s][1]) for s in range(count) if s in bounds]

    def _absorbs(
        self,
        sections: Sequence[_Section],
        group: tuple[int, int, int],
        section: int,
        section_last: int,
    ) -> bool:
        """Whether a small group takes in the section that follows it."""
        head, first, last = group
        if self._tokens(first, last) >= self._max // _MIN_SECTION_SHARE:
            return False
        if sections[section].level < sections[head].level:
            return False
        if self._tokens(first, section_last) <= self._max:
            return True
        return self._heading_only(first, last)

    # Packing.

    def pack(self, group: tuple[int, int], budget: int) -> Iterator[tuple[int, int]]:
        """Chunk ranges covering the pieces of one group, in order, each
        estimated at no more than ``budget`` tokens unless it is one atom."""
        atoms = list(self._atoms(*group, budget))
        atoms.reverse()
        first: int | None = None
        last = group[0]
        while atoms:
            atom_first, atom_last = atoms.pop()
            if first is None:
                first, last = atom_first, atom_last
            elif self._tokens(first, atom_last) <= budget:
                last = atom_last
            elif self._heading_only(first, last) and atom_last - atom_first > 1:
                atoms.extend(
                    reversed([(i, i + 1) for i in range(atom_first, atom_last)])
                )
            else:
                yield first, last
                first = self._overlap_start(first, last, atom_first, atom_last, budget)
                last = atom_last
        if first is not None:
            yield first, last

    def _atoms(self, first: int, last: int, budget: int) -> Iterator[tuple[int, int]]:
        """Whole units that fit in a chunk; the pieces of units that do not."""
        start = first
        while start < last:
            end = start + 1
            unit = self._pieces[start].unit
            while end < last and self._pieces[end].unit == unit:
                end += 1
            if self._tokens(start, end) <= budget:
                yield start, end
            else:
                yield from ((i, i + 1) for i in range(start, end))
            start = end

    def _heading_only(self, first: int, last: int) -> bool:
        return all(self._pieces[i].is_heading for i in range(first, last))

    def _overlap_start(
        self, first: int, last: int, atom_first: int, atom_last: int, budget: int
    ) -> int:
        """Where the chunk after ``pieces[first:last]`` starts, overlap included."""
        section = self._pieces[atom_first].section
        start = atom_first
        while (
            start - 1 > first
            and self._pieces[start - 1].section == section
            and self._prefix[last] - self._prefix[start - 1] <= self._overlap
            and self._tokens(start - 1, atom_last) <= budget
        ):
            start -= 1
        return start


# --- reading the structure -------------------------------------------------------


def _read_structure(text: str) -> tuple[list[_Section], list[_Unit]]:
    """The sections and units of Markdown-flavoured text, in order."""
    reader = _StructureReader()
    for start, line in _lines(text):
        reader.feed(start, line)
    reader.finish()
    return reader.sections, reader.units


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """Each line with its offset, without its newline."""
    start = 0
    for line in text.split("\n"):
        yield start, line
        start += len(line) + 1


class _StructureReader:
    """Splits lines into sections and units, following code fences."""

    def __init__(self) -> None:
        self.sections = [_Section(level=0, path=())]
        self.units: list[_Unit] = []
        self._headings: list[tuple[int, str]] = []
        self._block: tuple[int, int, str] | None = None  # start, end, kind
        self._fence: str | None = None

    def feed(self, start: int, line: str) -> None:
        """Read the line at offset ``start``, without its newline."""
        if self._fence is not None:
            self._feed_code(start, line)
            return
        if not line.strip():
            self._close_block()
            return
        content_start = start + len(line) - len(line.lstrip())
        content_end = start + len(line.rstrip())
        fence = _FENCE.match(line)
        if fence:
            self._close_block()
            self._fence = fence.group(1)
            self._block = (content_start, content_end, "code")
            return
        heading = _HEADING.match(line)
        if heading and heading.group(2):
            self._start_section(len(heading.group(1)), heading.group(2))
            self._add_unit(content_start, content_end, "heading")
            return
        if self._block is None:
            self._block = (content_start, content_end, _block_kind(line))
        else:
            self._extend_block(content_end)
            self._note_table_row(line)

    def finish(self) -> None:
        self._close_block()

    def _feed_code(self, start: int, line: str) -> None:
        """A line inside a fenced block: code, or the closing fence."""
        self._extend_block(start + len(line.rstrip()))
        stripped = line.strip()
        fence = self._fence
        if fence and stripped.startswith(fence) and not stripped.strip(fence[0]):
            self._close_block()
            self._fence = None

    def _start_section(self, level: int, title: str) -> None:
        self._close_block()
        while self._headings and self._headings[-1][0] >= level:
            self._headings.pop()
        self._headings.append((level, title.strip()))
        path = tuple(heading for _, heading in self._headings)
        self.sections.append(_Section(level=level, path=path))

    def _extend_block(self, end: int) -> None:
        if self._block is not None:
            start, _, kind = self._block
            self._block = (start, end, kind)

    def _note_table_row(self, line: str) -> None:
        if self._block is not None and self._block[2] == "table" and "|" not in line:
            self._block = (self._block[0], self._block[1], "text")

    def _close_block(self) -> None:
        if self._block is not None:
            self._add_unit(*self._block)
            self._block = None

    def _add_unit(self, start: int, end: int, kind: str) -> None:
        section = len(self.sections) - 1
        self.units.append(_Unit(start=start, end=end, kind=kind, section=section))


def _block_kind(first_line: str) -> str:
    if _LIST_ITEM.match(first_line):
        return "list"
    if "|" in first_line:
        return "table"
    return "text"


# --- cutting units into pieces ----------------------------------------------------


def _unit_pieces(text: str, unit: _Unit, index: int) -> Iterator[_Piece]:
    """The sentences, rows, items or lines a unit is made of."""
    if unit.kind == "heading":
        spans: Iterator[tuple[int, int]] = iter([(unit.start, unit.end)])
    elif unit.kind == "code":
        spans = _code_line_spans(text, unit)
    elif unit.kind == "table":
        spans = (
            sentence
            for row in _line_spans(text, unit.start, unit.end)
            for sentence in _sentence_spans(text, *row)
        )
    elif unit.kind == "list":
        spans = (
            sentence
            for item in _item_spans(text, unit.start, unit.end)
            for sentence in _sentence_spans(text, *item)
        )
    else:
        spans = _sentence_spans(text, unit.start, unit.end)
    is_heading = unit.kind == "heading"
    for start, end in spans:
        yield _Piece(start, end, index, unit.section, is_heading)


def _line_spans(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    offset = start
    for line in text[start:end].split("\n"):
        span = _stripped(text, offset, offset + len(line))
        if span is not None:
            yield span
        offset += len(line) + 1


def _code_line_spans(text: str, unit: _Unit) -> Iterator[tuple[int, int]]:
    """Code lines, each fence line joined to its neighbour so no chunk is a
    lone fence."""
    lines = list(_line_spans(text, unit.start, unit.end))
    if len(lines) <= 3:
        return iter([(unit.start, unit.end)])
    opening = (lines[0][0], lines[1][1])
    closing = (lines[-2][0], lines[-1][1])
    return iter([opening, *lines[2:-2], closing])


def _item_spans(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """List items: a line with a list marker and its continuation lines."""
    item_start = start
    offset = start
    for line in text[start:end].split("\n"):
        if offset > item_start and _LIST_ITEM.match(line):
            yield item_start, offset - 1
            item_start = offset
        offset += len(line) + 1
    yield item_start, end


def _sentence_spans(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Sentences, cut after end punctuation followed by a non-lowercase word."""
    piece_start = start
    for match in _SENTENCE_END.finditer(text, start, end):
        span = _stripped(text, piece_start, match.end())
        if span is not None:
            yield span
        piece_start = match.end()
    span = _stripped(text, piece_start, end)
    if span is not None:
        yield span


def _stripped(text: str, start: int, end: int) -> tuple[int, int] | None:
    """``(start, end)`` without surrounding whitespace; None if all whitespace."""
    segment = text[start:end]
    stripped = segment.strip()
    if not stripped:
        return None
    lead = len(segment) - len(segment.lstrip())
    return start + lead, start + lead + len(stripped)


def _cut_finer(text: str, piece: _Piece) -> list[_Piece]:
    """A piece over the limit cut into words, or a word into two halves."""
    if piece.depth == 0:
        words = [m.span() for m in _WORD.finditer(text, piece.start, piece.end)]
        if len(words) > 1:
            return [replace(piece, start=a, end=b, depth=1) for a, b in words]
    middle = (piece.start + piece.end) // 2
    return [
        replace(piece, end=middle, depth=piece.depth + 1),
        replace(piece, start=middle, depth=piece.depth + 1),
    ]


# --- the text that is embedded --------------------------------------------------


def embedding_text(chunk: Chunk) -> str:
    """The text to embed for a chunk: its heading path, then its text.

    The prefix is one line, ``"Built-in Functions > abs"``; for deeper paths
    only the outermost heading and the two innermost are kept, each cut to
    60 characters, so the headings help retrieval without crowding the text.
    """
    if not chunk.heading_path:
        return chunk.text
    return f"{_heading_prefix(chunk.heading_path)}\n{chunk.text}"


def _heading_prefix(path: tuple[str, ...]) -> str:
    if len(path) > _PREFIX_HEADINGS:
        path = (path[0], *path[-(_PREFIX_HEADINGS - 1) :])
    return " > ".join(_shortened(heading) for heading in path)


def _shortened(heading: str) -> str:
    if len(heading) <= _PREFIX_HEADING_CHARS:
        return heading
    return heading[: _PREFIX_HEADING_CHARS - 1].rstrip() + "…"
