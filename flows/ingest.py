"""Batch ingestion flows: sync one source, or every batch source.

The sync step itself skips documents whose content hash did not change, so
a run over an unchanged source reads but writes nothing. On top of that,
syncs share the Prefect global concurrency limit ``ragline-sync`` (sized by
``flows.sync_concurrency``): runs started by different schedules wait for a
slot instead of competing for the same index, and ``ingest-all`` keeps at
most that many of its own syncs in flight.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.runtime import deployment as current_deployment

from index.sync import SyncReport
from ingestion.errors import ConfigError, SourceError

from ._steps import RETRIES, RETRY_DELAYS, RunLog, retryable
from .context import FlowRuntime, current_runtime, using_runtime

__all__ = ["SYNC_LIMIT", "SyncSummary", "ingest_all", "ingest_source"]

SYNC_LIMIT = "ragline-sync"
"""The Prefect global concurrency limit every source sync takes a slot of."""

log = RunLog(__name__)


@dataclass(frozen=True)
class SyncSummary:
    """What one sync did, as a flow result (plain data, easy to serialize)."""

    source: str
    collection: str
    generation_id: int
    status: str
    seen: int
    added: int
    changed: int
    unchanged: int
    deleted: int
    failed: int
    chunks_written: int
    seconds: float

    @classmethod
    def of(cls, report: SyncReport) -> SyncSummary:
        fields = {name: getattr(report, name) for name in cls.__dataclass_fields__}
        return cls(**fields)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@task(
    name="sync-source",
    task_run_name="sync-{source}",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=0.5,
    retry_condition_fn=retryable,
    cache_policy=NO_CACHE,
)
def sync_source(source: str, take_slot: bool = False) -> SyncSummary:
    """Sync one batch source, holding a slot of the ``ragline-sync`` limit if asked."""
    runtime = current_runtime()
    with concurrency(SYNC_LIMIT, strict=False) if take_slot else nullcontext():
        report = runtime.ingest_source(source)
    summary = SyncSummary.of(report)
    if report.status != "ok":
        raise SourceError(
            f"Source {source!r} did not sync: {report.error or report.status}. "
            "Prefect retries the task; `ragline sources status` shows the last run."
        )
    log.info(
        "source synced: source=%s collection=%s generation=%d seen=%d added=%d "
        "changed=%d unchanged=%d deleted=%d failed=%d seconds=%.1f",
        source,
        summary.collection,
        summary.generation_id,
        summary.seen,
        summary.added,
        summary.changed,
        summary.unchanged,
        summary.deleted,
        summary.failed,
        summary.seconds,
    )
    return summary


@flow(name="ingest-source", flow_run_name="ingest-source/{source}")
def ingest_source(source: str, config: str | None = None) -> SyncSummary:
    """Sync one batch source into the live generation of its collection."""
    with using_runtime(config) as runtime:
        _require_batch(runtime, source)
        return sync_source(source, _deployed())


@flow(name="ingest-all")
def ingest_all(config: str | None = None) -> list[SyncSummary]:
    """Sync every batch source, up to ``flows.sync_concurrency`` at once.

    Streaming sources are skipped: the ``stream-ingest`` flow consumes them.
    """
    with using_runtime(config) as runtime:
        limit = runtime.flows_config.sync_concurrency
        names = [s.name for s in runtime.sources() if not s.streaming]
        skipped = [s.name for s in runtime.sources() if s.streaming]
        if skipped:
            log.info("streaming sources skipped: sources=%s", ",".join(skipped))
        return _sync_all(names, limit, _deployed())


def ensure_sync_limit(limit: int) -> None:
    """Create or resize the ``ragline-sync`` global concurrency limit."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(SYNC_LIMIT, limit)


def _deployed() -> bool:
    """True in a run of a deployment: syncs then take slots of ``ragline-sync``.

    ``ragline flows deploy`` and ``serve`` create that limit. A flow called
    directly from Python (a script, a test) runs beside no scheduled others
    and skips the round trips to the API.
    """
    return current_deployment.id is not None


def _sync_all(names: list[str], limit: int, take_slot: bool) -> list[SyncSummary]:
    """Submit syncs, never more than ``limit`` in flight; results in source order."""
    in_flight: list[PrefectFuture[SyncSummary]] = []
    futures: dict[str, PrefectFuture[SyncSummary]] = {}
    for name in names:
        if len(in_flight) >= limit:
            finished = next(as_completed(in_flight))
            in_flight.remove(finished)
        futures[name] = sync_source.submit(name, take_slot)
        in_flight.append(futures[name])
    wait(list(futures.values()))  # every sync finishes before a failure is raised
    return [futures[name].result() for name in names]


def _require_batch(runtime: FlowRuntime, source: str) -> None:
    for info in runtime.sources():
        if info.name == source and info.streaming:
            raise ConfigError(
                f"Source {source!r} is a stream; the stream-ingest flow consumes it, "
                "ingest-source only syncs batch sources."
            )
