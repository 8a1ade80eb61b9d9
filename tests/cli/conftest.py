"""Helpers for tests that run the ``ragline`` command in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import EXAMPLES

CONFIG = """
data_dir: ./data
chunking:
  max_tokens: {max_tokens}
  overlap_tokens: 16
ingest:
  batch_chunks: {batch_chunks}
collections:
  - name: docs
    index: {backend}
sources:
  - name: handbook
    type: files
    collection: docs
    path: ./handbook
    include: ["**/*.md", "**/*.html", "**/*.txt"]
"""


@dataclass
class Project:
    """A copy of the demo handbook with its own settings file and data folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "ragline.yaml"

    @property
    def handbook(self) -> Path:
        return self.root / "handbook"

    def configure(
        self, *, max_tokens: int = 200, batch_chunks: int = 8, backend: str = "faiss"
    ) -> None:
        self.config.write_text(
            CONFIG.format(
                max_tokens=max_tokens, batch_chunks=batch_chunks, backend=backend
            ),
            encoding="utf-8",
        )

    def run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "ragline", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            check=False,
        )
        if check:
            assert result.returncode == 0, (
                f"ragline {' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ragline",
                "--config",
                str(self.config),
                "--log-level",
                "INFO",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def search(self, query: str, k: int = 3) -> list[dict[str, object]]:
        result = self.run(
            "search", query, "--collection", "docs", "-k", str(k), "--json"
        )
        return json.loads(result.stdout)["results"]

    def live_chunk_texts(self) -> list[tuple[str, int, str]]:
        """(document, position, text) of every live chunk of the live generation, sorted.

        Duplicates would show as repeated entries; nothing here depends on
        where the project folder is, so two projects can be compared.
        """
        engine = sa.create_engine(f"sqlite:///{self.root / 'data' / 'catalog.db'}")
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    sa.text(
                        "SELECT c.doc_id, c.seq, c.text FROM chunks c JOIN aliases a "
                        "ON a.generation_id = c.generation_id WHERE c.state = 'live'"
                    )
                ).all()
        finally:
            engine.dispose()
        return sorted((doc_id, seq, text) for doc_id, seq, text in rows)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    project = Project(tmp_path / "project")
    shutil.copytree(EXAMPLES / "handbook", project.handbook)
    project.configure()
    return project
