"""Who is calling: static API keys from the settings, or nobody (an open service).

A request presents its key as ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``. Keys are compared in constant time by their SHA-256
digests. Without an ``auth`` section every caller is ``anonymous`` and sees
public documents only (those without access labels); the service warns about
it at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ingestion.errors import Unauthenticated
from retrieval.filters import AccessScope

from .config import AuthConfig
from .service import Caller

__all__ = ["ANONYMOUS", "Authenticator"]

logger = logging.getLogger(__name__)

ANONYMOUS = Caller()


class Authenticator:
    """Turns request headers into a :class:`~serving.service.Caller`."""

    def __init__(self, config: AuthConfig | None) -> None:
        self._config = config

    @property
    def is_open(self) -> bool:
        return self._config is None

    def caller(self, headers: Mapping[str, str]) -> Caller:
        """The caller these headers identify; raises ``Unauthenticated``."""
        if self._config is None:
            return ANONYMOUS
        presented = _presented_key(headers)
        if presented is None:
            raise Unauthenticated(
                "This service needs an API key: send it as 'Authorization: Bearer "
                "<key>' or 'X-API-Key: <key>'."
            )
        for key in self._config.api_keys:
            if key.matches(presented):
                return Caller(
                    user=key.name,
                    scope=AccessScope.of(key.labels),
                    collections=(
                        None if key.collections is None else frozenset(key.collections)
                    ),
                )
        raise Unauthenticated(
            "The API key is not valid; check it, or ask an administrator for one."
        )


def _presented_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None
