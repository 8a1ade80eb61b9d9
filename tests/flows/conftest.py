"""Fixtures of the flow tests: a temporary Prefect API, a project, an opener.

Prefect reads its home folder and telemetry settings when it is first
imported, so they are set here, before any test module imports the flows.
The flows run in this process against Prefect's test harness (a temporary
API server on a free port with its own database), and open their runtime
through an opener that shares the session's embedding model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="ragline-prefect-home-"))
os.environ["PREFECT_HOME"] = str(_PREFECT_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"

from flows.context import register_opener  # noqa: E402
from ingestion.embedding import CachedEmbedder  # noqa: E402
from ragline.deployments import FlowOperations, open_operations  # noqa: E402
from ragline.runtime import Runtime  # noqa: E402
from ragline.settings import load_settings  # noqa: E402
from tests.conftest import EXAMPLES  # noqa: E402

CONFIG = """
data_dir: ./data
chunking:
  max_tokens: {max_tokens}
  overlap_tokens: 16
ingest:
  batch_chunks: 64
collections:
  - name: docs
    index: faiss
sources:
  - name: handbook
    type: files
    collection: docs
    path: ./handbook
    include: ["**/*.md", "**/*.html"]
    max_staleness: 1h
  - name: glossary
    type: files
    collection: docs
    path: ./handbook
    include: ["glossary.txt"]
    max_staleness: {glossary_staleness}
flows:
  sync_concurrency: 2
  reindex:
    gate: {gate}
  freshness:
{webhook}
"""


CORPUS = ("engineering/on-call.md", "engineering/firmware-release.md", "glossary.txt")
"""A few files of the demo handbook: enough to search, small enough to embed fast."""


class FlowProject:
    """Part of the demo handbook with a settings file the tests rewrite."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for name in CORPUS:
            target = root / "handbook" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(EXAMPLES / "handbook" / name, target)
        self.configure()

    @property
    def config(self) -> Path:
        return self.root / "ragline.yaml"

    def configure(
        self,
        *,
        max_tokens: int = 200,
        gate: str = "flows.gates:retrieval_self_check",
        glossary_staleness: str = "1h",
        webhook_url: str | None = None,
    ) -> None:
        webhook = (
            f"    webhook:\n      url: {webhook_url}\n      timeout: 2s\n"
            "      headers: {X-Ragline-Test: 'yes'}"
            if webhook_url
            else "    schedule: {interval: 5m}"
        )
        self.config.write_text(
            CONFIG.format(
                max_tokens=max_tokens,
                gate=gate,
                glossary_staleness=glossary_staleness,
                webhook=webhook,
            ),
            encoding="utf-8",
        )

    def runtime(self, embedder: object) -> Runtime:
        """A separate runtime over the project, sharing the session model."""
        runtime = Runtime(load_settings(self.config))
        runtime._embedders[runtime.settings.embedder] = CachedEmbedder(
            embedder,  # type: ignore[arg-type]
            runtime.catalog,
        )
        return runtime


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """Prefect's test harness: a temporary API server, stopped after the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture
def flow_project(tmp_path: Path) -> FlowProject:
    return FlowProject(tmp_path / "project")


@pytest.fixture
def flows_opener(prefect_api: None, real_embedder: object) -> Iterator[None]:
    """Flows open their runtime with the session's model instead of loading one."""

    @contextmanager
    def opener(path: Path) -> Iterator[FlowOperations]:
        runtime = Runtime(load_settings(path))
        runtime._embedders[runtime.settings.embedder] = CachedEmbedder(
            real_embedder,  # type: ignore[arg-type]
            runtime.catalog,
        )
        try:
            yield FlowOperations(runtime, path)
        finally:
            runtime.close()

    register_opener(opener)
    yield
    register_opener(open_operations)
