"""The exception tree of ragline.

Every error ragline raises on purpose derives from :class:`RaglineError`, and
most also derive from the built-in that fits, so ``except ValueError`` keeps
working for callers who do not know ragline::

    RaglineError
    ├── ConfigError (ValueError)          the settings file or a setting is wrong
    ├── SourceError (OSError)             a connector could not read its source
    ├── DocumentError (ValueError)        one document could not be parsed
    │   ├── DocumentTooLarge
    │   └── BadEvent                      a stream message is not a valid change event
    ├── EmbeddingError (RuntimeError)     the embedding model failed or is missing
    ├── CatalogError (RuntimeError)       the catalog database failed
    ├── IndexBackendError (RuntimeError)  a vector index backend failed
    ├── GenerationError (RuntimeError)    a generation operation is not allowed now
    │   └── FingerprintMismatch           the pipeline config no longer matches
    ├── NotFound (LookupError)            a named collection, source or generation is unknown
    ├── RequestError (ValueError)         a request to the service is malformed or too large
    ├── AccessDenied (PermissionError)    the caller may not use this collection or model
    │   └── Unauthenticated               no valid credentials came with the request
    ├── ProviderError (RuntimeError)      a model provider failed, timed out or is missing
    │   ├── UpstreamError                 one upstream target answered with an error
    │   └── ProviderUnavailable           no target of a virtual model can take requests
    └── Throttled                         the caller must wait before asking again
        ├── BudgetExceeded                a token or cost budget is spent
        ├── RateLimited                   too many requests or tokens per minute
        ├── LoopDetected                  the same request again and again
        └── StreamBacklogged              a stream's consumer is behind; pushes wait

Messages are sentences that name the thing at fault and say what to do.
Always chain the cause: ``raise SourceError(...) from err``.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "BadEvent",
    "BudgetExceeded",
    "CatalogError",
    "ConfigError",
    "DocumentError",
    "DocumentTooLarge",
    "EmbeddingError",
    "FingerprintMismatch",
    "GenerationError",
    "IndexBackendError",
    "LoopDetected",
    "NotFound",
    "ProviderError",
    "ProviderUnavailable",
    "RaglineError",
    "RateLimited",
    "RequestError",
    "SourceError",
    "StreamBacklogged",
    "Throttled",
    "Unauthenticated",
    "UpstreamError",
]


class RaglineError(Exception):
    """The root of every error ragline raises on purpose."""


class ConfigError(RaglineError, ValueError):
    """The settings file, or a value in it, is not valid."""


class SourceError(RaglineError, OSError):
    """A connector could not list or read its source."""


class DocumentError(RaglineError, ValueError):
    """One document could not be turned into text; the run goes on without it."""


class DocumentTooLarge(DocumentError):
    """A document is larger than the configured limit."""


class BadEvent(DocumentError):
    """A stream message is not a valid change event; it goes to the dead-letter stream."""


class EmbeddingError(RaglineError, RuntimeError):
    """The embedding model could not be loaded or failed to encode."""


class CatalogError(RaglineError, RuntimeError):
    """The catalog database could not be read or written."""


class IndexBackendError(RaglineError, RuntimeError):
    """A vector index backend could not be opened, read or written."""


class GenerationError(RaglineError, RuntimeError):
    """An index generation operation is not possible in the current state."""


class FingerprintMismatch(GenerationError):
    """The pipeline config differs from the one the live generation was built with."""


class NotFound(RaglineError, LookupError):
    """A named collection, source, document or generation does not exist."""


class RequestError(RaglineError, ValueError):
    """A request to the service is malformed, out of range or too large."""


class AccessDenied(RaglineError, PermissionError):
    """The caller's identity does not allow what it asked for."""


class ProviderError(RaglineError, RuntimeError):
    """A model provider could not be loaded, failed, or timed out."""


class Unauthenticated(AccessDenied):
    """A request came without credentials, or with credentials nobody issued."""


class UpstreamError(ProviderError):
    """One upstream target failed: an HTTP error status, a broken connection, a timeout.

    ``status`` is the HTTP status (None when no response came), ``retry_after``
    the seconds the upstream asked to wait (None when it did not say) and
    ``retryable`` whether trying again, here or on another target, may help:
    true for timeouts, connection errors, 408, 409, 429 and 5xx, false for
    other 4xx, which would fail the same way anywhere.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.retryable = retryable


class ProviderUnavailable(ProviderError):
    """Every target of a virtual model is failing or cooling down (HTTP 503).

    ``retry_after`` is the number of seconds until the first target may be
    tried again.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Throttled(RaglineError):
    """The caller must wait before asking again (HTTP 429).

    ``retry_after`` is the number of seconds to wait; subclasses add what was
    exceeded.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BudgetExceeded(Throttled):
    """A token or cost budget of a team or key is spent until it resets.

    ``budget`` names it (for example ``team:search/tokens/day``), ``limit``
    and ``spent`` are in its unit and ``resets_at`` is a timezone-aware
    datetime.
    """

    def __init__(
        self,
        message: str,
        *,
        budget: str,
        limit: float,
        spent: float,
        resets_at: object,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.budget = budget
        self.limit = limit
        self.spent = spent
        self.resets_at = resets_at


class RateLimited(Throttled):
    """Too many requests or tokens per minute for a key or team."""


class LoopDetected(Throttled):
    """The same key sent the same request too many times in a short window."""


class StreamBacklogged(Throttled):
    """Too many events wait in a stream to be indexed; pushes are refused (HTTP 503)."""
