"""Ingest throughput on the Python 3.11 HTML manual, beside plain model encoding.

Prints, in one run:

* first ingest of the manual (list, parse, chunk, embed, write FAISS and the
  catalog) in chunks per second, next to ``SentenceTransformer.encode`` of the
  very same texts, as a ratio (goal: at least 0.85);
* a second ingest of the unchanged manual, as a fraction of the first
  ingest's time (goal: at most 0.05);
* peak resident memory of each phase, each measured in its own process.

It also saves the plain-encoded vectors to ``bench/.cache/manual-vectors.npy``,
a file ``bench/bench_vectors.py --real-vectors`` can read (``make bench``
gives it the larger set the retrieval benchmark saves).

Usage: python bench/bench_ingest.py [--manual DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"
MANUAL = Path("/usr/share/doc/python3.11/html")
sys.path.insert(0, str(REPO))

from bench._util import manual_settings, peak_rss_mb  # noqa: E402


def _settings(data_dir: Path, manual: Path, limit: int | None) -> Any:
    include = ["**/*.html"]
    if limit:
        pages = sorted(str(p.relative_to(manual)) for p in manual.rglob("*.html"))
        include = pages[:limit]
    exclude = ["_static/**", "_sources/**", "_images/**", "genindex*.html"]
    return manual_settings(data_dir, manual, include, exclude)


def phase_ingest(data_dir: Path, manual: Path, limit: int | None) -> dict[str, Any]:
    """One ``ragline ingest`` of the manual, timed around the sync alone."""
    from ragline.runtime import Runtime

    runtime = Runtime(_settings(data_dir, manual, limit))
    try:
        started = time.perf_counter()
        [report] = runtime.ingest()
        seconds = time.perf_counter() - started
    finally:
        runtime.close()
    return {
        "seconds": seconds,
        "documents": report.seen,
        "chunks": report.chunks_written,
        "failed": report.failed,
        "unchanged": report.unchanged,
        "peak_rss_mb": peak_rss_mb(),
    }


def phase_encode(data_dir: Path, manual: Path, limit: int | None) -> dict[str, Any]:
    """Plain ``SentenceTransformer.encode`` of exactly the texts the ingest embedded."""
    import numpy as np

    from ingestion.chunking import embedding_text
    from ingestion.embedding import resolve_model_path, set_offline_environment
    from ingestion.models import Chunk

    set_offline_environment()
    from sentence_transformers import SentenceTransformer

    texts = _embedded_texts(data_dir, Chunk, embedding_text)
    model = SentenceTransformer(
        str(resolve_model_path("all-MiniLM-L6-v2")), device="cpu"
    )
    model.encode(
        texts[:64], batch_size=64
    )  # warm-up, as the ingest's model is warm too
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=64, normalize_embeddings=True)
    seconds = time.perf_counter() - started
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(CACHE / "manual-vectors.npy", np.asarray(vectors, dtype=np.float32))
    return {"seconds": seconds, "chunks": len(texts), "peak_rss_mb": peak_rss_mb()}


def _embedded_texts(data_dir: Path, chunk_type: Any, embedding_text: Any) -> list[str]:
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{data_dir / 'catalog.db'}")
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                'SELECT chunk_id, doc_id, seq, text, start, "end", heading_path FROM chunks '
                "WHERE state = 'live' ORDER BY doc_id, seq"
            )
        ).all()
    engine.dispose()
    return [
        embedding_text(
            chunk_type(r[0], r[1], r[2], r[3], r[4], r[5], tuple(json.loads(r[6])))
        )
        for r in rows
    ]


def _run_phase(
    name: str, data_dir: Path, manual: Path, limit: int | None
) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--phase",
        name,
        "--data",
        str(data_dir),
        "--manual",
        str(manual),
    ]
    if limit:
        command += ["--limit", str(limit)]
    print(f"running phase {name}...", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"phase {name} failed with exit code {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manual", type=Path, default=MANUAL)
    parser.add_argument(
        "--limit", type=int, default=None, help="only the first N pages"
    )
    parser.add_argument("--phase", choices=["ingest", "encode"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=CACHE / "ingest-data")
    args = parser.parse_args()

    if args.phase:
        phases = {"ingest": phase_ingest, "encode": phase_encode}
        print(json.dumps(phases[args.phase](args.data, args.manual, args.limit)))
        return
    if not (args.manual / "index.html").exists():
        raise SystemExit(f"{args.manual} is missing; run `bash bench/prepare` first.")

    shutil.rmtree(args.data, ignore_errors=True)
    first = _run_phase("ingest", args.data, args.manual, args.limit)
    encode = _run_phase("encode", args.data, args.manual, args.limit)
    again = _run_phase("ingest", args.data, args.manual, args.limit)
    _report(first, encode, again)


def _report(
    first: dict[str, Any], encode: dict[str, Any], again: dict[str, Any]
) -> None:
    ingest_rate = first["chunks"] / first["seconds"]
    encode_rate = encode["chunks"] / encode["seconds"]
    print()
    print(
        f"corpus: Python 3.11 manual, {first['documents']} pages, {first['chunks']} chunks "
        f"({first['failed']} pages failed to parse)"
    )
    print()
    print(f"{'phase':<34}{'seconds':>10}{'chunks/s':>12}{'peak MB':>10}")
    print(
        f"{'ragline ingest (first run)':<34}{first['seconds']:>10.1f}{ingest_rate:>12.1f}"
        f"{first['peak_rss_mb']:>10.0f}"
    )
    print(
        f"{'SentenceTransformer.encode':<34}{encode['seconds']:>10.1f}{encode_rate:>12.1f}"
        f"{encode['peak_rss_mb']:>10.0f}"
    )
    print(
        f"{'ragline ingest (unchanged corpus)':<34}{again['seconds']:>10.2f}{'':>12}"
        f"{again['peak_rss_mb']:>10.0f}"
    )
    print()
    ratio = ingest_rate / encode_rate
    fraction = again["seconds"] / first["seconds"]
    print(f"ingest throughput / plain encode: {ratio:.3f}   (goal >= 0.85)")
    print(f"re-ingest time / first ingest:    {fraction:.4f}  (goal <= 0.05)")
    print(
        f"unchanged documents on re-ingest: {again['unchanged']} of {again['documents']}"
    )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
