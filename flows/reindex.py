"""The reindex flow: rebuild a collection when its pipeline changed, judge, promote.

Invariants:

* Nothing is rebuilt while the live generation was built with the configured
  pipeline (embedding model, chunking, parser, backend), unless ``force``.
* A collection fed by a streaming source is never rebuilt: the events its
  stream already delivered cannot be listed again, and would be lost.
* A candidate goes live only when the promotion gate passes it; otherwise
  the old generation stays live and the candidate is kept (state ``ready``)
  for inspection with ``ragline index list``.
* Promotion is one catalog transaction that moves the collection's alias.
  A running service follows the alias: requests in flight finish on the old
  generation, the next ones search the new one, and none fails.

A candidate that failed the gate is built again on the next run (its
embeddings come from the cache), so a fix to the sources or the gate
questions is picked up without manual steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from index.catalog import Generation
from ingestion.errors import GenerationError

from ._steps import RETRIES, RETRY_DELAYS, RunLog, retryable
from .context import FlowRuntime, current_runtime, using_runtime
from .gates import GateContext, GateResult, load_gate

__all__ = ["ReindexResult", "reindex_collection"]

log = RunLog(__name__)

Decision = Literal["promoted", "kept", "unchanged"]


@dataclass(frozen=True)
class ReindexResult:
    """What a reindex run decided, and why."""

    collection: str
    decision: Decision
    reasons: list[str]
    live_generation: int | None
    """The generation live after the run."""
    candidate_generation: int | None = None
    previous_generation: int | None = None
    """The generation that was live before the run."""
    metrics: dict[str, Any] = field(default_factory=dict)


@task(
    name="build-generation",
    task_run_name="build-{collection}",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_jitter_factor=0.5,
    retry_condition_fn=retryable,
    cache_policy=NO_CACHE,
)
def build_generation(collection: str) -> Generation:
    """Build a new generation from every batch source of the collection.

    A build that a source failed stays unfinished; the retry resumes it.
    """
    runtime = current_runtime()
    generation, reports = runtime.build(collection)
    failed = [r.source for r in reports if r.status != "ok"]
    if generation.state != "ready":
        raise GenerationError(
            f"Generation {generation.id} of {collection!r} is incomplete: source(s) "
            f"{', '.join(failed) or 'unknown'} did not sync. The next attempt resumes it."
        )
    docs = sum(r.seen - r.failed for r in reports)
    log.info(
        "generation built: collection=%s generation=%d documents=%d chunks_written=%d",
        collection,
        generation.id,
        docs,
        sum(r.chunks_written for r in reports),
    )
    return generation


@task(
    name="judge-generation", task_run_name="judge-{collection}", cache_policy=NO_CACHE
)
def judge_generation(
    collection: str, candidate: Generation, live: Generation | None
) -> GateResult:
    """Run the configured promotion gate on a candidate generation."""
    runtime = current_runtime()
    settings = runtime.flows_config.reindex
    gate = load_gate(settings.gate)
    context = GateContext(
        collection=collection,
        candidate=candidate,
        live=live,
        search=lambda query, k: runtime.search_generation(candidate, query, k),
        questions=settings.questions(runtime.config_path.parent),
        k=settings.gate_k,
        min_hit_rate=settings.min_hit_rate,
        live_chunks=runtime.live_chunks(candidate),
        sample=lambda n: runtime.sample_passages(candidate, n),
    )
    try:
        return gate(context)
    except Exception as err:  # noqa: BLE001 - a broken gate must not promote
        log.error(
            "promotion gate failed to run: collection=%s generation=%d gate=%s error=%s",
            collection,
            candidate.id,
            settings.gate,
            err,
        )
        return GateResult(False, [f"the gate {settings.gate} raised {err!r}"], {})


@flow(name="reindex-collection", flow_run_name="reindex-collection/{collection}")
def reindex_collection(
    collection: str, config: str | None = None, force: bool = False
) -> ReindexResult:
    """Rebuild a collection when its pipeline changed, then promote what the gate passes."""
    with using_runtime(config) as runtime:
        live = runtime.live_generation(collection)
        if live is not None and runtime.is_current(live) and not force:
            log.info(
                "reindex not needed, the live generation matches the configured "
                "pipeline: collection=%s generation=%d fingerprint=%s",
                collection,
                live.id,
                live.fingerprint,
            )
            return ReindexResult(
                collection,
                "unchanged",
                ["the live generation already matches the configured pipeline"],
                live.id,
            )
        streams = [
            s.name
            for s in runtime.sources()
            if s.collection == collection and s.streaming
        ]
        if streams:
            # A new generation is built from listings; events a stream already
            # delivered would be missing from it.
            reason = (
                f"the collection is fed by the streaming source(s) {', '.join(streams)}, "
                "whose past events a rebuild cannot list; rebuild such a collection "
                "by replaying its streams into a new collection"
            )
            log.warning(
                "reindex refused: collection=%s streaming_sources=%s",
                collection,
                ",".join(streams),
            )
            previous = live.id if live is not None else None
            return ReindexResult(collection, "kept", [reason], previous)
        candidate = build_generation(collection)
        verdict = judge_generation(collection, candidate, live)
        return _decide(runtime, collection, candidate, live, verdict)


def _decide(
    runtime: FlowRuntime,
    collection: str,
    candidate: Generation,
    live: Generation | None,
    verdict: GateResult,
) -> ReindexResult:
    previous = live.id if live is not None else None
    if verdict.passed:
        runtime.promote(collection, candidate.id)
        decision: Decision = "promoted"
        now_live: int | None = candidate.id
    else:
        decision, now_live = "kept", previous
    log.info(
        "reindex decision: collection=%s decision=%s candidate=%d previous=%s "
        "live=%s reasons=%s",
        collection,
        decision,
        candidate.id,
        previous,
        now_live,
        "; ".join(verdict.reasons),
    )
    return ReindexResult(
        collection,
        decision,
        list(verdict.reasons),
        now_live,
        candidate.id,
        previous,
        dict(verdict.metrics),
    )
