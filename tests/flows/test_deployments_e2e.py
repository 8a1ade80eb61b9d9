"""End to end: a Prefect server, a process work pool, a worker, ``ragline flows deploy``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.flows.conftest import CORPUS, FlowProject

POOL = "ragline-e2e"
PREFECT = (sys.executable, "-m", "prefect")
RAGLINE = (sys.executable, "-m", "ragline", "--config")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _prefect(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    result = subprocess.run(
        [*PREFECT, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, (
        f"prefect {' '.join(args)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


def _wait_healthy(api: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert server.poll() is None, "prefect server start exited early"
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the Prefect server at {api} did not become healthy")


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.mark.slow
def test_deployed_flow_runs_on_a_worker_and_fills_the_catalog(tmp_path: Path) -> None:
    project = FlowProject(tmp_path / "project")
    api = f"http://127.0.0.1:{_free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    port = api.rsplit(":", 1)[1].split("/")[0]
    server = worker = None
    try:
        server = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_healthy(api, server)
        _prefect("work-pool", "create", POOL, "--type", "process", env=env)
        worker = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deployed = subprocess.run(
            [*RAGLINE, str(project.config), "flows", "deploy", "--work-pool", POOL],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
            check=False,
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert "ingest-source/handbook" in deployed.stdout, deployed.stdout

        run = _prefect(
            "deployment",
            "run",
            "ingest-source/handbook",
            "--watch",
            "--watch-timeout",
            "300",
            env=env,
            timeout=330,
        )
        assert "Completed" in run, run
    finally:
        _stop(worker)
        _stop(server)

    engine = sa.create_engine(f"sqlite:///{project.root / 'data' / 'catalog.db'}")
    try:
        with engine.connect() as conn:
            keys = conn.execute(
                sa.text("SELECT key FROM documents WHERE status = 'indexed'")
            ).scalars()
            indexed = sorted(keys)
    finally:
        engine.dispose()
    expected = sorted(name for name in CORPUS if name.endswith(".md"))
    assert indexed == expected, indexed
