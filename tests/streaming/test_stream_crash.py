"""Killing `ragline stream` at any write step loses nothing and duplicates nothing.

Each test pushes a history of upserts, updates and deletes, runs the real
``ragline stream`` command with the real model until it is SIGKILLed mid
batch, runs it again to the end, and checks that every key holds exactly its
latest content once, that deleted keys are gone, that nothing was
dead-lettered, that ``ragline index verify`` passes and that the stream has
no backlog.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from index.sync import FAILPOINT_ENV
from ingestion.streaming.events import encode_event

from .conftest import SOURCE, StreamKit

pytestmark = pytest.mark.slow

KEYS = 40
UPDATED = range(20)
DELETED = range(35, 40)


def _content(key: int, version: int) -> str:
    return f"Ticket {key} revision {version}: the printer in room {key} jams."


def _push_history(kit: StreamKit) -> None:
    """60 upserts over 40 keys (20 of them updated), then 5 deletes."""
    backend = kit.backend()
    backend.open()
    try:
        for key in range(KEYS):
            event = {"op": "upsert", "key": f"k{key}", "content": _content(key, 1)}
            backend.append(encode_event(event))
        for key in UPDATED:
            event = {"op": "update", "key": f"k{key}", "content": _content(key, 2)}
            backend.append(encode_event(event))
        for key in DELETED:
            backend.append(encode_event({"op": "delete", "key": f"k{key}"}))
    finally:
        backend.close()


def _expected() -> dict[str, list[str]]:
    return {
        f"{SOURCE}:k{key}": [_content(key, 2 if key in UPDATED else 1)]
        for key in range(KEYS)
        if key not in DELETED
    }


class Project:
    def __init__(self, root: Path, kit: StreamKit) -> None:
        self.root = root
        self.kit = kit
        root.mkdir(parents=True, exist_ok=True)
        source = kit.source(batch_max_events=8)
        if kit.name == "nats":
            source["ack_wait"] = "2s"
        settings = {
            "data_dir": "./data",
            "collections": [{"name": "docs", "index": "faiss"}],
            "sources": [source],
        }
        self.config.write_text(yaml.safe_dump(settings), encoding="utf-8")

    @property
    def config(self) -> Path:
        return self.root / "ragline.yaml"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "ragline", "--config", str(self.config), *args]

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **(env or {})},
            check=False,
        )

    def consume(
        self, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.run("stream", SOURCE, "--idle-exit", "2", env=env)

    def live(self) -> dict[str, list[str]]:
        engine = sa.create_engine(f"sqlite:///{self.root / 'data' / 'catalog.db'}")
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text(
                        "SELECT c.doc_id, c.seq, c.text FROM chunks c JOIN aliases a "
                        "ON a.generation_id = c.generation_id WHERE c.state = 'live'"
                    )
                ).all()
                documents = conn.execute(
                    sa.text(
                        "SELECT d.doc_id, d.status FROM documents d JOIN aliases a "
                        "ON a.generation_id = d.generation_id"
                    )
                ).all()
        finally:
            engine.dispose()
        assert sorted(d for d, _ in documents) == sorted(_expected()), documents
        assert {s for _, s in documents} == {"indexed"}, documents
        live: dict[str, list[str]] = {}
        for doc_id, _seq, text in sorted(rows):
            live.setdefault(doc_id, []).append(text)
        return live

    def backlog(self) -> int:
        backend = self.kit.backend()
        backend.open()
        try:
            return backend.backlog()
        finally:
            backend.close()


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def _assert_recovered(project: Project, context: str) -> None:
    finished = project.consume()
    assert finished.returncode == 0, f"{context}: {_explain(finished)}"

    assert project.live() == _expected(), context
    assert project.kit.dead_letters() == [], f"{context}: nothing is dead-lettered"
    verify = project.run("index", "verify")
    assert verify.returncode == 0, f"{context}: {_explain(verify)}"
    assert project.backlog() == 0, context


@pytest.mark.parametrize(
    "step", ["after_stage:2", "after_index_write:2", "after_commit:2"]
)
def test_a_kill_at_a_write_step_is_recovered_by_the_next_run(
    kit: StreamKit, tmp_path: Path, step: str
) -> None:
    project = Project(tmp_path / "project", kit)
    _push_history(kit)

    killed = project.consume(env={FAILPOINT_ENV: step})

    assert killed.returncode == -signal.SIGKILL, _explain(killed)
    assert project.backlog() > 0, "the kill came before the stream was drained"
    _assert_recovered(project, step)


def test_a_kill_at_a_random_moment_is_recovered_by_the_next_run(
    kit: StreamKit, tmp_path: Path
) -> None:
    project = Project(tmp_path / "project", kit)
    _push_history(kit)
    total = project.backlog()

    process = subprocess.Popen(
        project.command("stream", SOURCE),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while project.backlog() >= total and time.monotonic() < deadline:
            assert process.poll() is None, "the consumer exited on its own"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.3))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    _assert_recovered(project, "random kill")
