"""What the flows need from an assembled deployment, and how they get it.

The flows never assemble catalogs, indexes or embedders themselves: that is
the composition root's job (``ragline``), and the flows package must not
import it. Instead the root registers an *opener* with
:func:`register_opener`: a function that takes the path of a settings file
and returns a context manager yielding an object with the operations of
:class:`FlowRuntime`. ``ragline/deployments.py`` does this on import, and
every deployment's entrypoint points at that file, so a worker process that
loads a flow has its opener registered before the flow runs.

Within a flow run, :func:`using_runtime` opens the runtime once and makes it
the current one; tasks the flow submits (threads that copy the flow's
context) reach it with :func:`current_runtime`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from index.catalog import ChunkRecord, Generation
from index.sync import SyncReport
from ingestion.config import Schedule
from ingestion.errors import ConfigError, RaglineError
from ingestion.streaming.consumer import ConsumerStats
from retrieval.retriever import SearchHit

from .config import FlowsConfig

__all__ = [
    "CONFIG_ENV",
    "FlowRuntime",
    "NoRuntime",
    "Opener",
    "SourceInfo",
    "current_runtime",
    "register_opener",
    "resolve_config",
    "using_runtime",
]

CONFIG_ENV = "RAGLINE_CONFIG"


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the flows need to know of a declared source."""

    name: str
    collection: str
    streaming: bool
    schedule: Schedule | None
    max_staleness: timedelta | None


class FlowRuntime(Protocol):
    """The operations of an assembled deployment that the flows use."""

    @property
    def config_path(self) -> Path:
        """The settings file the runtime was opened from."""
        ...

    @property
    def flows_config(self) -> FlowsConfig: ...

    def sources(self) -> list[SourceInfo]:
        """Every declared source, in the order of the settings file."""
        ...

    def collections(self) -> list[str]: ...

    def ingest_source(self, name: str) -> SyncReport:
        """Sync one batch source into the live generation of its collection."""
        ...

    def live_generation(self, collection: str) -> Generation | None: ...

    def is_current(self, generation: Generation) -> bool:
        """True when the generation was built with the configured pipeline and backend."""
        ...

    def build(self, collection: str) -> tuple[Generation, list[SyncReport]]:
        """Build a new generation beside the live one, from all sources of the collection."""
        ...

    def search_generation(
        self, generation: Generation, query: str, k: int
    ) -> list[SearchHit]:
        """Search any generation, live or not (no access filter)."""
        ...

    def sample_passages(self, generation: Generation, n: int) -> list[ChunkRecord]:
        """The first passage of up to ``n`` documents of a generation."""
        ...

    def live_chunks(self, generation: Generation) -> int: ...

    def promote(self, collection: str, generation_id: int) -> Generation | None:
        """Make a generation live; returns the one that was live before."""
        ...

    def source_rows(self) -> list[dict[str, Any]]:
        """Freshness of every declared source (``staleness_s`` or ``never_synced``)."""
        ...

    def consume(
        self,
        name: str,
        stop: threading.Event | None = None,
        *,
        max_events: int | None = None,
        idle_exit_s: float | None = None,
    ) -> ConsumerStats:
        """Consume a streaming source until ``stop`` is set or a limit ends it."""
        ...

    def verify(self, collection_name: str | None = None) -> dict[str, list[str]]: ...


Opener = Callable[[Path], AbstractContextManager[FlowRuntime]]

_opener: Opener | None = None
_current: ContextVar[FlowRuntime | None] = ContextVar("ragline_runtime", default=None)


class NoRuntime(RaglineError, RuntimeError):
    """No runtime is available to the flows."""


def register_opener(opener: Opener) -> None:
    """Tell the flows how to open a runtime from a settings file path."""
    global _opener
    _opener = opener


def resolve_config(config: str | None) -> Path:
    """The settings file: ``config``, else ``$RAGLINE_CONFIG``, else ``./ragline.yaml``."""
    chosen = config or os.environ.get(CONFIG_ENV) or "ragline.yaml"
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"No settings file at {path.resolve()}. Pass the flow parameter 'config' "
            f"or set {CONFIG_ENV} in the environment of the worker."
        )
    return path.resolve()


@contextmanager
def using_runtime(config: str | None) -> Iterator[FlowRuntime]:
    """Open the runtime of a settings file and make it current until the block ends.

    A flow called from another flow reuses the runtime already current.
    """
    running = _current.get()
    if running is not None:
        yield running
        return
    if _opener is None:
        raise NoRuntime(
            "No runtime opener is registered, so the flows cannot open the settings. "
            "Run them through ragline.deployments (the deployments' entrypoint, "
            "`ragline flows serve` or `ragline flows deploy`), or import it first."
        )
    with _opener(resolve_config(config)) as runtime:
        token = _current.set(runtime)
        try:
            yield runtime
        finally:
            _current.reset(token)


def current_runtime() -> FlowRuntime:
    """The runtime of the flow run this code runs in."""
    runtime = _current.get()
    if runtime is None:
        raise NoRuntime(
            "This step runs outside a flow that opened a runtime; call it from one "
            "of the flows in the flows package."
        )
    return runtime
