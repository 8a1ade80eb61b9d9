"""Turn a document's bytes into clean, Markdown-flavoured text.

:func:`parse` dispatches on the document's media type and returns a
:class:`~ingestion.models.ParsedDocument` whose text follows one contract,
whatever the input format, so the chunker can follow the structure:

* headings are ``#``-prefixed lines (``#`` to ``######``);
* paragraphs, list blocks, tables and code blocks are separated by blank lines;
* list items are ``- `` lines (``1. `` in ordered lists), nested items indented;
* code is fenced with backticks, its whitespace preserved;
* newlines are ``\\n``.

Bytes are decoded as UTF-8 (a byte order mark is honoured and dropped), else
with the charset the document declares: a ``charset`` metadata entry, a
``charset`` media type parameter, or an HTML ``<meta charset>``. Content with
NUL bytes or many control characters in its first 8 KiB is refused as binary.

HTML cleanup rules:

* The main content element is kept alone when there is one: ``<main>``, then
  an element with ``role="main"``, then Sphinx's ``div.body``, then the
  page's only ``<article>``. Otherwise the whole ``<body>`` is used.
* Dropped wherever they are: script, style, noscript, template, svg, nav,
  aside, form and other widgets, ``<footer>``, elements that are ``hidden``
  or ``aria-hidden``, and elements whose role is navigation, banner,
  contentinfo or search. ``<header>`` is dropped only outside the main
  content element, where it is the site banner; inside it, it holds the
  article's title.
* Dropped when their ``class`` or ``id`` names navigation (a word such as
  sidebar, navbar, nav, breadcrumb, menu, toc, footer, related, or Sphinx's
  ``sphinxsidebar`` and ``headerlink``), unless the element holds more than
  half of the content's text, so a layout wrapper is never taken for a menu.
* A Sphinx API entry (a definition list whose term is a signature, such as
  ``abs(x)`` in the Python manual) becomes a heading one level below the
  enclosing one, named after the object (``abs``, ``str.join``), followed
  by the full signature. The entry's description follows it; text after the
  entry therefore reads as part of the last entry, as Markdown has no end of
  section.
* Definition lists become the term on one line and its definition below;
  tables become one line per row, cells separated by ``|``.
* Broken markup is repaired by libxml2. A page nested too deeply to walk
  (hundreds of levels) is indexed as its text without tags, one paragraph
  per line, and a warning is logged.

Plain text is returned as it is, newlines normalised: a plain-text line that
starts with ``#`` is read as a heading by the chunker. In HTML and PDF text,
a line that would read as a heading or a code fence is escaped with ``\\``.

:data:`PARSER_VERSION` changes whenever the output for some input changes; it
is part of the index config fingerprint, so a change re-indexes everything.
"""

from __future__ import annotations

import codecs
import html
import io
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lxml.etree
import lxml.html
import pypdf
import pypdf.errors
import yaml

from .errors import DocumentError
from .models import ParsedDocument, SourceDocument

__all__ = ["PARSER_VERSION", "SUPPORTED_MEDIA_TYPES", "parse"]

logger = logging.getLogger(__name__)

PARSER_VERSION = "1"

SUPPORTED_MEDIA_TYPES: tuple[str, ...] = (
    "application/pdf",
    "text/html",
    "text/markdown",
    "text/plain",
)

_MEDIA_TYPE_ALIASES: dict[str, str] = {
    "application/xhtml+xml": "text/html",
    "text/x-markdown": "text/markdown",
}

_SNIFF_BYTES = 8192
_MAX_CONTROL_SHARE = 0.1
# C0 control characters other than tab, newline, vertical tab, form feed,
# carriage return and escape (ANSI colour codes are text).
_CONTROL_CHARS = "".join(
    chr(code) for code in range(32) if code not in (9, 10, 11, 12, 13, 27)
)
_CONTROL_BYTES = _CONTROL_CHARS.encode("ascii")
_BYTE_ORDER_MARKS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_META_CHARSET = re.compile(
    rb"""<meta[^>]*?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.IGNORECASE
)


def parse(document: SourceDocument) -> ParsedDocument:
    """Parse a document into Markdown-flavoured text and a title.

    The title is the one found in the content (an HTML ``<title>`` or first
    ``<h1>``, Markdown front matter or first ``#`` heading, PDF metadata),
    else the title the connector gave.

    Raises:
        DocumentError: the media type is not supported, the content is
            binary, empty or not decodable, or the PDF cannot be read.
    """
    media_type, params = _split_media_type(document.media_type)
    parser = _PARSERS.get(media_type)
    if parser is None:
        supported = ", ".join(SUPPORTED_MEDIA_TYPES)
        raise DocumentError(
            f"{document.uri} has media type {document.media_type!r}, which "
            f"ragline cannot parse. Supported types: {supported}."
        )

    text, title = parser(document, params)

    if not text.strip():
        raise DocumentError(f"{document.uri} has no text; nothing to index.")
    return ParsedDocument(text=text, title=title or document.title)


def _split_media_type(media_type: str) -> tuple[str, dict[str, str]]:
    """``"text/html; charset=latin-1"`` → ``("text/html", {"charset": ...})``."""
    base, *raw_params = media_type.split(";")
    params: dict[str, str] = {}
    for raw in raw_params:
        name, _, value = raw.partition("=")
        params[name.strip().lower()] = value.strip().strip("\"'")
    base = base.strip().lower()
    return _MEDIA_TYPE_ALIASES.get(base, base), params


# --- decoding -----------------------------------------------------------------


def _decode(document: SourceDocument, params: Mapping[str, str]) -> str:
    """The document's content as text with ``\\n`` newlines, or DocumentError."""
    content = document.content
    if isinstance(content, str):
        text = content.removeprefix("\ufeff")
        _reject_binary_text(document, text[:_SNIFF_BYTES])
    else:
        text = _decode_bytes(document, content, params)

    text = _normalise_newlines(text)

    if not text.strip():
        raise DocumentError(f"{document.uri} is empty; nothing to index.")
    return text


def _decode_bytes(
    document: SourceDocument, content: bytes, params: Mapping[str, str]
) -> str:
    bom_codec = _byte_order_mark_codec(content)
    if bom_codec is not None:
        return _decode_declared(document, content, bom_codec, None)

    _reject_binary_bytes(document, content[:_SNIFF_BYTES])

    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as err:
        utf8_error = err

    charset = _declared_charset(document, content, params)
    if charset is None:
        raise DocumentError(
            f"{document.uri} is not valid UTF-8: the byte at offset "
            f"{utf8_error.start} (0x{content[utf8_error.start]:02x}) cannot be "
            "decoded, and the document declares no charset. Save it as UTF-8, "
            "or declare its charset (a <meta charset> tag in HTML, or a "
            "'charset' entry in the document's metadata)."
        ) from utf8_error
    return _decode_declared(document, content, charset, utf8_error)


def _byte_order_mark_codec(content: bytes) -> str | None:
    for mark, codec in _BYTE_ORDER_MARKS:
        if content.startswith(mark):
            return codec
    return None


def _declared_charset(
    document: SourceDocument, content: bytes, params: Mapping[str, str]
) -> str | None:
    """The charset the metadata, the media type or an HTML meta tag declares."""
    declared = document.metadata.get("charset") or params.get("charset")
    if declared:
        return str(declared)
    match = _META_CHARSET.search(content[:_SNIFF_BYTES])
    return match.group(1).decode("ascii") if match else None


def _decode_declared(
    document: SourceDocument,
    content: bytes,
    charset: str,
    utf8_error: UnicodeDecodeError | None,
) -> str:
    try:
        return content.decode(charset)
    except LookupError as err:
        raise DocumentError(
            f"{document.uri} declares the charset {charset!r}, which Python does "
            "not know. Save the document as UTF-8, or declare a standard charset "
            "name such as 'latin-1' or 'cp1252'."
        ) from err
    except UnicodeDecodeError as err:
        not_utf8 = (
            f"is not valid UTF-8 (bad byte at offset {utf8_error.start}) nor "
            if utf8_error is not None
            else "is not "
        )
        raise DocumentError(
            f"{document.uri} {not_utf8}valid {charset} as it declares (bad byte "
            f"at offset {err.start}). Save it as UTF-8, or correct its declared "
            "charset."
        ) from err


def _reject_binary_bytes(document: SourceDocument, sample: bytes) -> None:
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    if b"\0" in sample or controls > _MAX_CONTROL_SHARE * len(sample):
        _raise_binary(document)


def _reject_binary_text(document: SourceDocument, sample: str) -> None:
    controls = sum(sample.count(char) for char in _CONTROL_CHARS)
    if "\0" in sample or controls > _MAX_CONTROL_SHARE * len(sample):
        _raise_binary(document)


def _raise_binary(document: SourceDocument) -> None:
    raise DocumentError(
        f"{document.uri} looks binary, not text, despite its name and media type "
        f"{document.media_type!r}. Exclude it from the source, or give it the "
        "extension of its real format."
    )


def _normalise_newlines(text: str) -> str:
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --- plain text and Markdown ----------------------------------------------------


def _parse_plain(
    document: SourceDocument, params: Mapping[str, str]
) -> tuple[str, str | None]:
    return _decode(document, params), None


_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?\n)?(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.S)
_ATX_TITLE = re.compile(r"^ {0,3}# +(.+?)[ \t#]*$", re.M)


def _parse_markdown(
    document: SourceDocument, params: Mapping[str, str]
) -> tuple[str, str | None]:
    text, fields = _split_front_matter(_decode(document, params))

    title = _front_matter_title(fields)
    if title is None:
        heading = _ATX_TITLE.search(text)
        title = heading.group(1) if heading else None
    return text, title


def _split_front_matter(text: str) -> tuple[str, dict[Any, Any]]:
    """The text without its YAML front matter, and the front matter's fields.

    A leading ``---`` block that is not a YAML mapping is a thematic break
    followed by text, and is left in place.
    """
    match = _FRONT_MATTER.match(text)
    if match is None:
        return text, {}
    try:
        fields = yaml.safe_load(match.group(1) or "")
    except yaml.YAMLError:
        return text, {}
    if fields is None:
        fields = {}
    if not isinstance(fields, dict):
        return text, {}
    return text[match.end() :], fields


def _front_matter_title(fields: Mapping[Any, Any]) -> str | None:
    title = fields.get("title")
    if title is None:
        return None
    return str(title).strip() or None


# --- PDF ----------------------------------------------------------------------

# pypdf reports malformed files with its own errors, but also with whatever a
# broken object graph makes Python raise.
_PDF_FAILURES = (
    pypdf.errors.PyPdfError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    AssertionError,
    RecursionError,
    OSError,
)


def _parse_pdf(
    document: SourceDocument, _params: Mapping[str, str]
) -> tuple[str, str | None]:
    if isinstance(document.content, str):
        raise DocumentError(
            f"{document.uri} is a PDF given as text; a connector must pass PDF "
            "content as bytes."
        )
    if not document.content.strip():
        raise DocumentError(f"{document.uri} is empty; nothing to index.")

    try:
        reader = pypdf.PdfReader(io.BytesIO(document.content))
        _unlock(document, reader)
        pages = [_page_text(page) for page in reader.pages]
        title = _pdf_title(reader)
    except DocumentError:
        raise
    except _PDF_FAILURES as err:
        raise DocumentError(
            f"{document.uri} is not a readable PDF ({type(err).__name__}: {err}). "
            "Check that the file is complete; re-export or repair it."
        ) from err

    text = "\n\n".join(page for page in pages if page)
    if not text:
        raise DocumentError(
            f"{document.uri} is a PDF with no extractable text; it may be a "
            "scanned image and needs OCR first."
        )
    return text, title


def _unlock(document: SourceDocument, reader: pypdf.PdfReader) -> None:
    """Open a PDF encrypted with an empty user password, or DocumentError."""
    if not reader.is_encrypted:
        return
    try:
        unlocked = reader.decrypt("")
    except pypdf.errors.DependencyError as err:
        raise DocumentError(
            f"{document.uri} is an encrypted PDF whose cipher needs the "
            "'cryptography' package; install it, or save the PDF unencrypted."
        ) from err
    if unlocked == pypdf.PasswordType.NOT_DECRYPTED:
        raise DocumentError(
            f"{document.uri} is an encrypted PDF that needs a password; save "
            "it without encryption to index it."
        )


def _page_text(page: pypdf.PageObject) -> str:
    text = _normalise_newlines(page.extract_text()).strip()
    return _escape_block_starts(text)


def _pdf_title(reader: pypdf.PdfReader) -> str | None:
    metadata = reader.metadata
    title = metadata.title if metadata is not None else None
    if not title:
        return None
    return str(title).strip() or None


# --- HTML ---------------------------------------------------------------------

_HTML_PARSER_OPTIONS: dict[str, Any] = {
    "encoding": "utf-8",
    "remove_comments": True,
    "remove_pis": True,
    "no_network": True,
    "huge_tree": True,  # else libxml2 gives up on pages nested 255 deep
}

_DROPPED_TAGS = frozenset(
    [
        "aside",
        "button",
        "canvas",
        "dialog",
        "embed",
        "footer",
        "form",
        "head",
        "iframe",
        "input",
        "link",
        "map",
        "meta",
        "nav",
        "noscript",
        "object",
        "script",
        "select",
        "style",
        "svg",
        "template",
        "textarea",
        "title",
    ]
)
_DROPPED_ROLES = frozenset({"banner", "contentinfo", "navigation", "search"})
_NAVIGATION_WORDS = frozenset(
    [
        "breadcrumb",
        "breadcrumbs",
        "footer",
        "headerlink",
        "menu",
        "nav",
        "navbar",
        "navigation",
        "pagination",
        "related",
        "sidebar",
        "sphinxsidebar",
        "toc",
        "viewcode",
    ]
)
_NAME_WORD = re.compile(r"[a-z0-9]+")
_BLOCK_TAGS = frozenset(
    [
        "address",
        "article",
        "blockquote",
        "body",
        "caption",
        "center",
        "dd",
        "details",
        "div",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "header",
        "hgroup",
        "html",
        "li",
        "main",
        "p",
        "section",
        "summary",
        "td",
        "th",
        "tr",
    ]
)
_NON_CONTENT = re.compile(
    r"<(script|style|template|noscript|svg)\b.*?</\1\s*>", re.S | re.I
)
_MARKUP = re.compile(r"<[^>]*>")
_HAS_CLASS = "contains(concat(' ', normalize-space(@class), ' '), ' {} ')"
_HEADING_LEVELS = {f"h{level}": level for level in range(1, 7)}
_TITLE_SEPARATORS = (" — ", " – ", " | ", " - ", " · ", " :: ")
_CODE_LANGUAGE = re.compile(r"(?:language|lang|highlight)-([\w+#.-]+)")
_UNNAMED_LANGUAGES = frozenset({"default", "none", "text"})
_MAX_SIGNATURE_HEADING = 80


def _parse_html(
    document: SourceDocument, params: Mapping[str, str]
) -> tuple[str, str | None]:
    source = _decode(document, params)
    root = _html_tree(source)
    if root is None:
        text = _text_without_markup(source)
        if text:
            _log_flattened(document)
        return text, None

    content, is_main = _main_content(root)
    renderer = _HtmlRenderer(content, inside_main=is_main)
    try:
        text = renderer.render()
    except RecursionError:
        _log_flattened(document)
        text = _text_without_markup(source)

    title = _clean_title(_html_title(root), _first_h1(root, renderer))
    return text, title


def _html_tree(source: str) -> lxml.html.HtmlElement | None:
    """The parsed page; None when libxml2 could not build all of it.

    libxml2 recovers from any broken markup, but gives up on input it finds
    too deep or too large, silently dropping the rest of the page.
    """
    parser = lxml.html.HTMLParser(**_HTML_PARSER_OPTIONS)
    try:
        root = lxml.html.document_fromstring(
            source.encode("utf-8", "replace"), parser=parser
        )
    except (lxml.etree.ParserError, lxml.etree.XMLSyntaxError):
        return None
    if any(error.level_name == "FATAL" for error in parser.error_log):
        return None
    return root if isinstance(root, lxml.html.HtmlElement) else None


def _log_flattened(document: SourceDocument) -> None:
    logger.warning(
        "%(uri)s is HTML too deeply nested or too broken to follow its "
        "structure; it is indexed as plain paragraphs",
        {"uri": document.uri},
    )


def _text_without_markup(source: str) -> str:
    """The text of HTML that could not be parsed: tags removed, one paragraph
    per line of text, scripts and styles dropped."""
    text = html.unescape(_MARKUP.sub(" ", _NON_CONTENT.sub(" ", source)))
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return _escape_block_starts("\n\n".join(line for line in lines if line))


def _main_content(
    root: lxml.html.HtmlElement,
) -> tuple[lxml.html.HtmlElement, bool]:
    """The element holding the page's content and True, else the body and False."""
    candidates: list[Any] = [
        *root.iter("main"),
        *root.xpath("//*[@role='main']"),
        *root.xpath(f"//div[{_HAS_CLASS.format('body')}]"),
    ]
    articles = list(root.iter("article"))
    if len(articles) == 1:
        candidates.append(articles[0])
    for candidate in candidates:
        if _has_text(candidate):
            return candidate, True
    body = root.find("body")
    return (body if body is not None else root), False


def _first_h1(root: lxml.html.HtmlElement, renderer: _HtmlRenderer) -> str | None:
    """The first h1 of the content, else of the page (it may precede <main>)."""
    if renderer.first_h1 is not None:
        return renderer.first_h1
    h1 = root.find(".//h1")
    return renderer.inline_text(h1) or None if h1 is not None else None


def _has_text(element: lxml.html.HtmlElement) -> bool:
    return any(piece.strip() for piece in element.itertext())


def _html_title(root: lxml.html.HtmlElement) -> str | None:
    element = root.find(".//title")
    if element is None:
        return None
    return " ".join(element.text_content().split()) or None


def _clean_title(title: str | None, first_h1: str | None) -> str | None:
    """The page title without a site suffix the first h1 makes obvious."""
    if title is None:
        return first_h1
    if first_h1 and title.startswith(first_h1):
        rest = title[len(first_h1) :]
        if any(rest.startswith(separator) for separator in _TITLE_SEPARATORS):
            return first_h1
    return title


class _HtmlRenderer:
    """Walks an HTML content element and writes Markdown-flavoured blocks.

    Inline text accumulates in a paragraph buffer that is flushed into a
    block whenever a block element starts or ends; blocks are joined with
    blank lines at the end, so nothing is built by repeated concatenation.
    """

    def __init__(self, content: lxml.html.HtmlElement, *, inside_main: bool) -> None:
        self._content = content
        self._inside_main = inside_main
        self._blocks: list[str] = []
        self._inline: list[str] = []
        self._section_level = 0
        self._content_chars: int | None = None
        self._navigation_names: dict[str, bool] = {}
        self.first_h1: str | None = None
        self._handlers: dict[str, Callable[[lxml.html.HtmlElement], None]] = {
            **dict.fromkeys(_HEADING_LEVELS, self._heading),
            "pre": self._code_block,
            "ul": self._list,
            "ol": self._list,
            "dl": self._definition_list,
            "table": self._table,
            "br": self._line_break,
            "hr": self._break_paragraph,
            "img": self._skip,
        }

    def render(self) -> str:
        self._walk(self._content)
        self._flush()
        return "\n\n".join(self._blocks)

    # The walk.

    def _walk(self, element: lxml.html.HtmlElement) -> None:
        if element.text:
            self._add_text(element.text)
        for child in element:
            self._visit(child)
            if child.tail:
                self._add_text(child.tail)

    def _visit(self, element: lxml.html.HtmlElement) -> None:
        tag = element.tag
        if not isinstance(tag, str) or self._is_dropped(element):
            return
        handler = self._handlers.get(tag)
        if handler is not None:
            handler(element)
        elif tag in _BLOCK_TAGS:
            self._flush()
            self._walk(element)
            self._flush()
        else:
            self._walk(element)

    def _sub_blocks(self, element: lxml.html.HtmlElement) -> list[str]:
        """Render an element's content on its own, returning its blocks."""
        saved = self._blocks, self._inline
        self._blocks, self._inline = [], []
        self._walk(element)
        self._flush()
        blocks = self._blocks
        self._blocks, self._inline = saved
        return blocks

    def inline_text(self, element: lxml.html.HtmlElement) -> str:
        """The element's text on one line."""
        return " ".join(" ".join(self._sub_blocks(element)).split())

    # Text buffering.

    def _add_text(self, text: str) -> None:
        self._inline.append(text.replace("\n", " "))

    def _line_break(self, _element: lxml.html.HtmlElement) -> None:
        self._inline.append("\n")

    def _break_paragraph(self, _element: lxml.html.HtmlElement) -> None:
        self._flush()

    def _skip(self, _element: lxml.html.HtmlElement) -> None:
        return

    def _flush(self) -> None:
        if not self._inline:
            return
        raw = "".join(self._inline)
        self._inline.clear()
        lines = (" ".join(line.split()) for line in raw.split("\n"))
        paragraph = "\n".join(line for line in lines if line)
        if paragraph:
            self._blocks.append(_escape_block_starts(paragraph))

    # What to leave out.

    def _is_dropped(self, element: lxml.html.HtmlElement) -> bool:
        tag = element.tag
        if tag in _DROPPED_TAGS or (tag == "header" and not self._inside_main):
            return True
        attributes = element.attrib
        if "hidden" in attributes or attributes.get("aria-hidden") == "true":
            return True
        if attributes.get("role", "").strip().lower() in _DROPPED_ROLES:
            return True
        names = f"{attributes.get('class', '')} {attributes.get('id', '')}"
        return self._names_navigation(names) and not self._holds_most_text(element)

    def _names_navigation(self, names: str) -> bool:
        known = self._navigation_names.get(names)
        if known is None:
            words = set(_NAME_WORD.findall(names.lower()))
            words.update(token.lower() for token in names.split())
            known = not words.isdisjoint(_NAVIGATION_WORDS)
            self._navigation_names[names] = known
        return known

    def _holds_most_text(self, element: lxml.html.HtmlElement) -> bool:
        if self._content_chars is None:
            self._content_chars = _text_length(self._content)
        return 2 * _text_length(element) > self._content_chars

    # Block elements.

    def _heading(self, element: lxml.html.HtmlElement) -> None:
        text = self.inline_text(element)
        if not text:
            return
        self._flush()
        level = _HEADING_LEVELS[element.tag]
        self._section_level = level
        self._blocks.append(f"{'#' * level} {text}")
        if level == 1 and self.first_h1 is None:
            self.first_h1 = text

    def _code_block(self, element: lxml.html.HtmlElement) -> None:
        code = "".join(element.itertext()).strip("\n").rstrip()
        if not code.strip():
            return
        self._flush()
        fence = "`" * max(3, _longest_backtick_run(code) + 1)
        language = _code_language(element)
        self._blocks.append(f"{fence}{language}\n{code}\n{fence}")

    def _list(self, element: lxml.html.HtmlElement) -> None:
        self._flush()
        ordered = element.tag == "ol"
        number = _list_start(element)
        items: list[str] = []
        for child in element:
            if not isinstance(child.tag, str) or self._is_dropped(child):
                continue
            blocks = self._sub_blocks(child)
            if not blocks:
                continue
            marker = f"{number}." if ordered and child.tag == "li" else "-"
            items.append(_list_item(marker, blocks))
            number += 1
        if items:
            self._blocks.append("\n".join(items))

    def _definition_list(self, element: lxml.html.HtmlElement) -> None:
        self._flush()
        terms = [child for child in element if child.tag == "dt"]
        if terms and _is_signature(terms[0]):
            self._api_entry(element, terms[0])
            return
        term: str | None = None
        for child in element:
            if not isinstance(child.tag, str) or self._is_dropped(child):
                continue
            if child.tag == "dt":
                if term is not None:
                    self._blocks.append(term)
                term = self.inline_text(child) or None
                continue
            blocks = self._sub_blocks(child)
            if term is not None and blocks:
                blocks[0] = f"{term}\n{blocks[0]}"
            elif term is not None:
                blocks = [term]
            self._blocks.extend(blocks)
            term = None
        if term is not None:
            self._blocks.append(term)

    def _api_entry(
        self, element: lxml.html.HtmlElement, signature: lxml.html.HtmlElement
    ) -> None:
        """A Sphinx object description: a heading, its signature, its text."""
        enclosing_level = self._section_level
        level = min(enclosing_level + 1, 6)
        name = _signature_name(signature) or self.inline_text(signature)
        if name:
            self._blocks.append(f"{'#' * level} {name[:_MAX_SIGNATURE_HEADING]}")
            self._section_level = level
        for child in element:
            if not isinstance(child.tag, str) or self._is_dropped(child):
                continue
            self._flush()
            self._walk(child)
            self._flush()
        self._section_level = enclosing_level

    def _table(self, element: lxml.html.HtmlElement) -> None:
        self._flush()
        lines: list[str] = []
        caption = element.find("caption")
        if caption is not None:
            lines.extend(self._sub_blocks(caption))
        for row in _own_rows(element):
            cells = [
                " ".join(self._sub_blocks(cell))
                for cell in row
                if cell.tag in ("td", "th") and not self._is_dropped(cell)
            ]
            if any(cells):
                lines.append(" | ".join(cells))
        if lines:
            self._blocks.append("\n".join(lines))


def _text_length(element: lxml.html.HtmlElement) -> int:
    return sum(len(piece.strip()) for piece in element.itertext())


def _is_signature(term: lxml.html.HtmlElement) -> bool:
    return "sig-object" in term.get("class", "").split()


def _signature_name(term: lxml.html.HtmlElement) -> str:
    """``str.join`` for a Sphinx signature ``str.join(iterable)``."""
    parts = term.xpath(
        f".//*[{_HAS_CLASS.format('sig-prename')} or {_HAS_CLASS.format('sig-name')}]"
    )
    return "".join("".join(part.itertext()) for part in parts).strip()


def _list_start(element: lxml.html.HtmlElement) -> int:
    try:
        return int(element.get("start", "1"))
    except ValueError:
        return 1


def _list_item(marker: str, blocks: list[str]) -> str:
    """``- first line`` with every further line indented under the marker."""
    indent = "\n" + " " * (len(marker) + 1)
    body = "\n".join(blocks).replace("\n", indent)
    return f"{marker} {body}"


def _own_rows(table: lxml.html.HtmlElement) -> Iterator[lxml.html.HtmlElement]:
    """The rows of this table, not of the tables nested in its cells."""
    for row in table.iter("tr"):
        owner = next(row.iterancestors("table"), None)
        if owner is table:
            yield row


def _longest_backtick_run(code: str) -> int:
    runs = re.findall(r"`+", code)
    return max(map(len, runs), default=0)


def _code_language(element: lxml.html.HtmlElement) -> str:
    """The language a ``language-x`` or Sphinx ``highlight-x`` class names."""
    parent = element.getparent()
    holders = [element, *element.iter("code")]
    if parent is not None:
        holders.extend([parent, *parent.iterancestors()][:2])
    for holder in holders:
        match = _CODE_LANGUAGE.search(holder.get("class", ""))
        if match:
            language = match.group(1)
            return "" if language in _UNNAMED_LANGUAGES else language
    return ""


_BLOCK_START = re.compile(r"^( {0,3})(#|```|~~~)", re.M)


def _escape_block_starts(text: str) -> str:
    """Escape line starts that Markdown would read as a heading or a fence."""
    return _BLOCK_START.sub(r"\1\\\2", text)


_Parser = Callable[[SourceDocument, Mapping[str, str]], tuple[str, str | None]]

_PARSERS: dict[str, _Parser] = {
    "application/pdf": _parse_pdf,
    "text/html": _parse_html,
    "text/markdown": _parse_markdown,
    "text/plain": _parse_plain,
}
