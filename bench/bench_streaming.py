"""Streaming ingestion: embedder capacity, event-to-queryable latency, throughput.

Prints, in one run, each figure beside its baseline:

* the embedder's capacity in chunks per second for short events (about 50
  words, one chunk each; 100 and 200 words for reference), measured through
  the consumer's own steps (parse the event, prepare, embed through the
  catalog's embedding cache) in batches of ``batch_max_events``;
* event-to-queryable latency (p50, p95) at 25%, 50% and 90% of that
  capacity: a producer process appends events to a real Redis stream at a
  fixed rate, scheduled by the clock and never waiting for the consumer,
  while ``Runtime.consume`` runs in a thread of the measuring process. An
  event's latency is its batch's commit time minus the time Redis accepted
  it (goals: p95 at most 1 s at 50%, at most 3 s at 90%). After each level
  a sample of the pushed documents is looked up in the catalog and searched
  for;
* streaming throughput against batch throughput on the same documents: the
  documents written as files and ingested by a ``files`` source, then pushed
  as events and consumed from the full backlog, as a ratio (goal: at least
  0.9), with each one's peak memory.

Each part runs in a process of its own, which loads and warms the model
before anything is timed. The event texts are passages of the Python 3.11
manual, all distinct. Every latency level gets a fresh data directory and a
stream of its own, deleted afterwards.

Usage: python bench/bench_streaming.py [--manual DIR] [--seconds S]
    [--docs N] [--redis URL] [--batch-max-events N] [--batch-max-wait MS]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import (
    REPO,
    manual_settings,
    peak_rss_mb,
    print_table,
    progress,
    run_worker,
)

CACHE = REPO / "bench" / ".cache"
MANUAL = Path("/usr/share/doc/python3.11/html")
PASSAGES = CACHE / "stream-passages.json"
SIZES = (50, 100, 200)
LOAD_FRACTIONS = (0.25, 0.5, 0.9)
P95_GOALS_S = {0.5: 1.0, 0.9: 3.0}
THROUGHPUT_GOAL = 0.9
SOURCE = "events"
COLLECTION = "events"
WARMUP_EVENTS = 16
VERIFY_SAMPLE = 20
DRAIN_TIMEOUT_S = 60.0


# -- the corpus ---------------------------------------------------------------------


class _Paragraphs(HTMLParser):
    """Collects the text of every ``<p>`` of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.paragraphs: list[str] = []
        self._depth = 0
        self._parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "p":
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "p" and self._depth:
            self._depth -= 1
            if not self._depth:
                self.paragraphs.append(" ".join("".join(self._parts).split()))
                self._parts = []

    def handle_data(self, data: str) -> None:
        if self._depth:
            self._parts.append(data)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def manual_passages(manual: Path, words: int) -> list[str]:
    """Distinct passages of about ``words`` words: whole sentences of one page,
    packed in order and cut at 1.2 times ``words``."""
    shortest, longest = int(words * 0.9), int(words * 1.2)
    seen: set[str] = set()
    passages: list[str] = []
    for page in _manual_pages(manual):
        parser = _Paragraphs()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        sentences: list[str] = []
        count = 0
        for paragraph in parser.paragraphs:
            for sentence in _SENTENCE_END.split(paragraph):
                if not sentence:
                    continue
                sentences.append(sentence)
                count += len(sentence.split())
                if count < shortest:
                    continue
                text = " ".join(" ".join(sentences).split()[:longest])
                if text not in seen:
                    seen.add(text)
                    passages.append(text)
                sentences, count = [], 0
    return passages


def _manual_pages(manual: Path) -> list[Path]:
    skipped = {"_static", "_sources", "_images"}
    return sorted(
        page
        for page in manual.rglob("*.html")
        if not skipped & set(page.relative_to(manual).parts)
        and not page.name.startswith("genindex")
    )


def load_passages(manual: Path) -> dict[str, list[str]]:
    """Passages of each size in ``SIZES``, built once and kept in the cache."""
    if PASSAGES.exists():
        cached: dict[str, list[str]] = json.loads(PASSAGES.read_text())
        if all(str(words) in cached for words in SIZES):
            return cached
    progress(f"cutting passages of {', '.join(map(str, SIZES))} words from {manual}")
    passages = {str(words): manual_passages(manual, words) for words in SIZES}
    CACHE.mkdir(parents=True, exist_ok=True)
    PASSAGES.write_text(json.dumps(passages))
    return passages


def _passages(words: int, count: int) -> list[str]:
    available: list[str] = json.loads(PASSAGES.read_text())[str(words)]
    if len(available) < count:
        raise SystemExit(
            f"the manual gives {len(available):,} passages of {words} words, fewer "
            f"than the {count:,} needed; lower --seconds or --docs."
        )
    return available[:count]


# -- assembly -----------------------------------------------------------------------


def stream_settings(
    data_dir: Path, stream: str, redis_url: str, consumer: dict[str, Any]
) -> Any:
    """Settings of one FAISS collection fed by one Redis stream."""
    from ragline.settings import parse_settings

    source = {
        "name": SOURCE,
        "type": "redis_stream",
        "collection": COLLECTION,
        "url": redis_url,
        "stream": stream,
        "consumer": "bench",
        **consumer,
    }
    raw = {
        "data_dir": str(data_dir),
        "collections": [{"name": COLLECTION, "index": "faiss"}],
        "sources": [source],
    }
    return parse_settings(raw, base_dir=REPO, origin="bench settings")


def warm_model() -> Any:
    """The default embedding model, loaded and warmed once per process."""
    from ingestion.config import EmbedderConfig
    from ingestion.embedding import SentenceTransformerEmbedder

    model = SentenceTransformerEmbedder(EmbedderConfig())
    model.embed(["Warming up the embedding model before timing anything."] * 64)
    return model


def runtime_with(settings: Any, model: Any) -> Any:
    """A runtime whose collections all use ``model`` (already loaded)."""
    from ingestion.embedding import CachedEmbedder
    from ragline.runtime import Runtime

    runtime = Runtime(settings)
    for collection in settings.collections:
        config = settings.embedder_for(collection)
        runtime._embedders[config] = CachedEmbedder(model, runtime.catalog)
    return runtime


class TimedEmbedder:
    """An embedder that adds up the seconds its model spends encoding."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    @property
    def model_id(self) -> str:
        return str(self.inner.model_id)

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return list(self.inner.count_tokens(texts))

    def embed(self, texts: Sequence[str]) -> Any:
        began = time.perf_counter()
        try:
            return self.inner.embed(texts)
        finally:
            self.seconds += time.perf_counter() - began


class CpuMeter:
    """CPU used over an interval, in cores: by this process and the children it
    waited for, by the Redis server, and by every other process of the machine.

    The machine is shared; ``other`` says how much of it the figures did not get.
    """

    def __init__(self, redis_url: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(redis_url)
        self._start = self._read()

    def cores(self) -> dict[str, float]:
        end = self._read()
        used = {key: end[key] - self._start[key] for key in end}
        wall = used.pop("wall")
        self._redis.close()
        other = used["machine"] - used["bench"] - used["redis"]
        return {
            "bench_cores": used["bench"] / wall,
            "redis_cores": used["redis"] / wall,
            "other_cores": max(0.0, other) / wall,
        }

    def _read(self) -> dict[str, float]:
        with open("/proc/stat", encoding="ascii") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu: Any = self._redis.info("cpu")
        return {
            "wall": time.perf_counter(),
            "machine": (user + nice + system + irq + softirq + steal)
            / os.sysconf("SC_CLK_TCK"),
            "bench": own.ru_utime
            + own.ru_stime
            + children.ru_utime
            + children.ru_stime,
            "redis": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        }


def fresh_dir(name: str) -> Path:
    path = CACHE / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def event(key: str, text: str) -> dict[str, Any]:
    return {"op": "upsert", "key": key, "content": text}


def delete_stream(redis_url: str, stream: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(stream, f"{stream}.dead")
    finally:
        client.close()


# -- part 1: embedder capacity ------------------------------------------------------


def capacity_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Chunks per second of parse + prepare + embed, in batches of the consumer's size."""
    model = warm_model()
    return {
        str(words): _capacity_at(model, spec, words, docs)
        for words, docs in spec["docs"].items()
    }


def _capacity_at(
    model: Any, spec: dict[str, Any], words: str, docs: int
) -> dict[str, Any]:
    from ingestion.chunking import embedding_text
    from ingestion.streaming.events import Delivery, encode_event

    data_dir = fresh_dir(f"stream-capacity-{words}")
    settings = stream_settings(data_dir, "unused", spec["redis"], spec["consumer"])
    runtime = runtime_with(settings, model)
    config = runtime.stream_config(SOURCE)
    pipeline = runtime.pipeline(settings.collection(COLLECTION), 20 * 2**20)
    now = time.time()
    deliveries = [
        Delivery(f"{i + 1}-0", encode_event(event(f"cap-{i}", text)), now)
        for i, text in enumerate(_passages(int(words), docs))
    ]
    size = config.batch_max_events
    progress(f"capacity: {docs} passages of {words} words in batches of {size}")
    timings, chunks = [], []
    meter = CpuMeter(spec["redis"])
    for start in range(0, len(deliveries), size):
        seconds, batch_chunks = _prepare_and_embed(
            pipeline, deliveries[start : start + size]
        )
        timings.append((seconds, len(batch_chunks)))
        chunks.extend(batch_chunks)
    cpu = meter.cores()
    runtime.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    tokens = model.count_tokens([embedding_text(c) for c in chunks])
    seconds = sum(s for s, _ in timings)
    # Other processes may take the CPU for a while: the median batch is the
    # capacity, unmoved by one batch that shared the machine.
    rates = sorted(n / s for s, n in timings)
    return {
        "docs": docs,
        "chunks": len(chunks),
        "seconds": seconds,
        "chunks_per_s": len(chunks) / seconds,
        "median_chunks_per_s": rates[len(rates) // 2],
        "docs_per_s": docs / seconds,
        "tokens_per_chunk": sum(tokens) / len(tokens),
        "batch": size,
        "batches": len(timings),
        **cpu,
    }


def _prepare_and_embed(pipeline: Any, batch: Sequence[Any]) -> tuple[float, list[Any]]:
    """The consumer's work on one batch before its writes: seconds and chunks."""
    from ingestion.streaming.events import parse_event

    began = time.perf_counter()
    changes = [parse_event(d, source=SOURCE) for d in batch]
    prepared = [
        pipeline.prepare(c.document, c.document.content_hash)  # type: ignore[union-attr]
        for c in changes
    ]
    chunks = [chunk for doc in prepared for chunk in doc.chunks]
    pipeline.embed(chunks)
    return time.perf_counter() - began, chunks


# -- part 2: event-to-queryable latency ---------------------------------------------


def producer_main(spec_json: str) -> None:
    """Append events at a fixed rate, on a schedule kept by the clock; prints a summary.

    An event that is late (the process was not scheduled in time) is sent at
    once, so the events' count is kept; how late the producer ran is reported.
    """
    spec = json.loads(spec_json)
    settings = stream_settings(
        Path(spec["data_dir"]), spec["stream"], spec["redis"], spec["consumer"]
    )
    from ragline.runtime import Runtime

    runtime = Runtime(settings)
    texts = _passages(50, spec["count"])
    runtime.stream_backend(SOURCE)  # connect before the clock starts
    interval = 1.0 / spec["rate"]
    lateness = []
    started = time.perf_counter()
    for i, text in enumerate(texts):
        due = started + i * interval
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        lateness.append(time.perf_counter() - due)
        runtime.push(SOURCE, event(f"ev-{i:06d}", text))
    seconds = time.perf_counter() - started
    runtime.close()
    lateness.sort()
    print(
        json.dumps(
            {
                "sent": len(texts),
                "seconds": seconds,
                "started_at": time.time() - seconds,
                "late_p99_ms": 1000 * _at(lateness, 0.99),
                "late_max_ms": 1000 * lateness[-1],
            }
        )
    )


class _Collector:
    """Keeps every batch outcome the consumer reports; safe across threads."""

    def __init__(self) -> None:
        self.outcomes: list[Any] = []
        self.events = 0
        self._changed = threading.Condition()

    def __call__(self, outcome: Any) -> None:
        with self._changed:
            self.outcomes.append(outcome)
            self.events += outcome.events
            self._changed.notify_all()

    def wait_for(self, events: int, timeout_s: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.events >= events, timeout_s)


def latency_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs every load level in turn, each with a fresh data directory and stream."""
    model = warm_model()
    return {
        "levels": [
            _latency_level(model, spec, fraction) for fraction in spec["fractions"]
        ]
    }


def _latency_level(model: Any, spec: dict[str, Any], fraction: float) -> dict[str, Any]:
    rate = fraction * spec["capacity"]
    count = int(rate * spec["seconds"])
    label = f"{round(100 * fraction)}%"
    stream = f"ragline-bench-{uuid.uuid4().hex[:10]}"
    data_dir = fresh_dir(f"stream-latency-{round(100 * fraction)}")
    settings = stream_settings(data_dir, stream, spec["redis"], spec["consumer"])
    timed = TimedEmbedder(model)
    runtime = runtime_with(settings, timed)
    collector = _Collector()
    stop = threading.Event()
    consumer = threading.Thread(
        target=runtime.consume,
        args=(SOURCE, stop),
        kwargs={"on_batch": collector},
        name="bench-consumer",
    )
    try:
        _warm_consumer(runtime, consumer, collector)
        progress(f"latency {label}: {count} events at {rate:.1f}/s into {stream}")
        timed.seconds, meter, began = 0.0, CpuMeter(spec["redis"]), time.perf_counter()
        produced = _produce(spec, data_dir, stream, rate, count)
        left = WARMUP_EVENTS + count - collector.events
        drained = collector.wait_for(WARMUP_EVENTS + count, DRAIN_TIMEOUT_S)
        busy = timed.seconds / (time.perf_counter() - began)
        cpu = meter.cores()
        stop.set()
        consumer.join()
        result = _level_figures(collector, produced, rate, fraction)
        result.update(backlog_at_end=left, drained=drained, model_busy=busy, **cpu)
        result["verified"] = _verify(runtime, count)
    finally:
        stop.set()
        if consumer.is_alive():
            consumer.join()
        runtime.close()
        delete_stream(spec["redis"], stream)
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


def _warm_consumer(runtime: Any, consumer: threading.Thread, collector: Any) -> None:
    """Creates the stream, the group, the generation and the index before timing."""
    for i in range(WARMUP_EVENTS):
        runtime.push(SOURCE, event(f"warm-{i}", f"Warm-up event number {i}."))
    consumer.start()
    if not collector.wait_for(WARMUP_EVENTS, DRAIN_TIMEOUT_S):
        raise RuntimeError("the consumer did not apply the warm-up events in time")
    collector.outcomes.clear()


def _produce(
    spec: dict[str, Any], data_dir: Path, stream: str, rate: float, count: int
) -> dict[str, Any]:
    """Runs the producer in a process of its own, so it never waits for the GIL."""
    producer = {
        "data_dir": str(data_dir),
        "stream": stream,
        "redis": spec["redis"],
        "consumer": spec["consumer"],
        "rate": rate,
        "count": count,
    }
    completed = subprocess.run(
        [sys.executable, __file__, "--producer", json.dumps(producer)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _level_figures(
    collector: _Collector, produced: dict[str, Any], rate: float, fraction: float
) -> dict[str, Any]:
    lags = sorted(lag for outcome in collector.outcomes for lag in outcome.lags)
    # The last third of the run shows whether the lag still grows (no steady state).
    tail_from = produced["started_at"] + produced["seconds"] * 2 / 3
    tail = sorted(
        lag
        for outcome in collector.outcomes
        for lag in outcome.lags
        if outcome.committed_at - lag >= tail_from
    )
    sizes = [outcome.events for outcome in collector.outcomes]
    return {
        "fraction": fraction,
        "rate": rate,
        "events": len(lags),
        "sent": produced["sent"],
        "achieved_rate": produced["sent"] / produced["seconds"],
        "late_max_ms": produced["late_max_ms"],
        "batches": len(sizes),
        "mean_batch": sum(sizes) / max(1, len(sizes)),
        "max_batch": max(sizes, default=0),
        "p50_s": _at(lags, 0.50),
        "p95_s": _at(lags, 0.95),
        "max_s": lags[-1] if lags else float("nan"),
        "tail_p95_s": _at(tail, 0.95),
    }


def _verify(runtime: Any, count: int) -> dict[str, int]:
    """Looks a sample of the pushed documents up in the catalog and by search."""
    from ingestion.models import make_doc_id

    texts = _passages(50, count)
    step = max(1, count // VERIFY_SAMPLE)
    sample = sorted({*range(0, count, step), count - 1})[:VERIFY_SAMPLE]
    doc_ids = {make_doc_id(SOURCE, f"ev-{i:06d}"): i for i in sample}
    generation = runtime.catalog.live_generation(COLLECTION)
    states = runtime.catalog.document_states(generation.id, SOURCE, list(doc_ids))
    indexed = sum(1 for s in states.values() if s.status == "indexed")
    found = 0
    for doc_id, i in doc_ids.items():
        hits = runtime.search(COLLECTION, texts[i], 3)
        found += any(hit.doc_id == doc_id for hit in hits)
    return {"sample": len(doc_ids), "indexed": indexed, "found": found}


# -- part 3: streaming against batch throughput -------------------------------------


def batch_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The documents as files in a folder, ingested by a ``files`` source."""
    model = warm_model()
    texts = _passages(50, spec["docs"])
    folder = fresh_dir("stream-throughput-files")
    for i, text in enumerate(texts):
        (folder / f"doc-{i:05d}.md").write_text(text + "\n", encoding="utf-8")
    data_dir = fresh_dir("stream-throughput-batch")
    timed = TimedEmbedder(model)
    runtime = runtime_with(manual_settings(data_dir, folder, ["*.md"]), timed)
    progress(f"throughput: batch ingest of {len(texts)} files")
    meter, started = CpuMeter(spec["redis"]), time.perf_counter()
    [report] = runtime.ingest()
    seconds = time.perf_counter() - started
    cpu = meter.cores()
    runtime.close()
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "docs": report.added,
        "chunks": report.chunks_written,
        "seconds": seconds,
        "batch": f"{runtime.settings.ingest.batch_chunks} chunks",
        "model_share": timed.seconds / seconds,
        **cpu,
        "peak_rss_mb": peak_rss_mb(),
    }


def stream_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The same documents pushed as events first, then consumed from the backlog."""
    model = warm_model()
    texts = _passages(50, spec["docs"])
    stream = f"ragline-bench-{uuid.uuid4().hex[:10]}"
    data_dir = fresh_dir("stream-throughput-stream")
    settings = stream_settings(data_dir, stream, spec["redis"], spec["consumer"])
    timed = TimedEmbedder(model)
    runtime = runtime_with(settings, timed)
    try:
        for i, text in enumerate(texts):
            runtime.push(SOURCE, event(f"doc-{i:05d}", text))
        progress(f"throughput: consuming a backlog of {len(texts)} events")
        meter, started = CpuMeter(spec["redis"]), time.perf_counter()
        stats = runtime.consume(SOURCE, max_events=len(texts), idle_exit_s=10.0)
        seconds = time.perf_counter() - started
        cpu = meter.cores()
        generation = runtime.catalog.live_generation(COLLECTION)
        states = runtime.catalog.document_states(generation.id, SOURCE)
    finally:
        runtime.close()
        delete_stream(spec["redis"], stream)
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "docs": sum(1 for s in states.values() if s.status == "indexed"),
        "events": stats.events,
        "batches": stats.batches,
        "seconds": seconds,
        "batch": f"{settings.source(SOURCE).batch_max_events} events",
        "model_share": timed.seconds / seconds,
        **cpu,
        "peak_rss_mb": peak_rss_mb(),
    }


WORKERS = {
    "capacity": capacity_worker,
    "latency": latency_worker,
    "batch": batch_worker,
    "stream": stream_worker,
}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    print(json.dumps(WORKERS[spec["kind"]](spec)))


# -- report -------------------------------------------------------------------------


def _at(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def print_capacity(capacity: dict[str, Any]) -> None:
    rows = [
        [
            f"{words} words",
            c["docs"],
            c["chunks"],
            c["tokens_per_chunk"],
            c["seconds"],
            c["chunks_per_s"],
            c["median_chunks_per_s"],
            c["docs_per_s"],
            c["other_cores"],
        ]
        for words, c in capacity.items()
    ]
    batch = next(iter(capacity.values()))["batch"]
    print_table(
        "Embedder capacity: parse event + prepare + embed (through the catalog's "
        f"cache), batches of {batch}",
        [
            "event size",
            "docs",
            "chunks",
            "tokens/chunk",
            "s",
            "chunks/s",
            "median batch chunks/s",
            "docs/s",
            "other procs' cores",
        ],
        rows,
    )


def _level(fraction: float) -> str:
    return f"{round(100 * fraction)}%"


def print_latency(levels: list[dict[str, Any]], capacity: float) -> None:
    rows = []
    for level in levels:
        goal = P95_GOALS_S.get(level["fraction"])
        verdict = "-" if goal is None else "met"
        if goal is not None and not level["p95_s"] <= goal:
            verdict = "MISSED"
        rows.append(
            [
                _level(level["fraction"]),
                level["rate"],
                level["achieved_rate"],
                level["events"],
                level["mean_batch"],
                level["p50_s"],
                level["p95_s"],
                level["tail_p95_s"],
                level["max_s"],
                f"<= {goal:.0f}" if goal else "-",
                verdict,
            ]
        )
    print_table(
        f"Event-to-queryable latency in s, at fractions of the capacity "
        f"({capacity:.1f} chunks/s, the median batch above)",
        [
            "load",
            "rate/s",
            "sent/s",
            "events",
            "mean batch",
            "p50",
            "p95",
            "p95 last third",
            "max",
            "p95 goal",
            "",
        ],
        rows,
    )
    print_table(
        "The same levels: where the CPU went, what was left behind, what is queryable",
        [
            "load",
            "model busy",
            "bench cores",
            "redis cores",
            "other procs' cores",
            "backlog at producer end",
            "indexed/found/sample",
        ],
        [
            [
                _level(level["fraction"]),
                f"{100 * level['model_busy']:.0f}%",
                level["bench_cores"],
                level["redis_cores"],
                level["other_cores"],
                level["backlog_at_end"]
                if level["drained"]
                else f"{level['backlog_at_end']} (never drained)",
                "{indexed}/{found}/{sample}".format(**level["verified"]),
            ]
            for level in levels
        ],
    )
    late = max(level["late_max_ms"] for level in levels)
    print(
        f"  model busy: share of the level's time the model spent encoding; bench "
        f"cores: consumer process and producer; producer at most {late:.0f} ms "
        "behind its schedule"
    )
    print(
        "  indexed/found/sample: of a sample of pushed documents, how many the "
        "catalog holds as indexed and how many a search for their text finds"
    )


def print_throughput(
    batches: list[dict[str, Any]], streams: list[dict[str, Any]]
) -> None:
    rows = []
    for name, runs in (
        ("files source, runtime.ingest", batches),
        ("stream backlog, runtime.consume", streams),
    ):
        for i, run in enumerate(runs, start=1):
            rows.append(
                [
                    f"{name} #{i}",
                    run["docs"],
                    run["batch"],
                    run["seconds"],
                    run["docs"] / run["seconds"],
                    f"{100 * run['model_share']:.0f}%",
                    run["other_cores"],
                    run["peak_rss_mb"],
                ]
            )
    print_table(
        f"Throughput on the same {batches[0]['docs']} 50-word documents, runs "
        "interleaved (model loaded and warmed first, not timed)",
        [
            "path, run",
            "docs",
            "batch size",
            "s",
            "docs/s",
            "model share",
            "other procs' cores",
            "peak MB",
        ],
        rows,
    )
    batch_rate = max(run["docs"] / run["seconds"] for run in batches)
    stream_rate = max(run["docs"] / run["seconds"] for run in streams)
    ratio = stream_rate / batch_rate
    verdict = "met" if ratio >= THROUGHPUT_GOAL else "MISSED"
    print(
        f"stream / batch throughput (best run of each): {stream_rate:.1f} / "
        f"{batch_rate:.1f} docs/s = {ratio:.3f}   (goal >= {THROUGHPUT_GOAL}: "
        f"{verdict})"
    )


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manual", type=Path, default=MANUAL)
    parser.add_argument(
        "--seconds", type=float, default=25.0, help="producer time per load level"
    )
    parser.add_argument(
        "--docs", type=int, default=800, help="documents of the throughput part"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of each throughput path, interleaved; the best run counts",
    )
    parser.add_argument(
        "--capacity-docs",
        type=int,
        default=768,
        help="50-word passages timed for capacity (fewer of the longer sizes)",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--batch-max-events", type=int, default=None, help="default: the source's"
    )
    parser.add_argument(
        "--batch-max-wait", type=int, default=None, help="in ms; default: the source's"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--producer", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def consumer_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.batch_max_events is not None:
        overrides["batch_max_events"] = args.batch_max_events
    if args.batch_max_wait is not None:
        overrides["batch_max_wait"] = f"{args.batch_max_wait}ms"
    return overrides


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    if args.producer:
        producer_main(args.producer)
        return 0
    if not (args.manual / "index.html").exists():
        raise SystemExit(f"{args.manual} is missing; run `bash bench/prepare corpus`.")
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    load_passages(args.manual)
    consumer = consumer_overrides(args)
    common = {"redis": args.redis, "consumer": consumer}
    script = Path(__file__)

    # The longer sizes are for reference: a sixth, then a twelfth as many.
    docs = {
        str(words): args.capacity_docs // (1 if words == SIZES[0] else 6 * words // 100)
        for words in SIZES
    }
    capacity = run_worker(script, {"kind": "capacity", "docs": docs, **common})
    rate = capacity[str(SIZES[0])]["median_chunks_per_s"]
    progress(f"capacity: {rate:.1f} chunks/s of {SIZES[0]}-word events")
    latency = run_worker(
        script,
        {
            "kind": "latency",
            "capacity": rate,
            "fractions": list(LOAD_FRACTIONS),
            "seconds": args.seconds,
            **common,
        },
    )
    batches, streams = [], []
    for _ in range(args.repeats):
        batches.append(
            run_worker(script, {"kind": "batch", "docs": args.docs, **common})
        )
        streams.append(
            run_worker(script, {"kind": "stream", "docs": args.docs, **common})
        )

    settings = stream_settings(CACHE, "unused", args.redis, consumer)
    config = settings.source(SOURCE)
    print(
        f"\nconsumer settings: batch_max_events={config.batch_max_events} "
        f"batch_max_wait={config.batch_max_wait.total_seconds() * 1000:.0f}ms "
        f"poll_wait={config.poll_wait.total_seconds():.1f}s"
        + (" (set by this run's options)" if consumer else " (the defaults)")
    )
    print(
        f"machine: {os.cpu_count()} cores, load average {load_at_start:.2f} at the "
        "start; 'other procs' cores' is the CPU other processes of the machine took "
        "while a figure was measured"
    )
    print(
        f"latency: {args.seconds:.0f} s of events per level, each level in a fresh "
        "data directory and stream; the consumer is Runtime.consume in a thread, "
        "the producer a process of its own (Runtime.push)"
    )
    print_capacity(capacity)
    print_latency(latency["levels"], rate)
    print_throughput(batches, streams)
    print(f"\ntotal benchmark time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1:]))
