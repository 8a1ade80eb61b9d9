"""Parsing bytes of every supported format into Markdown-flavoured text."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pypdf import PdfWriter
from pypdf.generic import ContentStream, DictionaryObject, NameObject

from ingestion.errors import DocumentError
from ingestion.models import SourceDocument
from ingestion.parsing import PARSER_VERSION, SUPPORTED_MEDIA_TYPES, parse

PYTHON_MANUAL = Path("/usr/share/doc/python3.11/html")


def _document(
    content: bytes | str,
    media_type: str = "text/html",
    *,
    key: str = "page.html",
    title: str | None = None,
    metadata: dict[str, str] | None = None,
) -> SourceDocument:
    return SourceDocument(
        source="test",
        key=key,
        uri=f"file:///docs/{key}",
        content=content,
        media_type=media_type,
        title=title,
        metadata=metadata or {},
    )


def _manual_page(relative: str) -> bytes:
    path = PYTHON_MANUAL / relative
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: these tests read the Python manual; install it "
            "with `apt-get install python3.11-doc`."
        )
    return path.read_bytes()


def _pdf(pages: list[str], *, title: str | None = None, password: str = "") -> bytes:
    """A PDF with one line of real, extractable Helvetica text per page."""
    writer = PdfWriter()
    for line in pages:
        page = writer.add_blank_page(width=612, height=792)
        font = DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject("/Helvetica"),
            }
        )
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
        escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = ContentStream(None, None)
        stream.set_data(f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1"))
        page.replace_contents(stream)
    if title is not None:
        writer.add_metadata({"/Title": title})
    if password:
        writer.encrypt(user_password=password, algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


# --- HTML -----------------------------------------------------------------------

NAVIGATION_PAGE = """<!DOCTYPE html>
<html><head><title>Install Guide | Example Docs</title>
<style>body { color: red }</style><script>var tracking = 1;</script></head>
<body>
<header><a href="/">Example Docs home</a></header>
<nav><ul><li>Nav entry one</li><li>Nav entry two</li></ul></nav>
<div class="sidebar">Sidebar links</div>
<div id="breadcrumbs">Home / Guides</div>
<div role="search"><input name="q">Search box</div>
<h1>Install Guide</h1>
<p>Download the   installer
and run it.</p>
<h2>Requirements</h2>
<p>You need <b>Python</b> 3.11.</p>
<noscript>Enable JavaScript</noscript>
<aside>Related posts</aside>
<form><label>Newsletter</label></form>
<footer>Copyright Example Corp</footer>
</body></html>"""


def test_html_loses_navigation_scripts_and_footer_and_keeps_headings() -> None:
    parsed = parse(_document(NAVIGATION_PAGE))

    assert parsed.text == (
        "# Install Guide\n\n"
        "Download the installer and run it.\n\n"
        "## Requirements\n\n"
        "You need Python 3.11."
    ), parsed.text
    assert parsed.title == "Install Guide", "the site suffix should be dropped"


def test_html_main_element_is_kept_alone() -> None:
    page = (
        "<body><div>Cookie banner text</div>"
        "<main><h1>Article</h1><header><p>By the author</p></header>"
        "<p>Body text.</p><div class='related-links'>See also elsewhere</div>"
        "<footer>Article footer</footer></main>"
        "<div>Outside text</div></body>"
    )

    parsed = parse(_document(page))

    assert parsed.text == "# Article\n\nBy the author\n\nBody text.", parsed.text


def test_layout_wrapper_named_like_navigation_keeps_its_content() -> None:
    page = (
        "<body><div class='page-with-sidebar'><h1>Title</h1>"
        "<p>The real content of the page, long enough to matter.</p>"
        "<div class='sidebar'>Links</div></div></body>"
    )

    parsed = parse(_document(page))

    assert parsed.text == (
        "# Title\n\nThe real content of the page, long enough to matter."
    ), parsed.text


def test_html_lists_code_tables_and_definitions_become_readable_blocks() -> None:
    page = """<body>
    <p>Steps:</p>
    <ol><li>Unpack</li><li><p>Configure</p><ul><li>edit <code>a.cfg</code></li></ul></li></ol>
    <pre class="language-python">def f():
    # not a heading
    return 1</pre>
    <table><tr><th>Name</th><th>Value</th></tr><tr><td>x</td><td>1</td></tr></table>
    <dl><dt>term</dt><dd>its meaning</dd></dl>
    <p>#hashtag at the start<br>second line</p>
    </body>"""

    parsed = parse(_document(page))

    assert parsed.text == (
        "Steps:\n\n"
        "1. Unpack\n2. Configure\n   - edit a.cfg\n\n"
        "```python\ndef f():\n    # not a heading\n    return 1\n```\n\n"
        "Name | Value\nx | 1\n\n"
        "term\nits meaning\n\n"
        "\\#hashtag at the start\nsecond line"
    ), parsed.text


def test_python_manual_page_parses_to_clean_markdown() -> None:
    parsed = parse(_document(_manual_page("library/functions.html")))
    text = parsed.text

    assert parsed.title == "Built-in Functions"
    assert text.startswith("# Built-in Functions\n\n"), text[:200]
    assert "\n\n## abs\n\nabs(x)\n\nReturn the absolute value of a number." in text
    assert "```python3\ndef all(iterable):\n    for element in iterable:\n" in text
    leftovers = ["¶", "Previous topic", "Report a Bug", "Show Source", "Navigation"]
    found = [leftover for leftover in leftovers if leftover in text]
    assert not found, f"navigation text left in the page: {found}"


def test_python_tutorial_page_keeps_section_structure() -> None:
    parsed = parse(_document(_manual_page("tutorial/datastructures.html")))
    headings = [line for line in parsed.text.split("\n") if line.startswith("#")]

    assert parsed.title == "5. Data Structures"
    assert headings[:3] == [
        "# 5. Data Structures",
        "## 5.1. More on Lists",
        "### list.append",
    ]
    assert "## 5.3. Tuples and Sequences" in headings
    assert ">>> fruits.count('apple')\n2\n" in parsed.text


def test_broken_html_still_yields_its_text() -> None:
    page = (
        b"<html><body><div><p>First <b>bold<p>Second paragraph"
        b"<ul><li>one<li>two</ul></div></span></table><td>stray cell"
        b"<h2>Heading <i>kept</h2> tail &amp; garbage <<< >>> <"
    )

    text = parse(_document(page)).text

    for expected in ("First bold", "Second paragraph", "- one", "- two", "stray cell"):
        assert expected in text, text
    assert "## Heading kept" in text, text
    assert "tail & garbage" in text, text


def test_deeply_nested_html_keeps_its_structure() -> None:
    page = "<div>" * 200 + "<h2>Deep</h2><p>deep text</p>" + "</div>" * 200

    assert parse(_document(page)).text == "## Deep\n\ndeep text"


@pytest.mark.parametrize("depth", [1_000, 5_000])
def test_absurdly_nested_html_still_yields_its_text(depth: int) -> None:
    page = "<div>" * depth + "<h2>Deep</h2><p>deep text</p>" + "</div>" * depth

    assert parse(_document(page)).text == "Deep deep text"


def test_html_without_text_is_rejected() -> None:
    with pytest.raises(DocumentError, match="has no text; nothing to index"):
        parse(_document("<html><script>run()</script><nav>Menu</nav></html>"))


def test_html_title_falls_back_to_first_h1_then_to_the_connector() -> None:
    assert parse(_document("<h1>Only <em>heading</em></h1><p>x</p>")).title == (
        "Only heading"
    )
    assert parse(_document("<p>no title</p>", title="Given")).title == "Given"


# --- decoding -------------------------------------------------------------------


def test_invalid_utf8_error_names_the_byte_offset() -> None:
    content = "naïve ok ".encode() + b"caf\xe9"

    with pytest.raises(DocumentError) as caught:
        parse(_document(content, "text/plain", key="notes.txt"))

    message = str(caught.value)
    assert "not valid UTF-8" in message, message
    assert "offset 13" in message, message
    assert "Save it as UTF-8, or declare its charset" in message, message
    assert isinstance(caught.value.__cause__, UnicodeDecodeError)


def test_latin1_text_with_declared_charset_is_decoded() -> None:
    content = "café crème".encode("latin-1")

    from_metadata = _document(content, "text/plain", metadata={"charset": "latin-1"})
    from_media_type = _document(content, "text/plain; charset=ISO-8859-1")

    assert parse(from_metadata).text == "café crème"
    assert parse(from_media_type).text == "café crème"


def test_latin1_html_with_meta_charset_is_decoded() -> None:
    page = "<html><head><meta charset='iso-8859-1'></head><p>Déjà vu</p>"

    assert parse(_document(page.encode("latin-1"))).text == "Déjà vu"


def test_unknown_declared_charset_is_reported() -> None:
    document = _document(b"caf\xe9", "text/plain", metadata={"charset": "klingon"})

    with pytest.raises(DocumentError, match="charset 'klingon', which Python"):
        parse(document)


def test_byte_order_marks_are_honoured_and_stripped() -> None:
    assert parse(_document(b"\xef\xbb\xbfhello", "text/plain")).text == "hello"
    assert parse(_document("hello".encode("utf-16"), "text/plain")).text == "hello"


def test_binary_content_named_markdown_is_rejected() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" * 20

    with pytest.raises(DocumentError) as caught:
        parse(_document(png, "text/markdown", key="diagram.md"))

    message = str(caught.value)
    assert "diagram.md looks binary, not text" in message, message
    assert "'text/markdown'" in message, message


@pytest.mark.parametrize("content", [b"", b"  \n\t\r\n ", "", "\ufeff \n"])
def test_empty_document_is_rejected(content: bytes | str) -> None:
    with pytest.raises(DocumentError, match="is empty; nothing to index"):
        parse(_document(content, "text/plain", key="empty.txt"))


def test_unknown_media_type_names_the_supported_ones() -> None:
    with pytest.raises(DocumentError) as caught:
        parse(_document(b"{}", "application/json", key="data.json"))

    message = str(caught.value)
    assert "'application/json'" in message, message
    assert all(supported in message for supported in SUPPORTED_MEDIA_TYPES), message


# --- plain text and Markdown ----------------------------------------------------


def test_plain_text_is_kept_with_newlines_normalised() -> None:
    parsed = parse(_document(b"line one\r\nline two\rline three\n", "text/plain"))

    assert parsed.text == "line one\nline two\nline three\n"
    assert parsed.title is None


def test_markdown_front_matter_is_removed_and_gives_the_title() -> None:
    source = "---\ntitle: Release Notes\ntags: [a, b]\n---\n# Heading\r\n\r\nBody.\r\n"

    parsed = parse(_document(source, "text/markdown", key="notes.md"))

    assert parsed.text == "# Heading\n\nBody.\n"
    assert parsed.title == "Release Notes"


def test_markdown_title_is_the_first_heading_without_front_matter() -> None:
    source = "Intro line.\n\n## Not first level\n\n# Main Title #\n"

    assert parse(_document(source, "text/markdown")).title == "Main Title"


def test_markdown_leading_thematic_break_is_not_front_matter() -> None:
    source = "---\n\nSome text.\n\n---\n\nMore text.\n"

    assert parse(_document(source, "text/markdown")).text == source


# --- PDF ------------------------------------------------------------------------


def test_pdf_text_is_extracted_page_by_page() -> None:
    content = _pdf(
        ["Hello from page one.", "Second page (with parentheses)."], title="Doc"
    )

    parsed = parse(_document(content, "application/pdf", key="doc.pdf"))

    assert parsed.text == "Hello from page one.\n\nSecond page (with parentheses)."
    assert parsed.title == "Doc"


def test_pdf_encrypted_without_a_password_for_reading_is_parsed() -> None:
    content = _pdf(["Readable by anyone."], password="")
    writer_with_owner_lock = PdfWriter(clone_from=io.BytesIO(content))
    writer_with_owner_lock.encrypt(
        user_password="", owner_password="owner", algorithm="RC4-128"
    )
    buffer = io.BytesIO()
    writer_with_owner_lock.write(buffer)

    parsed = parse(_document(buffer.getvalue(), "application/pdf", key="open.pdf"))

    assert parsed.text == "Readable by anyone."


def test_pdf_with_a_password_is_rejected() -> None:
    content = _pdf(["Secret text."], password="hunter2")

    with pytest.raises(DocumentError, match="encrypted PDF that needs a password"):
        parse(_document(content, "application/pdf", key="secret.pdf"))


def test_corrupt_pdf_is_rejected_with_the_reason() -> None:
    truncated = _pdf(["Some text."])[:150]

    with pytest.raises(DocumentError, match="is not a readable PDF") as caught:
        parse(_document(truncated, "application/pdf", key="broken.pdf"))

    assert caught.value.__cause__ is not None


def test_pdf_without_text_needs_ocr() -> None:
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    buffer = io.BytesIO()
    writer.write(buffer)

    with pytest.raises(DocumentError, match="scanned image and needs OCR first"):
        parse(_document(buffer.getvalue(), "application/pdf", key="scan.pdf"))


def test_parser_version_is_a_non_empty_string() -> None:
    assert isinstance(PARSER_VERSION, str)
    assert PARSER_VERSION
