"""Metrics and traces of the service.

Prometheus metrics live in a registry of the service's own (so two apps in
one process, as in tests, never collide) and are served at ``/metrics``:

* ``ragline_stage_seconds{route, stage}``: latency of each stage (embed,
  retrieve, generate) and of the whole request (``total``);
* ``ragline_requests_total{route, status}``;
* ``ragline_tokens_total{kind}``: prompt and completion tokens;
* ``ragline_cache_lookups_total{kind, result}``: exact and semantic cache
  hits and misses;
* ``ragline_index_chunks{collection, generation}``: live chunks per collection.

Traces: one OpenTelemetry span ``ask`` (or ``search``) per request, holding
``embed``, ``retrieve`` (with ``rerank`` inside it when a reranker is
configured) and ``generate``, exported as ``tracing.exporter`` says (``none``
by default, ``console``, or ``otlp`` to an OTLP/HTTP collector).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import Field

from ingestion.config import StrictModel
from ingestion.errors import ConfigError

__all__ = ["Observer", "TracingConfig"]

_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class TracingConfig(StrictModel):
    """Where OpenTelemetry spans go."""

    exporter: Literal["none", "console", "otlp"] = "none"
    endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces.",
    )
    service_name: str = "ragline"


class Observer:
    """The service's metrics registry and tracer."""

    def __init__(self, tracing: TracingConfig | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._stage = Histogram(
            "ragline_stage_seconds",
            "Latency of each stage of a request, and of the whole request.",
            ["route", "stage"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._requests = Counter(
            "ragline_requests",
            "Requests answered, by route and HTTP status.",
            ["route", "status"],
            registry=self.registry,
        )
        self._tokens = Counter(
            "ragline_tokens",
            "Model tokens, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self._cache = Counter(
            "ragline_cache_lookups",
            "Answer cache lookups, by cache kind and result.",
            ["kind", "result"],
            registry=self.registry,
        )
        self._chunks = Gauge(
            "ragline_index_chunks",
            "Live chunks in the live generation of each collection.",
            ["collection", "generation"],
            registry=self.registry,
        )
        self._staleness = Gauge(
            "ragline_source_staleness_seconds",
            "Seconds since each source was last known to be in the index in full "
            "(last successful sync, or a stream found drained).",
            ["source", "collection"],
            registry=self.registry,
        )
        self._objective = Gauge(
            "ragline_source_max_staleness_seconds",
            "The freshness objective of each source that declares one.",
            ["source", "collection"],
            registry=self.registry,
        )
        self._stale = Gauge(
            "ragline_source_stale",
            "1 while a source is past its freshness objective (or never synced).",
            ["source", "collection"],
            registry=self.registry,
        )
        self._event_lag = Gauge(
            "ragline_source_event_lag_seconds",
            "Event-to-queryable lag of a streaming source's last committed batch.",
            ["source", "collection", "quantile"],
            registry=self.registry,
        )
        self._events = Gauge(
            "ragline_source_events",
            "Change events of a streaming source, applied or dead-lettered, in all.",
            ["source", "collection", "outcome"],
            registry=self.registry,
        )
        self._tracer = _tracer(tracing or TracingConfig())

    # -- metrics -----------------------------------------------------------

    def request_done(
        self,
        route: str,
        stages: Mapping[str, float],
        usage: Mapping[str, int] | None = None,
    ) -> None:
        for stage, seconds in stages.items():
            self._stage.labels(route, stage).observe(seconds)
        if usage:
            self._tokens.labels("prompt").inc(usage.get("prompt_tokens", 0))
            self._tokens.labels("completion").inc(usage.get("completion_tokens", 0))

    def request_finished(self, route: str, status: int, seconds: float) -> None:
        self._requests.labels(route, str(status)).inc()
        self._stage.labels(route, "total").observe(seconds)

    def cache_lookup(self, kind: str, hit: bool) -> None:
        self._cache.labels(kind, "hit" if hit else "miss").inc()

    def index_size(self, collection: str, generation: int, chunks: int) -> None:
        self._chunks.labels(collection, str(generation)).set(chunks)

    def source_freshness(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Set the freshness gauges from ``Runtime.source_rows`` style rows."""
        for row in rows:
            labels = (str(row["source"]), str(row.get("collection") or ""))
            if row.get("staleness_s") is not None:
                self._staleness.labels(*labels).set(row["staleness_s"])
            if row.get("max_staleness_s") is not None:
                self._objective.labels(*labels).set(row["max_staleness_s"])
                self._stale.labels(*labels).set(1 if row.get("stale") else 0)
            for quantile, key in (("max", "event_lag_s"), ("0.5", "event_lag_p50_s")):
                if row.get(key) is not None:
                    self._event_lag.labels(*labels, quantile).set(row[key])
            for outcome, key in (
                ("applied", "events_applied"),
                ("dead_lettered", "events_dead_lettered"),
            ):
                if row.get(key) is not None:
                    self._events.labels(*labels, outcome).set(row[key])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- traces ------------------------------------------------------------

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        if self._tracer is None:
            yield
            return
        with self._tracer.start_as_current_span(name, attributes=attributes):
            yield


def _tracer(config: TracingConfig) -> Any:
    if config.exporter == "none":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name})
    )
    if config.exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        if not config.endpoint:
            raise ConfigError(
                "serve.tracing.endpoint: the otlp exporter needs the collector's "
                "OTLP/HTTP traces URL, e.g. http://localhost:4318/v1/traces."
            )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint))
        )
    return provider.get_tracer("ragline")
