"""The freshness check: compare each source's staleness with its objective, alert.

A source's staleness is the time since its last successful sync (for a
stream: since its last committed batch or idle check). A source with a
``max_staleness`` objective that is past it, or that never synced, is a
breach. Each breach raises three alerts, each independent of the others:

* a Prefect event ``ragline.source.stale`` about the resource
  ``ragline.source.<name>``, for Prefect automations to act on;
* a WARNING log line with named fields;
* a JSON POST to ``flows.freshness.webhook``, when one is configured. A
  webhook that is down is logged, never fatal: the event and the log line
  have already gone out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import httpx
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from ._steps import RETRIES, RETRY_DELAYS, RunLog, retryable
from .config import WebhookConfig
from .context import current_runtime, using_runtime

__all__ = ["STALE_EVENT", "Breach", "check_freshness", "find_breaches"]

STALE_EVENT = "ragline.source.stale"

log = RunLog(__name__)


@dataclass(frozen=True)
class Breach:
    """A source past its freshness objective."""

    source: str
    collection: str | None
    staleness_s: float | None
    """Seconds since the last successful sync; None when it never synced."""
    max_staleness_s: float
    last_success_at: str | None

    @property
    def never_synced(self) -> bool:
        return self.staleness_s is None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "never_synced": self.never_synced}


def find_breaches(
    rows: Sequence[Mapping[str, Any]], objectives: Mapping[str, timedelta]
) -> list[Breach]:
    """The sources whose staleness exceeds their objective (never synced included)."""
    breaches = []
    for row in rows:
        objective = objectives.get(row["source"])
        if objective is None:
            continue
        staleness = None if row.get("never_synced") else row.get("staleness_s")
        limit = objective.total_seconds()
        if staleness is None or staleness > limit:
            breaches.append(
                Breach(
                    source=row["source"],
                    collection=row.get("collection"),
                    staleness_s=staleness,
                    max_staleness_s=limit,
                    last_success_at=row.get("last_success_at"),
                )
            )
    return breaches


@task(
    name="read-freshness",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retryable,
    cache_policy=NO_CACHE,
)
def read_freshness() -> list[Breach]:
    """The breaches of every source with a ``max_staleness`` objective."""
    runtime = current_runtime()
    objectives = {
        s.name: s.max_staleness
        for s in runtime.sources()
        if s.max_staleness is not None
    }
    return find_breaches(runtime.source_rows(), objectives)


@flow(name="check-freshness")
def check_freshness(config: str | None = None) -> list[Breach]:
    """Alert on every source past its ``max_staleness``; returns the breaches."""
    with using_runtime(config) as runtime:
        breaches = read_freshness()
        webhook = runtime.flows_config.freshness.webhook
        for breach in breaches:
            alert(breach, webhook)
        if not breaches:
            log.info("every source is within its freshness objective")
        return breaches


def alert(breach: Breach, webhook: WebhookConfig | None) -> None:
    """Raise the event, the log line and the webhook call of one breach."""
    emit_event(
        event=STALE_EVENT,
        resource={
            "prefect.resource.id": f"ragline.source.{breach.source}",
            "prefect.resource.name": breach.source,
            "ragline.collection": breach.collection or "",
        },
        payload=breach.as_dict(),
    )
    log.warning(
        "source is stale: source=%s collection=%s staleness_s=%s max_staleness_s=%s "
        "never_synced=%s last_success_at=%s",
        breach.source,
        breach.collection,
        breach.staleness_s,
        breach.max_staleness_s,
        breach.never_synced,
        breach.last_success_at,
    )
    if webhook is not None:
        _post(webhook, breach)


def _post(webhook: WebhookConfig, breach: Breach) -> None:
    body = {"event": STALE_EVENT, **breach.as_dict()}
    try:
        response = httpx.post(
            webhook.url.get_secret_value(),
            json=body,
            headers=webhook.headers,
            timeout=webhook.timeout.total_seconds(),
        )
        response.raise_for_status()
    except httpx.HTTPError as err:
        # The URL may carry a token: name the error kind, never the address.
        log.warning(
            "freshness webhook failed: source=%s error=%s",
            breach.source,
            type(err).__name__,
        )
        return
    log.info(
        "freshness webhook notified: source=%s status=%d",
        breach.source,
        response.status_code,
    )
