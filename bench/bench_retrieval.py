"""Retrieval quality on the Python 3.11 HTML manual: dense, lexical and hybrid.

``bench/manual_questions.jsonl`` holds questions written for this project,
each with the manual page that answers it (``bench/check_questions.py``
checks that the page holds the quoted answer). The benchmark ingests every
page the questions name (and ``--extra-pages`` more, as distractors) with the
real embedding model, then asks each question in each mode and prints:

* hit@5: the share of questions with a passage of the answering page among
  the first five;
* MRR@10: the mean reciprocal rank of the first such passage in the first
  ten (0 when none);
* the query latency (p50, p99) of each mode, one query at a time;
* hybrid against dense as ratios, and per question style;
* hybrid at other fusion weights and ``rrf_k`` than the settings' (the
  first row), to show how sensitive fusion is to them.

The index is kept in ``bench/.cache/retrieval-data`` and reused while the
page list is the same (an unchanged re-ingest takes seconds); ``--fresh``
rebuilds it. The real embeddings of its chunks are saved to
``bench/.cache/retrieval-vectors.npy``, where ``bench/bench_vectors.py``
checks its synthetic figures against them.

Usage: python bench/bench_retrieval.py [--manual DIR] [--extra-pages N] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import (
    REPO,
    latency_ms,
    manual_settings,
    peak_rss_mb,
    print_table,
    progress,
)

CACHE = REPO / "bench" / ".cache"
MANUAL = Path("/usr/share/doc/python3.11/html")
QUESTIONS = REPO / "bench" / "manual_questions.jsonl"
MODES = ("dense", "lexical", "hybrid")
# Fusion settings tried beside the settings' own; lexical_weight stays.
FUSION_SWEEP: tuple[dict[str, Any], ...] = (
    {"fusion": "rrf", "dense_weight": 1.0, "rrf_k": 20},
    {"fusion": "rrf", "dense_weight": 1.5, "rrf_k": 60},
    {"fusion": "rrf", "dense_weight": 2.0, "rrf_k": 60},
    {"fusion": "rrf", "dense_weight": 1.5, "rrf_k": 20},
    {"fusion": "rrf", "dense_weight": 2.0, "rrf_k": 20},
    {"fusion": "convex", "dense_weight": 1.0},
    {"fusion": "convex", "dense_weight": 1.5},
    {"fusion": "convex", "dense_weight": 2.0},
    {"fusion": "convex", "dense_weight": 3.0},
)
HIT_AT = 5
MRR_AT = 10


def load_questions(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def corpus_pages(
    manual: Path, questions: list[dict[str, Any]], extra: int
) -> list[str]:
    """The pages the questions name, then ``extra`` other library pages."""
    named = sorted({q["page"] for q in questions})
    others = sorted(
        str(p.relative_to(manual))
        for p in (manual / "library").glob("*.html")
        if str(p.relative_to(manual)) not in named
    )
    return named + others[:extra]


def save_vectors(catalog_db: Path, target: Path) -> None:
    """Every embedding the catalog holds (one model, this corpus) as an N x d array."""
    import numpy as np
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{catalog_db}")
    try:
        with engine.connect() as conn:
            blobs = conn.execute(
                sa.text("SELECT vector FROM embeddings ORDER BY text_hash")
            ).scalars()
            vectors = np.stack([np.frombuffer(b, dtype=np.float32) for b in blobs])
    finally:
        engine.dispose()
    np.save(target, vectors)
    progress(f"saved {len(vectors)} real vectors to {target}")


def evaluate(
    retriever: Any,
    questions: list[dict[str, Any]],
    manual: Path,
    modes: tuple[str, ...] = MODES,
) -> dict[str, dict[str, Any]]:
    """hit@5, MRR@10 and latency of each mode over the question set."""
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        hits, reciprocal, seconds = [], [], []
        for q in questions:
            answer_uri = (manual / q["page"]).resolve().as_uri()
            started = time.perf_counter()
            found = retriever.search(q["question"], MRR_AT, mode=mode)
            seconds.append(time.perf_counter() - started)
            ranks = [i for i, hit in enumerate(found, 1) if hit.uri == answer_uri]
            first = ranks[0] if ranks else None
            hits.append(first is not None and first <= HIT_AT)
            reciprocal.append(1 / first if first else 0.0)
        results[mode] = {
            "hits": hits,
            "reciprocal": reciprocal,
            "latency": latency_ms(seconds),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manual", type=Path, default=MANUAL)
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--extra-pages", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="rebuild the index")
    args = parser.parse_args()
    if not (args.manual / "index.html").exists():
        raise SystemExit(f"{args.manual} is missing; run `bash bench/prepare` first.")

    from ragline.runtime import Runtime
    from retrieval.retriever import Retriever

    questions = load_questions(args.questions)
    pages = corpus_pages(args.manual, questions, args.extra_pages)
    data_dir = CACHE / "retrieval-data"
    marker = data_dir / "pages.json"
    if args.fresh or not marker.exists() or json.loads(marker.read_text()) != pages:
        shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True, exist_ok=True)

    settings = manual_settings(data_dir, args.manual, pages)
    runtime = Runtime(settings)
    try:
        progress(f"ingesting {len(pages)} pages of the manual")
        started = time.perf_counter()
        [report] = runtime.ingest()
        ingest_s = time.perf_counter() - started
        marker.write_text(json.dumps(pages))
        progress(f"ingested: {report.counts()} in {ingest_s:.0f}s")
        save_vectors(data_dir / "catalog.db", CACHE / "retrieval-vectors.npy")

        collection = settings.collection("manual")
        generation = runtime.catalog.live_generation("manual")
        assert generation is not None, "the ingest left no live generation"
        retriever = Retriever(
            runtime.catalog,
            runtime.index(generation),
            generation,
            runtime.embedder(collection).inner,
            settings.retrieval,
        )
        retriever.search("warm up", 5, mode="hybrid")
        chunks = runtime.index(generation).count()
        results = evaluate(retriever, questions, args.manual)

        def retriever_with(update: dict[str, Any]) -> Retriever:
            return Retriever(
                runtime.catalog,
                runtime.index(generation),
                generation,
                runtime.embedder(collection).inner,
                settings.retrieval.model_copy(update=update),
            )

        sweep = []
        for update in FUSION_SWEEP:
            other = retriever_with(update)
            found = evaluate(other, questions, args.manual, ("hybrid",))["hybrid"]
            sweep.append((update, found))
        # Common words are left out only in large collections; here the rule
        # is forced on to show what it costs in quality.
        pruned = evaluate(
            retriever_with({"lexical_common_min_chunks": 0}),
            questions,
            args.manual,
            ("lexical", "hybrid"),
        )
    finally:
        runtime.close()

    report_results(questions, results, len(pages), chunks)
    report_sweep(settings.retrieval, results["hybrid"], sweep, len(questions))
    report_pruned(settings.retrieval, results, pruned, len(questions))


def report_sweep(
    config: Any,
    hybrid: dict[str, Any],
    sweep: list[tuple[dict[str, Any], Any]],
    n: int,
) -> None:
    def row(update: dict[str, Any], found: dict[str, Any], note: str = "") -> list[Any]:
        fusion = update.get("fusion", config.fusion)
        weight = update.get("dense_weight", config.dense_weight)
        return [
            f"{fusion}{note}",
            f"{weight:g} : {config.lexical_weight:g}",
            update.get("rrf_k", config.rrf_k) if fusion == "rrf" else "-",
            sum(found["hits"]) / n,
            sum(found["reciprocal"]) / n,
        ]

    rows = [row({}, hybrid, " (settings)")]
    rows += [row(update, found) for update, found in sweep]
    print_table(
        "hybrid at other fusion settings",
        ["fusion", "dense : lexical weight", "rrf_k", f"hit@{HIT_AT}", f"MRR@{MRR_AT}"],
        rows,
    )


def report_pruned(
    config: Any,
    results: dict[str, dict[str, Any]],
    pruned: dict[str, dict[str, Any]],
    n: int,
) -> None:
    rows = []
    for mode in ("lexical", "hybrid"):
        for label, found in (
            ("every word", results[mode]),
            ("common left out", pruned[mode]),
        ):
            rows.append(
                [
                    mode,
                    label,
                    sum(found["hits"]) / n,
                    sum(found["reciprocal"]) / n,
                    found["latency"]["p50"],
                ]
            )
    print_table(
        f"lexical words held by over {config.lexical_common_share:.0%} of the chunks "
        "left out (forced on at this size)",
        ["mode", "query words", f"hit@{HIT_AT}", f"MRR@{MRR_AT}", "p50 ms"],
        rows,
    )


def report_results(
    questions: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    pages: int,
    chunks: int,
) -> None:
    n = len(questions)
    print(
        f"\ncorpus: Python 3.11 manual, {pages} pages, {chunks} chunks; "
        f"{n} questions, each with the page that answers it"
    )
    rows = []
    for mode in MODES:
        r = results[mode]
        rows.append(
            [
                mode,
                sum(r["hits"]) / n,
                sum(r["reciprocal"]) / n,
                r["latency"]["p50"],
                r["latency"]["p99"],
            ]
        )
    print_table(
        f"retrieval quality (hit@{HIT_AT}, MRR@{MRR_AT}) and latency per query",
        ["mode", f"hit@{HIT_AT}", f"MRR@{MRR_AT}", "p50 ms", "p99 ms"],
        rows,
    )

    styles: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        styles[q.get("style", "-")].append(i)
    style_rows = []
    for style, members in sorted(styles.items()):
        row: list[Any] = [style, len(members)]
        for mode in MODES:
            row.append(sum(results[mode]["hits"][i] for i in members) / len(members))
        style_rows.append(row)
    print_table(
        f"hit@{HIT_AT} per question style",
        ["style", "questions", *MODES],
        style_rows,
    )

    dense, hybrid = results["dense"], results["hybrid"]
    hit_ratio = sum(hybrid["hits"]) / max(1, sum(dense["hits"]))
    mrr_ratio = sum(hybrid["reciprocal"]) / max(1e-9, sum(dense["reciprocal"]))
    print(f"\nhybrid / dense hit@{HIT_AT}: {hit_ratio:.3f}   (goal > 1)")
    print(f"hybrid / dense MRR@{MRR_AT}: {mrr_ratio:.3f}   (goal > 1)")
    print(f"peak memory: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
