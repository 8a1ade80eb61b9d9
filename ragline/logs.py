"""Logging for every ragline package: named fields, optional JSON, secrets masked.

Each module logs through ``logging.getLogger(__name__)`` with ``%``-style
placeholders; :func:`configure_logging` attaches one handler to the loggers
of all ragline packages. A filter on that handler masks every registered
secret value and the password of any URL, whatever the message.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

__all__ = ["PACKAGES", "SecretMasker", "configure_logging"]

PACKAGES = ("ragline", "ingestion", "index", "retrieval", "serving", "eval", "flows")

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+):[^@\s]+@")
_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class SecretMasker(logging.Filter):
    """Replaces known secrets and URL passwords in log records with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted(
            {s for s in secrets if s and len(s) >= 4}, key=len, reverse=True
        )

    def mask(self, text: str) -> str:
        text = _URL_PASSWORD.sub(r"\g<scheme>:***@", text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.mask(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.mask(
                logging.Formatter().formatException(record.exc_info)
            )
            record.exc_info = None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(
            {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
        )
        if record.exc_text:
            payload["exception"] = record.exc_text
        return json.dumps(payload, default=str)


def configure_logging(
    level: str = "INFO", *, json_format: bool = False, secrets: Iterable[str] = ()
) -> None:
    """Send the ragline packages' logs to stderr, masking ``secrets``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SecretMasker(secrets))
    handler.setFormatter(
        _JsonFormatter()
        if json_format
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    for name in PACKAGES:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if getattr(old, "_ragline", False):
                logger.removeHandler(old)
        handler._ragline = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
