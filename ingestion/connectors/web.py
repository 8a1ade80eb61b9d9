"""The ``web`` connector: pages listed in the settings or in a sitemap.

The rules the sync engine relies on:

* A page's key is the URL it is listed under; its ``uri`` is the URL it was
  finally served from, after redirects.
* The sitemap (and every sitemap an index points to) is read before any page
  is fetched; if one of them cannot be read or parsed, ``SourceError`` is
  raised and nothing is deleted.
* A page's validator is a compact JSON object holding the ``ETag`` and
  ``Last-Modified`` headers it was served with. The next fetch sends them as
  ``If-None-Match`` and ``If-Modified-Since``; a 304 answer is an unchanged
  document.
* A 404 or 410 answer means the page is gone: it is not yielded. Any other
  error status, a timeout or a connection error is a failed document.
* Pages are fetched by ``concurrency`` worker threads sharing one HTTP client,
  so no more than ``concurrency`` requests are in flight. Pages are yielded
  in the order their fetches complete.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from itertools import islice
from typing import Any, TypeVar

import httpx
from lxml import etree
from pydantic import Field, field_validator, model_validator

from ..config import SourceConfig
from ..errors import DocumentTooLarge, SourceError
from ..models import FailedDocument, Listing, SourceDocument, UnchangedDocument
from .base import register_connector

__all__ = ["WebConfig", "WebSource"]

logger = logging.getLogger(__name__)

_SITEMAP_MAX_BYTES = 50 * 1024 * 1024  # the limit the sitemaps protocol sets
_MAX_SITEMAPS = 1000
_GONE = frozenset({404, 410})
_DEFAULT_MEDIA_TYPE = "application/octet-stream"

_T = TypeVar("_T")
_R = TypeVar("_R")


class WebConfig(SourceConfig):
    """Settings of a ``type: web`` source. Set ``urls``, ``sitemap``, or both."""

    urls: tuple[str, ...] = Field(default=(), description="Pages to index.")
    sitemap: str | None = Field(
        default=None,
        description="URL of a sitemap.xml (or a sitemap index) listing pages to "
        "index; <lastmod> becomes the page's modification time.",
    )
    concurrency: int = Field(
        default=4, ge=1, le=64, description="Most requests in flight at once."
    )
    timeout_s: float = Field(
        default=15,
        gt=0,
        description="Seconds to wait for a connection and for each read of an answer.",
    )
    user_agent: str = Field(default="ragline/0.1", description="User-Agent header.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra request headers, such as Authorization; they are "
        "never logged and override user_agent.",
    )

    @field_validator("urls")
    @classmethod
    def _urls_are_http(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            _check_http_url(url)
        return urls

    @field_validator("sitemap")
    @classmethod
    def _sitemap_is_http(cls, sitemap: str | None) -> str | None:
        if sitemap is not None:
            _check_http_url(sitemap)
        return sitemap

    @model_validator(mode="after")
    def _has_pages(self) -> WebConfig:
        if not self.urls and self.sitemap is None:
            raise ValueError(
                "A web source needs 'urls', 'sitemap', or both; neither is set."
            )
        return self


@dataclass(frozen=True, slots=True)
class _Page:
    url: str
    lastmod: datetime | None = None


@register_connector("web", WebConfig)
class WebSource:
    """Fetches web pages with conditional GETs, a few at a time.

    Example::

        source = WebSource(WebConfig(
            name="site", type="web", collection="docs",
            sitemap="https://example.com/sitemap.xml",
        ))
        for listing in source.documents(known={}):
            ...
    """

    def __init__(self, config: WebConfig) -> None:
        self.config = config

    def documents(self, known: Mapping[str, str | None]) -> Iterator[Listing]:
        """Yield a listing for every page that is not gone.

        Raises ``SourceError`` before fetching any page if the sitemap cannot
        be read.
        """
        with self._client() as client:
            pages = self._pages(client)
            logger.info(
                "Listing source %(source)s: fetching %(pages)d pages",
                {"source": self.config.name, "pages": len(pages)},
            )

            fetch = partial(self._fetch, client, known)
            with ThreadPoolExecutor(
                max_workers=self.config.concurrency, thread_name_prefix="ragline-web"
            ) as pool:
                window = 2 * self.config.concurrency
                for listing in _completed(pool, fetch, pages, window):
                    if listing is not None:
                        yield listing

    def _client(self) -> httpx.Client:
        concurrency = self.config.concurrency
        return httpx.Client(
            headers={"User-Agent": self.config.user_agent, **self.config.headers},
            timeout=httpx.Timeout(self.config.timeout_s),
            follow_redirects=True,
            limits=httpx.Limits(
                max_connections=concurrency, max_keepalive_connections=concurrency
            ),
        )

    def _pages(self, client: httpx.Client) -> list[_Page]:
        """The configured URLs, then the sitemap's, each listed once."""
        pages = [_Page(url) for url in self.config.urls]
        if self.config.sitemap is not None:
            pages += self._sitemap_pages(client, self.config.sitemap)

        unique: dict[str, _Page] = {}
        for page in pages:
            unique.setdefault(page.url, page)
        return list(unique.values())

    def _sitemap_pages(self, client: httpx.Client, url: str) -> list[_Page]:
        pending = [url]
        seen: set[str] = set()
        pages: list[_Page] = []

        while pending:
            sitemap_url = pending.pop(0)
            if sitemap_url in seen:
                continue
            seen.add(sitemap_url)
            if len(seen) > _MAX_SITEMAPS:
                raise self._sitemap_error(
                    sitemap_url, f"more than {_MAX_SITEMAPS} sitemaps are linked"
                )

            root = self._read_sitemap(client, sitemap_url)
            kind = etree.QName(root).localname
            if kind == "sitemapindex":
                pending += [loc for loc, _ in _entries(root, "sitemap")]
            elif kind == "urlset":
                pages += [_Page(loc, _parse_lastmod(m)) for loc, m in _entries(root)]
            else:
                raise self._sitemap_error(
                    sitemap_url, f"its root element is <{kind}>, not <urlset>"
                )
        return pages

    def _read_sitemap(self, client: httpx.Client, url: str) -> Any:
        try:
            with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise self._sitemap_error(
                        url, f"it answered HTTP {response.status_code}"
                    )
                body = _read_limited(response, _SITEMAP_MAX_BYTES)
        except (httpx.HTTPError, DocumentTooLarge) as err:
            raise self._sitemap_error(url, str(err) or type(err).__name__) from err

        logger.info(
            "Read sitemap %(url)s of source %(source)s",
            {"url": url, "source": self.config.name},
        )
        try:
            xml = _gunzip(body)
        except (zlib.error, DocumentTooLarge) as err:
            raise self._sitemap_error(url, f"it could not be unzipped ({err})") from err
        try:
            return etree.fromstring(xml, parser=_xml_parser())
        except etree.XMLSyntaxError as err:
            raise self._sitemap_error(url, f"it is not valid XML ({err})") from err

    def _sitemap_error(self, url: str, cause: str) -> SourceError:
        return SourceError(
            f"The sitemap {url} of source {self.config.name!r} could not be read: "
            f"{cause}. No page was synced; check the sitemap URL and the server."
        )

    def _fetch(
        self, client: httpx.Client, known: Mapping[str, str | None], page: _Page
    ) -> Listing | None:
        version = known.get(page.url)
        try:
            with client.stream(
                "GET", page.url, headers=_conditional_headers(version)
            ) as response:
                return self._listing(response, page, version)
        except httpx.TimeoutException as err:
            return self._failed(
                page.url,
                f"The server did not answer within {self.config.timeout_s:g} s "
                f"({type(err).__name__}); raise timeout_s or check the server.",
            )
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            return self._failed(
                page.url,
                f"The page could not be fetched ({type(err).__name__}: {err}); "
                "check the URL and that the server is reachable.",
            )

    def _listing(
        self, response: httpx.Response, page: _Page, version: str | None
    ) -> Listing | None:
        status = response.status_code
        logger.debug("GET %s answered %d", page.url, status)
        if status == 304 and version is not None:
            return UnchangedDocument(self.config.name, page.url)
        if status in _GONE:
            logger.info(
                "Page %(url)s of source %(source)s is gone (HTTP %(status)d)",
                {"url": page.url, "source": self.config.name, "status": status},
            )
            return None
        if not response.is_success:
            return self._failed(
                page.url,
                f"The server answered HTTP {status} {response.reason_phrase}; the "
                "page keeps its last indexed version until the server serves it.",
            )

        try:
            body = self._read_body(response)
        except DocumentTooLarge:
            return self._failed(
                page.url,
                "The page is larger than max_document_bytes "
                f"({self.config.max_document_bytes} bytes); raise the limit or "
                "remove the page from the source.",
            )
        return self._document(response, page, body)

    def _read_body(self, response: httpx.Response) -> bytes:
        limit = self.config.max_document_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise DocumentTooLarge(f"the body is declared as {declared} bytes")
        return _read_limited(response, limit)

    def _document(
        self, response: httpx.Response, page: _Page, body: bytes
    ) -> SourceDocument:
        media_type, charset = _content_type(response.headers.get("content-type"))
        last_modified = _parse_http_date(response.headers.get("last-modified"))
        return SourceDocument(
            source=self.config.name,
            key=page.url,
            uri=str(response.url),
            content=body,
            media_type=media_type,
            modified_at=page.lastmod or last_modified,
            metadata={"charset": charset} if charset else {},
            access_labels=tuple(self.config.access_labels),
            version=_validator(response.headers),
        )

    def _failed(self, url: str, error: str) -> FailedDocument:
        logger.warning(
            "Page %(url)s of source %(source)s failed: %(error)s",
            {"url": url, "source": self.config.name, "error": error},
        )
        return FailedDocument(self.config.name, url, url, error)


def _completed(
    pool: ThreadPoolExecutor,
    task: Callable[[_T], _R],
    items: Iterable[_T],
    window: int,
) -> Iterator[_R]:
    """Run ``task`` over ``items`` in ``pool``, yielding results as they complete.

    At most ``window`` tasks are submitted at a time, so results waiting for
    the consumer stay few. Tasks not started when the consumer stops are
    cancelled.
    """
    remaining = iter(items)
    pending: set[Future[_R]] = {pool.submit(task, i) for i in islice(remaining, window)}
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            pending |= {pool.submit(task, i) for i in islice(remaining, len(done))}
            for future in done:
                yield future.result()
    finally:
        for future in pending:
            future.cancel()


def _read_limited(response: httpx.Response, limit: int) -> bytes:
    """The decoded body, read until it is complete or exceeds ``limit``."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise DocumentTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _conditional_headers(version: str | None) -> dict[str, str]:
    """``If-None-Match`` and ``If-Modified-Since`` from a stored validator."""
    try:
        stored = json.loads(version) if version else {}
    except ValueError:
        logger.debug("Ignoring a validator that is not JSON: %r", version)
        return {}
    if not isinstance(stored, dict):
        return {}

    headers = {}
    if isinstance(stored.get("etag"), str):
        headers["If-None-Match"] = stored["etag"]
    if isinstance(stored.get("last_modified"), str):
        headers["If-Modified-Since"] = stored["last_modified"]
    return headers


def _validator(headers: httpx.Headers) -> str | None:
    """A compact JSON string of the response's ``ETag`` and ``Last-Modified``."""
    fields = {
        "etag": headers.get("etag"),
        "last_modified": headers.get("last-modified"),
    }
    present = {name: value for name, value in fields.items() if value is not None}
    if not present:
        return None
    return json.dumps(present, separators=(",", ":"), sort_keys=True)


def _content_type(header: str | None) -> tuple[str, str | None]:
    """The media type without parameters, and the charset parameter if any."""
    if not header:
        return _DEFAULT_MEDIA_TYPE, None
    media_type, *parameters = header.split(";")
    charset = None
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower() or None
    return media_type.strip().lower() or _DEFAULT_MEDIA_TYPE, charset


def _parse_http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        logger.debug("Ignoring an unreadable Last-Modified header: %r", value)
        return None
    return _as_utc(parsed)


def _parse_lastmod(value: str | None) -> datetime | None:
    """A sitemap ``<lastmod>`` (a W3C date or date-time) in UTC."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        logger.debug("Ignoring an unreadable <lastmod>: %r", value)
        return None
    return _as_utc(parsed)


def _as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a moment without a time zone is taken as UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _entries(root: Any, tag: str = "url") -> Iterator[tuple[str, str | None]]:
    """The ``<loc>`` and ``<lastmod>`` texts of each ``<tag>`` child of ``root``."""
    for element in root:
        if not isinstance(element.tag, str) or etree.QName(element).localname != tag:
            continue
        fields = {
            etree.QName(child).localname: (child.text or "").strip()
            for child in element
            if isinstance(child.tag, str)
        }
        if fields.get("loc"):
            yield fields["loc"], fields.get("lastmod")
        else:
            logger.warning("Ignoring a sitemap <%s> entry without <loc>", tag)


def _gunzip(body: bytes) -> bytes:
    """Decompress a gzipped sitemap file, refusing to inflate past the limit."""
    if body[:2] != b"\x1f\x8b":
        return body
    inflated = zlib.decompressobj(wbits=31).decompress(body, _SITEMAP_MAX_BYTES + 1)
    if len(inflated) > _SITEMAP_MAX_BYTES:
        raise DocumentTooLarge(f"it inflates to over {_SITEMAP_MAX_BYTES} bytes")
    return inflated


def _xml_parser() -> Any:
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def _check_http_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as err:
        raise ValueError(f"{url!r} is not a valid URL ({err}).") from err
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url!r} must be an http:// or https:// URL.")
