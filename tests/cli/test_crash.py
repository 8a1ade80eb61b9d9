"""Killing ingestion at any point never leaves duplicates, orphans or a broken index.

Each test runs the real ``ragline`` command with the real model, kills it
with SIGKILL, runs it again, and checks that ``ragline index verify`` passes
and that the live chunks are exactly those of a clean run on the same files.
"""

from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from index.sync import FAILPOINT_ENV

from .conftest import Project

pytestmark = pytest.mark.slow

# Every write step of a sync, in order; ":2" kills at the second time it is reached.
WRITE_STEPS = [
    "after_stage",
    "after_stage:2",
    "after_index_write",
    "after_index_write:2",
    "after_commit",
    "after_commit:2",
    "after_index_delete",
    "after_delete_mark",
    "after_delete_index",
]


def _change_corpus(handbook: Path, variant: int) -> None:
    """Edit two documents, delete one and add one; two variants alternate."""
    on_call = handbook / "engineering" / "on-call.md"
    faq = handbook / "product" / "dl-400-faq.md"
    for path in (on_call, faq):
        text = path.read_text(encoding="utf-8")
        marker = "\n\n## Revision note\n\nRevised in variant {v}: please re-read this page.\n"
        text = text.split("\n\n## Revision note")[0]
        path.write_text(text + marker.format(v=variant), encoding="utf-8")
    glossary = handbook / "glossary.txt"
    parked = handbook.parent / "parked-glossary.txt"
    if variant % 2:
        shutil.move(glossary, parked)
        (handbook / "new-team.md").write_text(
            "# The calibration team\n\nThe calibration team checks every DL-400 "
            "sensor against a reference before shipping.\n",
            encoding="utf-8",
        )
    else:
        if parked.exists():
            shutil.move(parked, glossary)
        (handbook / "new-team.md").unlink(missing_ok=True)


def _reference(
    tmp_path: Path, project: Project, name: str
) -> list[tuple[str, int, str]]:
    """The live chunks of a clean ingest of the project's current files."""
    clean = Project(tmp_path / name)
    shutil.copytree(project.handbook, clean.handbook)
    shutil.copy(project.config, clean.config)
    clean.run("ingest")
    return clean.live_chunk_texts()


def _assert_complete(
    project: Project, expected: list[tuple[str, int, str]], context: str
) -> None:
    project.run("ingest")
    verify = project.run("index", "verify", check=False)
    assert verify.returncode == 0, (
        f"{context}: verify failed\n{verify.stdout}\n{verify.stderr}"
    )
    live = project.live_chunk_texts()
    missing = set(expected) - set(live)
    extra = set(live) - set(expected)
    assert not missing and not extra, (
        f"{context}: {len(missing)} chunks missing and {len(extra)} unexpected after recovery"
    )
    assert len(live) == len(set(live)), f"{context}: duplicate chunks after recovery"


def test_a_kill_at_every_write_step_is_recovered_by_the_next_run(
    project: Project, tmp_path: Path
) -> None:
    project.run("ingest")
    pristine = tmp_path / "pristine-data"
    shutil.copytree(project.root / "data", pristine)
    _change_corpus(project.handbook, 1)
    expected = _reference(tmp_path, project, "reference")

    for step in WRITE_STEPS:
        shutil.rmtree(project.root / "data")
        shutil.copytree(pristine, project.root / "data")

        killed = project.run("ingest", env={FAILPOINT_ENV: step}, check=False)

        assert killed.returncode == -signal.SIGKILL, (
            f"the failpoint {step} was never reached (exit {killed.returncode})\n{killed.stderr}"
        )
        _assert_complete(project, expected, f"killed at {step}")


def test_kills_at_random_moments_are_recovered(
    project: Project, tmp_path: Path
) -> None:
    project.configure(batch_chunks=2)
    project.run("ingest")
    references = {}
    for variant in (1, 2):
        _change_corpus(project.handbook, variant)
        references[variant] = _reference(tmp_path, project, f"reference-{variant}")
    rng = random.Random(20261203)

    for round_number in range(8):
        variant = 1 + round_number % 2
        _change_corpus(project.handbook, variant)
        process = project.popen("ingest")
        assert process.stderr is not None
        for line in process.stderr:  # the model is loaded: writes begin
            if "embedding model loaded" in line:
                break
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)

        _assert_complete(project, references[variant], f"round {round_number}")
