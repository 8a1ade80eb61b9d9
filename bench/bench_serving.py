"""The HTTP service under load: /search at 100k chunks, micro-batching, /ask, streaming.

Prints, in one run, each figure beside its baseline:

* ``/search`` latency (p50, p99), one client, over a collection of 100k
  chunks (``--chunks``);
* ``/search`` throughput at 16 concurrent connections of ``wrk`` with query
  micro-batching
  and without it, as a ratio (goal: at least 2), in dense mode (where the
  query embedding is most of the work) and in hybrid mode (where the lexical
  search takes its share);
* ``/ask`` p50 on a cache hit (goal: under 3 ms) and on a miss, the miss
  split into retrieval and generation as the service reports them;
* time to the first streamed token of ``/ask``, beside the whole answer;
* the service's peak resident memory in each configuration.

The service runs as ``ragline serve`` in a process of its own and is called
over real HTTP from this one, so each figure includes the HTTP round trip.

The collection holds real text of the Python 3.11 manual. Embedding 100k
chunks with MiniLM takes over an hour on two cores, so only ``--base``
chunks of the manual are embedded for real; the collection holds copies of
them, each copy a revision with its own line of text and its vector its
base's plus noise (cosine about 0.9 to the base), the spread real
near-duplicates have. Queries are the question set of
``bench/manual_questions.jsonl`` and are embedded for real by the service.

Usage: python bench/bench_serving.py [--chunks N] [--base N] [--clients N]
    [--seconds S] [--asks N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench._util import REPO, latency_ms, print_table, progress

CACHE = REPO / "bench" / ".cache"
MANUAL = Path("/usr/share/doc/python3.11/html")
QUESTIONS = REPO / "bench" / "manual_questions.jsonl"
RAGLINE = Path(sys.executable).parent / "ragline"
# The first pages of the library reference give the base passages.
BASE_PAGES = "library/*.html"
RECORDS_PER_FILE = 1000
THROUGHPUT_MODES = ("dense", "hybrid")
EXACT_MAX = 50_000  # FAISS searches exactly up to this many vectors by default
NOISE_NORM = 0.45  # cosine of a copy to its base: about 1 / sqrt(1 + 0.45**2)
_REVISION = re.compile(r"Revision (\d+) of passage (\d+)\.$")


# -- the corpus ---------------------------------------------------------------


def base_passages(count: int, manual: Path) -> tuple[list[str], np.ndarray]:
    """``count`` chunk texts of the manual and their real embeddings (cached)."""
    cached = CACHE / f"serving-base-{count}.npz"
    if cached.exists():
        saved = np.load(cached, allow_pickle=False)
        return [str(t) for t in saved["texts"]], saved["vectors"]
    from ingestion.chunking import Chunker, embedding_text
    from ingestion.config import ChunkingConfig, EmbedderConfig
    from ingestion.embedding import SentenceTransformerEmbedder
    from ingestion.models import SourceDocument
    from ingestion.parsing import parse

    progress(f"chunking the manual for {count} base passages")
    embedder = SentenceTransformerEmbedder(EmbedderConfig())

    chunker = Chunker(ChunkingConfig(max_tokens=160), embedder.count_tokens)
    texts: list[str] = []
    for page in sorted(manual.glob(BASE_PAGES)):
        document = SourceDocument(
            source="manual",
            key=page.name,
            uri=page.as_uri(),
            content=page.read_bytes(),
            media_type="text/html",
        )
        chunks = chunker.chunk(document.doc_id, "base", parse(document))
        candidates = [embedding_text(c) for c in chunks if len(c.text) > 80]
        sizes = embedder.count_tokens(candidates)
        # Short enough that a revision stays one chunk of the collection.
        texts += [t for t, n in zip(candidates, sizes, strict=True) if n <= 200]
        if len(texts) >= count:
            break
    texts = texts[:count]
    progress(f"embedding {len(texts)} base passages with the real model")
    vectors = embedder.embed(texts)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cached, texts=np.asarray(texts), vectors=vectors)
    return texts, vectors


def write_records(folder: Path, texts: Sequence[str], total: int) -> None:
    """``total`` JSONL records, revision r of passage b, in files of 1,000."""
    folder.mkdir(parents=True)
    for start in range(0, total, RECORDS_PER_FILE):
        path = folder / f"revisions-{start // RECORDS_PER_FILE:04d}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for i in range(start, min(total, start + RECORDS_PER_FILE)):
                base, revision = i % len(texts), i // len(texts)
                text = f"{texts[base]}\n\nRevision {revision} of passage {base}."
                record = {"id": f"p{base}-r{revision}", "text": text}
                handle.write(json.dumps(record) + "\n")


class RevisionEmbedder:
    """The real model's vector of a revision's base passage, plus seeded noise.

    Stands in for the model while the benchmark collection is ingested; the
    service embeds queries with the real model, whose id this one carries.
    """

    def __init__(self, real: Any, base_vectors: np.ndarray) -> None:
        self._real = real
        self._base = base_vectors

    @property
    def model_id(self) -> str:
        return str(self._real.model_id)

    @property
    def dim(self) -> int:
        return int(self._real.dim)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return list(self._real.count_tokens(texts))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            match = _REVISION.search(text)
            if match is None:  # a piece of a revision the chunker split: rare
                rows.append(self._real.embed([text])[0])
                continue
            revision, base = int(match[1]), int(match[2])
            rng = np.random.default_rng(base * 100_003 + revision)
            noise = rng.standard_normal(self.dim).astype(np.float32)
            row = self._base[base] + NOISE_NORM * noise / np.linalg.norm(noise)
            rows.append(row / np.linalg.norm(row))
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)


def settings_raw(data_dir: Path, batching: bool, port: int) -> dict[str, Any]:
    return {
        "data_dir": str(data_dir),
        "logging": {"level": "WARNING"},
        "chunking": {"max_tokens": 256, "overlap_tokens": 0},
        "ingest": {"batch_chunks": 4096},
        "collections": [{"name": "manual", "index": "faiss"}],
        "retrieval": {"batching": {"enabled": batching}},
        "serve": {"port": port, "generator": {"seed": 7, "max_tokens": 96}},
        "sources": [
            {
                "name": "pymanual",
                "type": "files",
                "collection": "manual",
                "path": str(data_dir / "corpus"),
                "include": ["*.jsonl"],
            }
        ],
    }


def build_collection(
    data_dir: Path, chunks: int, base: int, manual: Path
) -> dict[str, Any]:
    """Ingest ``chunks`` revisions through ragline's own sync (reused when present)."""
    marker = data_dir / "built.json"
    if marker.exists() and json.loads(marker.read_text()).get("chunks") == chunks:
        return dict(json.loads(marker.read_text()))
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    texts, vectors = base_passages(base, manual)
    write_records(data_dir / "corpus", texts, chunks)

    from ingestion.embedding import CachedEmbedder
    from ragline.runtime import Runtime
    from ragline.settings import parse_settings

    settings = parse_settings(
        settings_raw(data_dir, True, 1), base_dir=REPO, origin="bench"
    )
    runtime = Runtime(settings)
    try:
        config = settings.embedder_for(settings.collections[0])
        real = runtime.embedder(settings.collections[0]).inner
        runtime._embedders[config] = CachedEmbedder(
            RevisionEmbedder(real, vectors), runtime.catalog
        )
        progress(f"ingesting {chunks} chunks")
        started = time.perf_counter()
        [report] = runtime.ingest()
        seconds = time.perf_counter() - started
    finally:
        runtime.close()
    built = {"chunks": chunks, "written": report.chunks_written, "seconds": seconds}
    progress(f"ingested {report.chunks_written} chunks in {seconds:.0f}s")
    marker.write_text(json.dumps(built))
    return built


# -- the service --------------------------------------------------------------


class Service:
    """``ragline serve`` in a process of its own, on a free port."""

    def __init__(self, data_dir: Path, batching: bool) -> None:
        self.port = _free_port()
        config = data_dir / f"serve-{'batched' if batching else 'single'}.yaml"
        config.write_text(json.dumps(settings_raw(data_dir, batching, self.port)))
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = (data_dir / "serve.log").open("ab")
        self._process = subprocess.Popen(
            [str(RAGLINE), "--config", str(config), "serve"],
            stdout=self._log,
            stderr=self._log,
        )

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise SystemExit(
                    f"ragline serve exited with {self._process.returncode}; "
                    f"see {self._log.name}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"ragline serve was not ready in {timeout:.0f}s")

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self._process.pid}/status").read_text()
        kb = next(line for line in status.splitlines() if line.startswith("VmHWM"))
        return int(kb.split()[1]) / 1024

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- measurements -------------------------------------------------------------


def questions() -> list[str]:
    with QUESTIONS.open(encoding="utf-8") as handle:
        return [json.loads(line)["question"] for line in handle if line.strip()]


def _cycle(items: Sequence[str]) -> Iterator[str]:
    while True:
        yield from items


async def search_latency(
    url: str, queries: Sequence[str], rounds: int
) -> dict[str, float]:
    import httpx

    seconds = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for query in list(queries) * rounds:
            started = time.perf_counter()
            response = await client.post(
                "/search", json={"query": query, "collection": "manual", "top_k": 10}
            )
            seconds.append(time.perf_counter() - started)
            response.raise_for_status()
    return latency_ms(seconds)


def search_throughput(
    url: str, queries: Sequence[str], clients: int, seconds: float, mode: str
) -> dict[str, float]:
    """Requests per second of ``clients`` connections, each waiting for its answer.

    The load comes from ``wrk``, a load generator in C: a Python client
    would take a large share of two cores from the service it measures.
    """
    bodies = [
        json.dumps({"query": q, "collection": "manual", "top_k": 10, "mode": mode})
        for q in queries
    ]
    script = CACHE / f"wrk-search-{mode}.lua"
    script.write_text(
        "local bodies = {"
        + ", ".join(_lua_string(b) for b in bodies)
        + "}\nlocal i = 0\nwrk.method = 'POST'\n"
        "wrk.headers['Content-Type'] = 'application/json'\n"
        "request = function()\n  i = i % #bodies + 1\n"
        "  return wrk.format(nil, '/search', nil, bodies[i])\nend\n"
    )

    def wrk(duration: float) -> str:
        command = [
            "wrk",
            "-t1",
            f"-c{clients}",
            f"-d{duration:.0f}s",
            "--latency",
            "-s",
            str(script),
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        if "Non-2xx" in done.stdout:
            raise SystemExit(f"/search answered errors under load:\n{done.stdout}")
        return done.stdout

    wrk(3)  # warm-up at full concurrency, not counted
    report = wrk(seconds)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", report)[1])  # type: ignore[index]
    return {
        "rps": rps,
        "p50": _wrk_ms(report, "50%"),
        "p99": _wrk_ms(report, "99%"),
    }


def _lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _wrk_ms(report: str, percentile: str) -> float:
    match = re.search(rf"{re.escape(percentile)}\s+([\d.]+)(us|ms|s)\b", report)
    if match is None:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match[2]]
    return float(match[1]) * scale


async def ask_figures(
    url: str, asked: Sequence[str], streamed: Sequence[str]
) -> dict[str, dict[str, float]]:
    import httpx

    miss, hit, retrieve, generate, first_token, whole = [], [], [], [], [], []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for question in asked:
            body = {"question": question, "collection": "manual", "top_k": 4}
            started = time.perf_counter()
            response = await client.post("/ask", json=body)
            miss.append(time.perf_counter() - started)
            payload = response.json()
            assert response.status_code == 200, payload
            assert not payload["cached"], payload
            retrieve.append(payload["timings"]["retrieve_ms"] / 1000)
            generate.append(payload["timings"]["generate_ms"] / 1000)
        for question in asked:
            body = {"question": question, "collection": "manual", "top_k": 4}
            started = time.perf_counter()
            response = await client.post("/ask", json=body)
            hit.append(time.perf_counter() - started)
            assert response.json()["cached"], response.text
        for question in streamed:
            body = {"question": question, "collection": "manual", "stream": True}
            started = time.perf_counter()
            first = None
            async with client.stream("POST", "/ask", json=body) as response:
                async for line in response.aiter_lines():
                    if first is None and line.startswith("event: token"):
                        first = time.perf_counter() - started
            whole.append(time.perf_counter() - started)
            first_token.append(first if first is not None else whole[-1])
    return {
        "miss": latency_ms(miss),
        "hit": latency_ms(hit),
        "retrieve": latency_ms(retrieve),
        "generate": latency_ms(generate),
        "first_token": latency_ms(first_token),
        "whole": latency_ms(whole),
    }


# -- the run ------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manual", type=Path, default=MANUAL)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--base", type=int, default=2_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--asks", type=int, default=16)
    args = parser.parse_args()
    if not (args.manual / "index.html").exists():
        raise SystemExit(f"{args.manual} is missing; run `bash bench/prepare` first.")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing; run `bash bench/prepare` first.")

    data_dir = CACHE / f"serving-{args.chunks}"
    built = build_collection(data_dir, args.chunks, args.base, args.manual)
    queries = questions()

    figures: dict[str, Any] = {}
    for batching in (False, True):
        name = "batched" if batching else "one at a time"
        progress(f"starting the service, micro-batching {name}")
        service = Service(data_dir, batching)
        try:
            service.wait_ready()
            run: dict[str, Any] = {}
            run["latency"] = asyncio.run(search_latency(service.url, queries, 2))
            for mode in THROUGHPUT_MODES:
                progress(
                    f"/search {mode} at {args.clients} clients, {args.seconds:.0f}s"
                )
                run[f"throughput-{mode}"] = search_throughput(
                    service.url, queries, args.clients, args.seconds, mode
                )
            if batching:
                progress(f"/ask: {args.asks} misses, hits, streams")
                asked = queries[: args.asks]
                streamed = queries[args.asks : args.asks + max(4, args.asks // 2)]
                run["ask"] = asyncio.run(ask_figures(service.url, asked, streamed))
            run["peak_rss_mb"] = service.peak_rss_mb()
        finally:
            service.stop()
        figures[name] = run

    report(built, figures, args)


def report(built: dict[str, Any], figures: dict[str, Any], args: Any) -> None:
    single, batched = figures["one at a time"], figures["batched"]
    print(
        f"\ncollection: {built['chunks']:,} chunks of Python manual text "
        f"({args.base:,} real passages and their revisions), FAISS "
        f"({'HNSW' if built['chunks'] > EXACT_MAX else 'exact'}), hybrid search; "
        "ragline serve over HTTP"
    )
    print_table(
        "/search, one client, top_k=10",
        ["micro-batching", "p50 ms", "p99 ms", "mean ms", "service peak MB"],
        [
            [
                name,
                r["latency"]["p50"],
                r["latency"]["p99"],
                r["latency"]["mean"],
                r["peak_rss_mb"],
            ]
            for name, r in figures.items()
        ],
    )
    rows = [
        [
            mode,
            name,
            r[f"throughput-{mode}"]["rps"],
            r[f"throughput-{mode}"]["p50"],
            r[f"throughput-{mode}"]["p99"],
        ]
        for mode in THROUGHPUT_MODES
        for name, r in figures.items()
    ]
    print_table(
        f"/search, {args.clients} concurrent wrk connections for {args.seconds:.0f}s",
        ["mode", "micro-batching", "requests/s", "p50 ms", "p99 ms"],
        rows,
    )
    print()
    for mode in THROUGHPUT_MODES:
        ratio = (
            batched[f"throughput-{mode}"]["rps"] / single[f"throughput-{mode}"]["rps"]
        )
        print(
            f"{mode} throughput with micro-batching / without: {ratio:.2f}   "
            "(goal >= 2)"
        )

    ask = batched["ask"]
    print_table(
        f"/ask over HTTP ({args.asks} questions, SmolLM2-135M, top_k=4)",
        ["what", "p50 ms", "p99 ms", "mean ms"],
        [
            ["miss: whole request", *_three(ask["miss"])],
            ["miss: retrieval (service)", *_three(ask["retrieve"])],
            ["miss: generation (service)", *_three(ask["generate"])],
            ["hit: whole request", *_three(ask["hit"])],
            ["stream: first token", *_three(ask["first_token"])],
            ["stream: whole answer", *_three(ask["whole"])],
        ],
    )
    print(f"\n/ask p50 on a cache hit: {ask['hit']['p50']:.2f} ms   (goal < 3 ms)")
    print(
        f"/ask p50 on a miss: {ask['miss']['p50']:.0f} ms, of which retrieval "
        f"{ask['retrieve']['p50']:.0f} ms and generation {ask['generate']['p50']:.0f} ms"
    )


def _three(figure: dict[str, float]) -> list[float]:
    return [figure["p50"], figure["p99"], figure["mean"]]


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
