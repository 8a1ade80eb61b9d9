"""Helpers shared by the benchmarks: latency percentiles, peak memory, progress, tables.

Each benchmark configuration runs in a subprocess of its own (see
``run_worker``), so that its peak memory is its own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "REPO",
    "latency_ms",
    "manual_settings",
    "peak_rss_mb",
    "print_table",
    "progress",
    "run_worker",
]

REPO = Path(__file__).resolve().parents[1]
_STARTED = time.perf_counter()


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p99 and mean of per-call durations, in milliseconds."""
    ordered = sorted(seconds)
    if not ordered:
        return {"p50": float("nan"), "p99": float("nan"), "mean": float("nan")}

    def at(fraction: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    return {
        "p50": at(0.50),
        "p99": at(0.99),
        "mean": 1000 * sum(ordered) / len(ordered),
    }


def manual_settings(
    data_dir: Path, manual: Path, include: Sequence[str], exclude: Sequence[str] = ()
) -> Any:
    """Settings of one FAISS collection, ``manual``, fed by pages of the manual."""
    from ragline.settings import parse_settings

    source = {
        "name": "pymanual",
        "type": "files",
        "collection": "manual",
        "path": str(manual),
        "include": list(include),
        "exclude": list(exclude),
    }
    raw = {
        "data_dir": str(data_dir),
        "collections": [{"name": "manual", "index": "faiss"}],
        "sources": [source],
    }
    return parse_settings(raw, base_dir=REPO, origin="bench settings")


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def progress(message: str) -> None:
    """One progress line on stderr, stamped with the time since start."""
    print(
        f"[{time.perf_counter() - _STARTED:7.1f}s] {message}",
        file=sys.stderr,
        flush=True,
    )


def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Print ``rows`` under ``headers`` as an aligned text table with a title."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max(len(header), *(len(row[i]) for row in cells)) if cells else len(header)
        for i, header in enumerate(headers)
    ]
    print(f"\n{title}")
    print(
        "  ".join(
            header.rjust(width) for header, width in zip(headers, widths, strict=True)
        )
    )
    print("  ".join("-" * width for width in widths))
    for row in cells:
        print(
            "  ".join(
                value.rjust(width) for value, width in zip(row, widths, strict=True)
            )
        )
    sys.stdout.flush()


def run_worker(script: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --worker SPEC`` in a fresh interpreter; returns its JSON result.

    The worker prints its result as the last line of stdout; its stderr
    (progress) goes straight to ours.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, str(script), "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"worker {spec} failed with exit code {completed.returncode}"
        )
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
