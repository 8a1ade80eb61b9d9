"""The exception tree of ragline.

Every error ragline raises on purpose derives from :class:`RaglineError`, and
most also derive from the built-in that fits, so ``except ValueError`` keeps
working for callers who do not know ragline::

    RaglineError
    ├── ConfigError (ValueError)          the settings file or a setting is wrong
    ├── SourceError (OSError)             a connector could not read its source
    ├── DocumentError (ValueError)        one document could not be parsed
    │   └── DocumentTooLarge
    ├── EmbeddingError (RuntimeError)     the embedding model failed or is missing
    ├── CatalogError (RuntimeError)       the catalog database failed
    ├── IndexBackendError (RuntimeError)  a vector index backend failed
    ├── GenerationError (RuntimeError)    a generation operation is not allowed now
    │   └── FingerprintMismatch           the pipeline config no longer matches
    ├── NotFound (LookupError)            a named collection, source or generation is unknown
    ├── RequestError (ValueError)         a request to the service is malformed or too large
    ├── AccessDenied (PermissionError)    the caller may not use this collection or model
    │   └── Unauthenticated               no valid credentials came with the request
    └── ProviderError (RuntimeError)      a model provider failed, timed out or is missing

Messages are sentences that name the thing at fault and say what to do.
Always chain the cause: ``raise SourceError(...) from err``.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "CatalogError",
    "ConfigError",
    "DocumentError",
    "DocumentTooLarge",
    "EmbeddingError",
    "FingerprintMismatch",
    "GenerationError",
    "IndexBackendError",
    "NotFound",
    "ProviderError",
    "RaglineError",
    "RequestError",
    "SourceError",
    "Unauthenticated",
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
