"""The web connector against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import ValidationError

from ingestion.connectors.base import connector_for
from ingestion.connectors.web import WebConfig, WebSource
from ingestion.errors import SourceError
from ingestion.models import (
    FailedDocument,
    Listing,
    SourceDocument,
    UnchangedDocument,
)

SLOW_PAGE_HOLD_S = 10
PAGE_DELAY_S = 0.1


class Site:
    """What the test server serves, and what it saw."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.release_slow = threading.Event()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def headers_of(self, path: str) -> list[dict[str, str]]:
        return [headers for seen, headers in self.requests if seen == path]

    def enter(self, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((path, headers))
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1


class SiteServer(ThreadingHTTPServer):
    daemon_threads = False  # so server_close() waits for every handler

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), SiteHandler)
        self.site = Site(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (the slow page) closes its end; that is expected.
        pass


class SiteHandler(BaseHTTPRequestHandler):
    server: SiteServer

    def do_GET(self) -> None:
        site = self.server.site
        site.enter(self.path, {k.lower(): v for k, v in self.headers.items()})
        try:
            self._route(site)
        finally:
            site.leave()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _route(self, site: Site) -> None:
        path = self.path
        if path.startswith("/page/"):
            time.sleep(PAGE_DELAY_S)
            self._send(200, f"<p>{path}</p>".encode(), "text/html")
        elif path in ROUTES:
            ROUTES[path](self, site)
        else:
            self._send(404, b"not found", "text/plain")

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str | None,
        headers: Mapping[str, str] | None = None,
        *,
        declare_length: bool = True,
    ) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if declare_length:
            self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def urlset(site: Site, entries: list[tuple[str, str | None]]) -> bytes:
    items = "".join(
        f"<url><loc>{site.url(path)}</loc>"
        + (f"<lastmod>{lastmod}</lastmod>" if lastmod else "")
        + "</url>"
        for path, lastmod in entries
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
        f"{items}</urlset>"
    ).encode()


def sitemap_index(site: Site, paths: list[str]) -> bytes:
    items = "".join(f"<sitemap><loc>{site.url(path)}</loc></sitemap>" for path in paths)
    return (
        '<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
        f"{items}</sitemapindex>"
    ).encode()


def serve_a(handler: SiteHandler, site: Site) -> None:
    handler._send(
        200,
        b"<p>A</p>",
        "text/html; charset=ISO-8859-1",
        {"Last-Modified": "Wed, 01 May 2024 08:00:00 GMT"},
    )


def serve_etag(handler: SiteHandler, site: Site) -> None:
    if handler.headers.get("If-None-Match") == '"v1"':
        handler._send(304, b"", None, {"ETag": '"v1"'}, declare_length=False)
    else:
        handler._send(200, b"# Tagged", "text/markdown", {"ETag": '"v1"'})


def serve_slow(handler: SiteHandler, site: Site) -> None:
    site.release_slow.wait(SLOW_PAGE_HOLD_S)
    handler._send(200, b"late", "text/plain")


def serve_sitemap(handler: SiteHandler, site: Site) -> None:
    entries = [("/a", "2024-05-01T10:00:00+02:00"), ("/etag", None), ("/missing", None)]
    handler._send(200, urlset(site, entries), "application/xml")


def serve_sitemap_index(handler: SiteHandler, site: Site) -> None:
    body = sitemap_index(site, ["/sitemap-1.xml", "/sitemap-2.xml.gz"])
    handler._send(200, body, "application/xml")


def serve_gzipped_sitemap(handler: SiteHandler, site: Site) -> None:
    body = gzip.compress(urlset(site, [("/page/2", "2024-01-02")]))
    handler._send(200, body, "application/x-gzip")


ROUTES: dict[str, Callable[[SiteHandler, Site], None]] = {
    "/a": serve_a,
    "/etag": serve_etag,
    "/slow": serve_slow,
    "/error": lambda h, s: h._send(500, b"boom", "text/plain"),
    "/gone": lambda h, s: h._send(410, b"gone", "text/plain"),
    "/big": lambda h, s: h._send(200, b"x" * 5000, "text/plain", declare_length=False),
    "/big-declared": lambda h, s: h._send(200, b"x" * 5000, "text/plain"),
    "/moved": lambda h, s: h._send(302, b"", None, {"Location": "/a"}),
    "/sitemap.xml": serve_sitemap,
    "/sitemap-index.xml": serve_sitemap_index,
    "/sitemap-1.xml": lambda h, s: h._send(
        200, urlset(s, [("/page/1", None)]), "application/xml"
    ),
    "/sitemap-2.xml.gz": serve_gzipped_sitemap,
    "/sitemap-broken.xml": lambda h, s: h._send(200, b"<urlset><url>", "text/xml"),
    "/sitemap-error.xml": lambda h, s: h._send(500, b"boom", "text/plain"),
    "/sitemap-index-broken.xml": lambda h, s: h._send(
        200, sitemap_index(s, ["/sitemap-1.xml", "/sitemap-error.xml"]), "text/xml"
    ),
}


@pytest.fixture
def site() -> Iterator[Site]:
    server = SiteServer()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}
    )
    thread.start()
    try:
        yield server.site
    finally:
        server.site.release_slow.set()
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def make_source(**settings: Any) -> WebSource:
    config = WebConfig(name="site", type="web", collection="docs", **settings)
    return WebSource(config)


def list_all(
    source: WebSource, known: Mapping[str, str | None] | None = None
) -> dict[str, Listing]:
    listings = list(source.documents(known or {}))
    keys = [listing.key for listing in listings]
    assert len(keys) == len(set(keys)), f"a key was listed twice: {keys}"
    return {listing.key: listing for listing in listings}


def test_the_web_type_is_registered() -> None:
    config_model, factory = connector_for("web")

    assert (config_model, factory) == (WebConfig, WebSource)


def test_a_source_without_urls_or_sitemap_is_rejected() -> None:
    with pytest.raises(ValidationError, match="needs 'urls', 'sitemap', or both"):
        make_source()


@pytest.mark.parametrize(
    "settings",
    [
        {"urls": ("ftp://example.com/a",)},
        {"sitemap": "file:///etc/passwd"},
        {"urls": ("https://example.com",), "concurrency": 0},
        {"urls": ("https://example.com",), "concurrency": 65},
        {"urls": ("https://example.com",), "verify": False},
    ],
)
def test_invalid_settings_are_rejected(settings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        make_source(**settings)


def test_page_becomes_a_document_with_its_details(site: Site) -> None:
    url = site.url("/a")

    listing = list_all(make_source(urls=(url,), access_labels=("staff",)))[url]

    assert isinstance(listing, SourceDocument), listing
    assert listing.content == b"<p>A</p>", listing.content
    assert listing.media_type == "text/html", "parameters are stripped"
    assert listing.metadata == {"charset": "iso-8859-1"}, listing.metadata
    assert listing.uri == url, listing.uri
    assert listing.access_labels == ("staff",), listing.access_labels
    assert listing.modified_at == datetime(2024, 5, 1, 8, tzinfo=UTC), listing
    assert json.loads(listing.version or "{}") == {
        "last_modified": "Wed, 01 May 2024 08:00:00 GMT"
    }, listing.version


def test_requests_carry_the_user_agent_and_headers(site: Site) -> None:
    source = make_source(
        urls=(site.url("/a"),), user_agent="probe/1", headers={"X-Team": "docs"}
    )

    list_all(source)

    [headers] = site.headers_of("/a")
    assert headers["user-agent"] == "probe/1", headers
    assert headers["x-team"] == "docs", headers


def test_unchanged_page_answers_304_and_is_not_read_again(site: Site) -> None:
    url = site.url("/etag")
    source = make_source(urls=(url,))
    first = list_all(source)[url]
    assert isinstance(first, SourceDocument), first
    assert json.loads(first.version or "{}") == {"etag": '"v1"'}, first.version

    second = list_all(source, {url: first.version})[url]

    assert second == UnchangedDocument("site", url), second
    assert site.headers_of("/etag")[-1]["if-none-match"] == '"v1"', "conditional GET"


def test_stored_last_modified_is_sent_back(site: Site) -> None:
    url = site.url("/a")
    version = json.dumps({"last_modified": "Wed, 01 May 2024 08:00:00 GMT"})

    list_all(make_source(urls=(url,)), {url: version})

    sent = site.headers_of("/a")[-1]
    assert sent["if-modified-since"] == "Wed, 01 May 2024 08:00:00 GMT", sent


def test_pages_answering_404_or_410_are_not_listed(site: Site) -> None:
    urls = (site.url("/missing"), site.url("/gone"), site.url("/a"))

    listings = list_all(make_source(urls=urls))

    assert list(listings) == [site.url("/a")], "gone pages are not yielded"


def test_server_error_is_a_failed_document(site: Site) -> None:
    url = site.url("/error")

    listing = list_all(make_source(urls=(url,)))[url]

    assert isinstance(listing, FailedDocument), listing
    assert "HTTP 500" in listing.error, listing.error


def test_unreachable_page_is_a_failed_document(closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}/a"

    listing = list_all(make_source(urls=(url,), timeout_s=2))[url]

    assert isinstance(listing, FailedDocument), listing
    assert "ConnectError" in listing.error, listing.error


@pytest.mark.timeout(15)
def test_slow_page_times_out_while_the_others_come_back(site: Site) -> None:
    urls = (site.url("/slow"), site.url("/a"), site.url("/etag"))
    started = time.monotonic()

    listings = list_all(make_source(urls=urls, timeout_s=0.3, concurrency=2))

    elapsed = time.monotonic() - started
    slow = listings[site.url("/slow")]
    assert isinstance(slow, FailedDocument), slow
    assert "did not answer within 0.3 s" in slow.error, slow.error
    assert isinstance(listings[site.url("/a")], SourceDocument), listings
    assert isinstance(listings[site.url("/etag")], SourceDocument), listings
    assert elapsed < SLOW_PAGE_HOLD_S / 2, f"the listing took {elapsed:.1f} s"


@pytest.mark.parametrize("path", ["/big", "/big-declared"])
def test_page_over_the_size_limit_is_a_failed_document(site: Site, path: str) -> None:
    url = site.url(path)

    listing = list_all(make_source(urls=(url,), max_document_bytes=1000))[url]

    assert isinstance(listing, FailedDocument), listing
    assert "max_document_bytes" in listing.error, listing.error


def test_redirect_is_followed_and_the_key_stays_the_listed_url(site: Site) -> None:
    url = site.url("/moved")

    listing = list_all(make_source(urls=(url,)))[url]

    assert isinstance(listing, SourceDocument), listing
    assert listing.uri == site.url("/a"), "uri is where the page was served from"


def test_concurrency_limit_is_honoured(site: Site) -> None:
    urls = tuple(site.url(f"/page/{n}") for n in range(12))

    listings = list_all(make_source(urls=urls, concurrency=3))

    assert len(listings) == 12, sorted(listings)
    assert site.max_in_flight <= 3, f"{site.max_in_flight} requests were in flight"
    assert site.max_in_flight > 1, "pages should be fetched in parallel"


def test_sitemap_pages_are_listed_with_their_lastmod(site: Site) -> None:
    listings = list_all(make_source(sitemap=site.url("/sitemap.xml")))

    assert sorted(listings) == [site.url("/a"), site.url("/etag")], sorted(listings)
    page = listings[site.url("/a")]
    assert isinstance(page, SourceDocument), page
    assert page.modified_at == datetime(2024, 5, 1, 8, tzinfo=UTC), page.modified_at


def test_sitemap_and_urls_are_merged_without_duplicates(site: Site) -> None:
    source = make_source(
        urls=(site.url("/a"), site.url("/page/9")), sitemap=site.url("/sitemap.xml")
    )

    listings = list_all(source)

    assert len(site.headers_of("/a")) == 1, "a page listed twice is fetched once"
    assert sorted(listings) == sorted(
        [site.url("/a"), site.url("/etag"), site.url("/page/9")]
    )


def test_sitemap_index_leads_to_every_sitemap(site: Site) -> None:
    listings = list_all(make_source(sitemap=site.url("/sitemap-index.xml")))

    assert sorted(listings) == [site.url("/page/1"), site.url("/page/2")]
    gzipped = listings[site.url("/page/2")]
    assert isinstance(gzipped, SourceDocument), gzipped
    assert gzipped.modified_at == datetime(2024, 1, 2, tzinfo=UTC), gzipped


@pytest.mark.parametrize(
    ("path", "cause"),
    [
        ("/sitemap-error.xml", "HTTP 500"),
        ("/sitemap-broken.xml", "not valid XML"),
        ("/sitemap-index-broken.xml", "HTTP 500"),
        ("/nothing-here.xml", "HTTP 404"),
    ],
)
def test_unreadable_sitemap_raises_source_error(
    site: Site, path: str, cause: str
) -> None:
    with pytest.raises(SourceError, match=cause):
        list(make_source(sitemap=site.url(path)).documents({}))


def test_unreachable_sitemap_raises_source_error(closed_port: int) -> None:
    source = make_source(sitemap=f"http://127.0.0.1:{closed_port}/sitemap.xml")

    with pytest.raises(SourceError, match="could not be read") as caught:
        list(source.documents({}))

    assert caught.value.__cause__ is not None, "the cause is chained"
