"""Benchmark of the vector index backends: build time, latency, recall, memory, flush cost.

Usage::

    python bench/bench_vectors.py [--sizes 100000,1000000] [--qdrant-size 100000]
        [--queries 1000] [--real-vectors FILE.npy] [--hnsw-m M]
        [--ef-construction EF]

Synthetic data is clustered like real embeddings: a Gaussian mixture of
4,000 centres on the unit sphere in 384 dimensions, gathered around 50
topics; each point is its centre plus noise, normalised. Most of the noise
(norm 0.7) lies in 16 directions of the centre's own, a little (norm 0.2) in
all 384, because real embeddings vary along few directions locally: with
noise in all directions alike, every point of a cluster would be about as far
from every other, which real data never is. The mixture is calibrated on
MiniLM embeddings of the Python manual's paragraphs (55k vectors): there a
held-out query's best match scores 0.80 and its tenth 0.62 on average; in the
mixture, at the same size, 0.80 and 0.60. Queries are drawn the same way,
never from the data.
``--real-vectors`` takes an ``N x 384`` float32 array of real embeddings; a
held-out sample of its rows, slightly perturbed, are the queries and the
other rows the data.

Every configuration runs through ragline's own index classes, in a
subprocess of its own so that its peak memory (RSS high-water mark) is its
own; it includes some 400 MB of interpreter, libraries and data generator.
Latencies are of one query at a time, k=10; recall@10 is against the exact
(flat) search of the same data. The flush rounds write synthetic vectors,
also on real data. Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench._util import latency_ms, peak_rss_mb, print_table, progress, run_worker
from index.config import FaissConfig, QdrantConfig
from index.vectors import FaissVectorIndex, QdrantVectorIndex, VectorIndex
from index.vectors.base import IdArray, VectorArray

DIM = 384
K = 10
TOPICS = 50
CENTRES = 4000  # 80 per topic
CENTRE_NOISE_NORM = 1.0
LOCAL_RANK = 16
LOCAL_NOISE_NORM = 0.7
NOISE_NORM = 0.2
GENERATE_ROWS = 4096  # rows generated at a time (bounds the temporary arrays)
QUERY_NOISE_NORM = 0.1  # perturbation of held-out real vectors
BLOCK_ROWS = 50_000
EF_SWEEP = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768)
FLAT_LATENCY_QUERIES = 200
QDRANT_LATENCY_QUERIES = 300
FLUSH_ROUNDS = 20
FLUSH_UPSERTS = 300
FLUSH_DELETES = 30
TARGET_RECALL = 0.95
TARGET_P50_MS = 2.0


# -- data -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """Where the vectors and queries of one run come from; ``n`` rows of data."""

    n: int
    queries: int
    seed: int = 7
    real: str | None = None

    @property
    def label(self) -> str:
        return f"{'real' if self.real else 'synthetic'} {self.n:,}"

    def blocks(self) -> Iterator[tuple[IdArray, VectorArray]]:
        """(ids, vectors) blocks of the data, ids 1..n, the same on every call."""
        rows = self._real_rows() if self.real else None
        for block, start in enumerate(range(0, self.n, BLOCK_ROWS)):
            stop = min(start + BLOCK_ROWS, self.n)
            ids = np.arange(start + 1, stop + 1, dtype=np.int64)
            if rows is None:
                vectors = self._mixture(
                    stop - start, np.random.default_rng([self.seed, block])
                )
            else:
                vectors = _normalised(self._real_array()[np.sort(rows[start:stop])])
            yield ids, vectors

    def query_vectors(self) -> VectorArray:
        rng = np.random.default_rng([self.seed, 1_000_000])
        if not self.real:
            return self._mixture(self.queries, rng)
        held_out = self._real_array()[np.sort(self._held_out())]
        noise = rng.normal(size=held_out.shape) * QUERY_NOISE_NORM / np.sqrt(DIM)
        return _normalised(held_out + noise)

    def extra_vectors(self, count: int, round_: int) -> VectorArray:
        """Fresh vectors like the data's, for write rounds."""
        return self._mixture(
            count, np.random.default_rng([self.seed, 2_000_000, round_])
        )

    def _mixture(self, count: int, rng: np.random.Generator) -> VectorArray:
        centres, directions = _mixture_model(self.seed)
        parts = []
        for start in range(0, count, GENERATE_ROWS):
            size = min(GENERATE_ROWS, count - start)
            picks = rng.integers(0, CENTRES, size=size)
            weights = rng.normal(size=(size, LOCAL_RANK)).astype(np.float32)
            weights *= LOCAL_NOISE_NORM / np.sqrt(LOCAL_RANK)
            local = np.einsum("nr,nrd->nd", weights, directions[picks])
            noise = rng.normal(size=(size, DIM)).astype(np.float32)
            noise *= NOISE_NORM / np.sqrt(DIM)
            parts.append(_normalised(centres[picks] + local + noise))
        return np.concatenate(parts)

    def _real_array(self) -> np.ndarray[Any, Any]:
        if self.real is None:
            raise ValueError("these data are synthetic: there is no vectors file")
        return np.load(self.real, mmap_mode="r")

    def _held_out(self) -> IdArray:
        total = self._real_array().shape[0]
        rng = np.random.default_rng([self.seed, 3_000_000])
        return rng.choice(total, size=self.queries, replace=False)

    def _real_rows(self) -> IdArray:
        total = self._real_array().shape[0]
        keep = np.ones(total, dtype=bool)
        keep[self._held_out()] = False
        return np.flatnonzero(keep)[: self.n]


@functools.cache
def _mixture_model(seed: int) -> tuple[VectorArray, VectorArray]:
    """The mixture's centres and each centre's own noise directions.

    Centres lie near ``TOPICS`` topic directions; each has ``LOCAL_RANK``
    random directions of unit norm on average.
    """
    rng = np.random.default_rng([seed, 4_000_000])
    topics = _normalised(rng.normal(size=(TOPICS, DIM)))
    spread = rng.normal(size=(CENTRES, DIM)) * CENTRE_NOISE_NORM / np.sqrt(DIM)
    centres = _normalised(np.repeat(topics, CENTRES // TOPICS, axis=0) + spread)
    directions = rng.normal(size=(CENTRES, LOCAL_RANK, DIM)).astype(np.float32)
    return centres, directions / np.float32(np.sqrt(DIM))


def _normalised(vectors: np.ndarray[Any, Any]) -> VectorArray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# -- measuring --------------------------------------------------------------------------


def upsert_all(index: VectorIndex, data: Data, what: str) -> float:
    """Write every block of ``data``; returns the seconds spent in ``upsert``."""
    spent = 0.0
    for ids, vectors in data.blocks():
        started = time.perf_counter()
        index.upsert(ids, vectors)
        spent += time.perf_counter() - started
        progress(
            f"{what}: {int(ids[-1]):,}/{data.n:,} rows written, {spent:.1f} s in upsert"
        )
    return spent


def time_queries(
    index: VectorIndex, queries: VectorArray
) -> tuple[list[float], np.ndarray[Any, Any]]:
    """Per-query latencies (one query per call, after a warm-up) and the ids found."""
    for row in queries[:10]:
        index.search(row[None, :], K)
    seconds: list[float] = []
    found = np.zeros((queries.shape[0], K), dtype=np.int64)
    for i, row in enumerate(queries):
        started = time.perf_counter()
        hits = index.search(row[None, :], K)[0]
        seconds.append(time.perf_counter() - started)
        found[i, : len(hits)] = [hit.id for hit in hits]
    return seconds, found


def recall_at_k(found: np.ndarray[Any, Any], truth: np.ndarray[Any, Any]) -> float:
    hits = sum(
        len(set(f.tolist()) & set(t.tolist()))
        for f, t in zip(found, truth, strict=True)
    )
    return hits / (K * found.shape[0])


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


# -- workers (one configuration each, in a subprocess) ------------------------------------


def flat_worker(
    data: Data, truth_path: Path, options: dict[str, int]
) -> dict[str, Any]:
    """Exact search: latency baseline, and the ground truth saved for the others."""
    # The index is closed without a flush on purpose: nothing needs keeping.
    logging.getLogger("index.vectors.faiss").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        config = FaissConfig(exact_max_vectors=data.n)
        index = FaissVectorIndex(Path(tmp) / "flat", dim=DIM, config=config)
        build_s = upsert_all(index, data, f"flat {data.label}")
        queries = data.query_vectors()
        progress(f"flat {data.label}: timing {FLAT_LATENCY_QUERIES} single queries")
        seconds, _ = time_queries(index, queries[:FLAT_LATENCY_QUERIES])
        progress(f"flat {data.label}: exact top-{K} of {queries.shape[0]} queries")
        truth = index.search(queries, K)
        index.close()
    np.save(
        truth_path, np.array([[hit.id for hit in row] for row in truth], dtype=np.int64)
    )
    return {"build_s": build_s, "latency": latency_ms(seconds), "rss_mb": peak_rss_mb()}


def hnsw_worker(
    data: Data, truth_path: Path, options: dict[str, int]
) -> dict[str, Any]:
    """FAISS HNSW: build, latency and recall, an ef_search sweep, then flush cost."""
    config = FaissConfig(**{**options, "exact_max_vectors": 0})
    truth = np.load(truth_path)
    queries = data.query_vectors()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hnsw"
        index = FaissVectorIndex(folder, dim=DIM, config=config)
        result: dict[str, Any] = {
            "build_s": upsert_all(index, data, f"hnsw {data.label}")
        }
        result["default_ef"] = index.ef_search
        result["hnsw_m"], result["ef_construction"] = (
            config.hnsw_m,
            config.ef_construction,
        )
        seconds, found = time_queries(index, queries)
        result["latency"] = latency_ms(seconds)
        result["recall"] = recall_at_k(found, truth)
        result["sweep"] = ef_sweep(index, queries, truth, data.label)
        result["serving_rss_mb"] = peak_rss_mb()
        result.update(flush_costs(index, data, folder))
        index.close()
        started = time.perf_counter()
        reopened = FaissVectorIndex(folder, dim=DIM, config=config)
        result["reopen_s"] = time.perf_counter() - started
        result["reopened_count"] = reopened.count()
        reopened.close()
    result["rss_mb"] = peak_rss_mb()
    return result


def ef_sweep(
    index: FaissVectorIndex,
    queries: VectorArray,
    truth: np.ndarray[Any, Any],
    label: str,
) -> list[dict[str, Any]]:
    rows = []
    default = index.ef_search
    for ef in EF_SWEEP:
        index.ef_search = ef
        seconds, found = time_queries(index, queries)
        rows.append(
            {"ef": ef, "recall": recall_at_k(found, truth), **latency_ms(seconds)}
        )
        progress(f"hnsw {label}: ef_search={ef} recall={rows[-1]['recall']:.3f}")
    index.ef_search = default
    return rows


def flush_costs(index: FaissVectorIndex, data: Data, folder: Path) -> dict[str, Any]:
    """The first (full) flush, then rounds of a small batch of writes and a flush."""
    started = time.perf_counter()
    index.flush()
    first_flush_s = time.perf_counter() - started
    progress(f"hnsw {data.label}: first flush took {first_flush_s:.1f} s")
    rng = np.random.default_rng(data.seed)
    next_id = data.n + 1
    seconds = []
    for round_ in range(FLUSH_ROUNDS):
        ids = np.arange(next_id, next_id + FLUSH_UPSERTS, dtype=np.int64)
        next_id += FLUSH_UPSERTS
        index.upsert(ids, data.extra_vectors(FLUSH_UPSERTS, round_))
        index.delete(rng.integers(1, data.n + 1, size=FLUSH_DELETES))
        started = time.perf_counter()
        index.flush()
        seconds.append(time.perf_counter() - started)
    return {
        "first_flush_s": first_flush_s,
        "flush": latency_ms(seconds),
        "flush_max_ms": 1000 * max(seconds),
        "files": sum(1 for _ in folder.iterdir()),
        "disk_mb": folder_mb(folder),
    }


def qdrant_worker(
    data: Data, truth_path: Path, options: dict[str, int]
) -> dict[str, Any]:
    """Qdrant local mode on disk: build, latency and recall."""
    warnings.filterwarnings("ignore", message=".*Local mode is not recommended.*")
    truth = np.load(truth_path)[:QDRANT_LATENCY_QUERIES]
    queries = data.query_vectors()[:QDRANT_LATENCY_QUERIES]
    with tempfile.TemporaryDirectory() as tmp:
        index = QdrantVectorIndex(
            location=Path(tmp), name="bench", dim=DIM, config=QdrantConfig()
        )
        build_s = upsert_all(index, data, f"qdrant {data.label}")
        progress(f"qdrant {data.label}: timing {queries.shape[0]} single queries")
        seconds, found = time_queries(index, queries)
        index.close()
    return {
        "build_s": build_s,
        "latency": latency_ms(seconds),
        "recall": recall_at_k(found, truth),
        "rss_mb": peak_rss_mb(),
    }


WORKERS = {"flat": flat_worker, "hnsw": hnsw_worker, "qdrant": qdrant_worker}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    worker = WORKERS[spec["kind"]]
    result = worker(Data(**spec["data"]), Path(spec["truth"]), spec["faiss"])
    print(json.dumps(result))


# -- the driver ---------------------------------------------------------------------------


class Runner:
    """Runs the workers of one benchmark and keeps their results."""

    def __init__(self, work: Path, faiss_options: dict[str, int]) -> None:
        self.work = work
        self.faiss_options = faiss_options
        self.results: dict[tuple[str, str], dict[str, Any]] = {}

    def run(self, kind: str, data: Data) -> dict[str, Any]:
        truth = self.work / f"truth-{data.label.replace(' ', '-').replace(',', '')}.npy"
        spec = {
            "kind": kind,
            "data": asdict(data),
            "truth": str(truth),
            "faiss": self.faiss_options,
        }
        progress(f"starting {kind} on {data.label}")
        result = run_worker(Path(__file__), spec)
        self.results[(kind, data.label)] = result
        return result

    def faiss_pair(self, data: Data) -> None:
        self.run("flat", data)
        self.run("hnsw", data)


def print_faiss(runner: Runner, datasets: list[Data], title: str) -> None:
    rows = []
    for data in datasets:
        flat, hnsw = (
            runner.results[("flat", data.label)],
            runner.results[("hnsw", data.label)],
        )
        rows.append(
            [
                f"{data.n:,}",
                hnsw["build_s"],
                hnsw["latency"]["p50"],
                hnsw["latency"]["p99"],
                hnsw["recall"],
                flat["latency"]["p50"],
                flat["latency"]["p99"],
                flat["latency"]["p50"] / hnsw["latency"]["p50"],
                hnsw["serving_rss_mb"],
                flat["rss_mb"],
            ]
        )
    headers = [
        "vectors",
        "HNSW build s",
        "HNSW p50 ms",
        "HNSW p99 ms",
        "recall@10",
        "flat p50 ms",
        "flat p99 ms",
        "flat/HNSW",
        "HNSW RSS MB",
        "flat RSS MB",
    ]
    first = runner.results[("hnsw", datasets[0].label)]
    ef, m, efc = first["default_ef"], first["hnsw_m"], first["ef_construction"]
    print_table(
        f"{title} (HNSW M={m}, ef_construction={efc}, ef_search={ef}; "
        f"flat p50/p99 over {FLAT_LATENCY_QUERIES} queries)",
        headers,
        rows,
    )
    for data in datasets:
        print_sweep(data, runner.results[("hnsw", data.label)]["sweep"])
    print_flush(runner, datasets)


def print_sweep(data: Data, sweep: list[dict[str, Any]]) -> None:
    enough = [row for row in sweep if row["recall"] >= TARGET_RECALL]
    chosen = enough[0] if enough else max(sweep, key=lambda row: row["recall"])
    rows = [
        [
            row["ef"],
            row["recall"],
            row["p50"],
            row["p99"],
            "<-" if row is chosen else "",
        ]
        for row in sweep
    ]
    print_table(
        f"ef_search sweep, {data.label}",
        ["ef_search", "recall@10", "p50 ms", "p99 ms", ""],
        rows,
    )
    reached = chosen["recall"] >= TARGET_RECALL and chosen["p50"] < TARGET_P50_MS
    print(
        f"chosen ef_search={chosen['ef']}: recall@10 {chosen['recall']:.3f}, "
        f"p50 {chosen['p50']:.3f} ms; target (recall >= {TARGET_RECALL}, p50 < "
        f"{TARGET_P50_MS} ms) {'reached' if reached else 'NOT reached'}"
    )


def print_flush(runner: Runner, datasets: list[Data]) -> None:
    rows = []
    for data in datasets:
        hnsw = runner.results[("hnsw", data.label)]
        rows.append(
            [
                f"{data.n:,}",
                hnsw["first_flush_s"],
                hnsw["flush"]["p50"],
                hnsw["flush"]["p99"],
                hnsw["flush_max_ms"],
                hnsw["files"],
                hnsw["disk_mb"],
                hnsw["reopen_s"],
                hnsw["rss_mb"],
            ]
        )
    headers = [
        "vectors",
        "first flush s",
        "flush p50 ms",
        "flush p99 ms",
        "flush max ms",
        "files",
        "disk MB",
        "reopen s",
        "peak RSS MB",
    ]
    title = (
        f"FAISS persistence: {FLUSH_ROUNDS} rounds of {FLUSH_UPSERTS} upserts + "
        f"{FLUSH_DELETES} deletes, then flush"
    )
    print_table(title, headers, rows)


def print_qdrant(runner: Runner, datasets: list[Data]) -> None:
    rows = []
    for data in datasets:
        result = runner.results[("qdrant", data.label)]
        latency = result["latency"]
        rows.append(
            [
                data.label,
                result["build_s"],
                latency["p50"],
                latency["p99"],
                result["recall"],
                result["rss_mb"],
            ]
        )
    headers = ["vectors", "build s", "p50 ms", "p99 ms", "recall@10", "RSS MB"]
    title = f"Qdrant local mode on disk ({QDRANT_LATENCY_QUERIES} single queries)"
    print_table(title, headers, rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="100000,1000000", help="FAISS sizes, comma-separated"
    )
    parser.add_argument(
        "--qdrant-size", type=int, default=100_000, help="0 skips Qdrant"
    )
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument(
        "--real-vectors", type=Path, default=None, help="N x 384 float32 .npy"
    )
    parser.add_argument(
        "--hnsw-m", type=int, default=None, help="HNSW M (default: FaissConfig's)"
    )
    parser.add_argument(
        "--ef-construction",
        type=int,
        default=None,
        help="HNSW ef_construction (default: FaissConfig's)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    started = time.perf_counter()
    sizes = [int(size) for size in args.sizes.split(",") if size]
    with tempfile.TemporaryDirectory() as work:
        options = {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction}
        runner = Runner(
            Path(work), {key: value for key, value in options.items() if value}
        )
        synthetic = [Data(n=size, queries=args.queries) for size in sizes]
        for data in synthetic:
            runner.faiss_pair(data)
        qdrant_runs = []
        if args.qdrant_size:
            data = Data(n=args.qdrant_size, queries=args.queries)
            if ("flat", data.label) not in runner.results:
                runner.run("flat", data)
            runner.run("qdrant", data)
            qdrant_runs.append(data)
        real = []
        if args.real_vectors is not None:
            total = np.load(args.real_vectors, mmap_mode="r").shape[0]
            # A tenth of a small file is held out as queries, never most of it.
            held_out = min(args.queries, max(1, total // 10))
            data = Data(
                n=total - held_out,
                queries=held_out,
                real=str(args.real_vectors),
            )
            runner.faiss_pair(data)
            real.append(data)
            if args.qdrant_size and data.n <= args.qdrant_size:
                runner.run("qdrant", data)
                qdrant_runs.append(data)

    if synthetic:
        title = "FAISS on synthetic data (Gaussian mixture, 384 dims, k=10)"
        print_faiss(runner, synthetic, title)
    if real:
        print_faiss(runner, real, f"FAISS on real vectors from {args.real_vectors}")
    if qdrant_runs:
        print_qdrant(runner, qdrant_runs)
    print(f"\ntotal benchmark time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
