"""``ragline eval compare`` and ``ragline eval runs`` on runs in a settings' catalog."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from eval.store import EvalStore
from ragline import cli
from ragline.eval_cli import app
from ragline.logs import PACKAGES

from .builders import make_run

SETTINGS = """
data_dir: ./data
collections:
  - name: docs
eval:
  margins: {{relevancy: 0.3}}
  floors: {floors}
"""

T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
N = 30


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The commands log to the stderr of the runner, which is closed after each."""
    loggers = [logging.getLogger(name) for name in PACKAGES]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ragline.yaml"
    path.write_text(SETTINGS.format(floors="{}"), encoding="utf-8")
    return path


@pytest.fixture
def store(config: Path):
    (config.parent / "data").mkdir()
    store = EvalStore(f"sqlite:///{config.parent / 'data' / 'catalog.db'}")
    yield store
    store.close()


def save_runs(store: EvalStore) -> None:
    """An old run, a steady one, one where faithfulness fell, and another dataset."""
    rng = np.random.default_rng(0)
    base = np.clip(rng.uniform(0.6, 0.95, N), 0, 1)
    steady = np.clip(base + rng.normal(0, 0.01, N), 0, 1)
    fallen = np.clip(base - 0.2, 0, 1)
    plans = [
        ("r1-old", {"faithfulness": base, "relevancy": base}, "golden"),
        ("r2-steady", {"faithfulness": steady, "relevancy": steady}, "golden"),
        ("r3-other", {"faithfulness": fallen, "relevancy": fallen}, "other"),
        ("r4-fallen", {"faithfulness": fallen, "relevancy": fallen}, "golden"),
    ]
    for i, (run_id, scores, dataset) in enumerate(plans):
        run = make_run(
            run_id,
            {name: values.tolist() for name, values in scores.items()},
            dataset=dataset,
            created_at=T0 + timedelta(hours=i),
        )
        store.save(run)


def evaluate(config: Path, *args: str) -> Result:
    return CliRunner().invoke(app, ["--config", str(config), *args])


def test_a_run_without_regression_exits_0(config: Path, store: EvalStore) -> None:
    save_runs(store)

    result = evaluate(config, "compare", "r2-steady")

    assert result.exit_code == 0, result.output
    assert "baseline r1-old" in result.output
    assert "no regression" in result.output
    assert "faithfulness" in result.output and "pass" in result.output


def test_a_regression_exits_1_and_the_baseline_defaults_to_the_dataset(
    config: Path, store: EvalStore
) -> None:
    save_runs(store)

    result = evaluate(config, "compare", "r4-fallen", "--json")

    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    assert payload["baseline"]["run_id"] == "r2-steady", "r3 is of another dataset"
    verdicts = {m["metric"]: m["verdict"] for m in payload["comparison"]["metrics"]}
    assert verdicts == {"faithfulness": "regression", "relevancy": "pass"}, (
        "relevancy has a margin of 0.3 in the settings"
    )
    assert payload["comparison"]["regressed"] is True
    assert len(payload["comparison"]["metrics"][0]["differences"]) == N


def test_options_override_the_settings(config: Path, store: EvalStore) -> None:
    save_runs(store)

    result = evaluate(
        config,
        "compare",
        "r4",
        "r1-old",
        "--margin",
        "0.3",
        "-m",
        "relevancy=0.01",
        "--json",
    )

    assert result.exit_code == 1, result.output
    metrics = json.loads(result.stdout)["comparison"]["metrics"]
    by_metric = {m["metric"]: m for m in metrics}
    assert by_metric["faithfulness"]["margin"] == 0.3
    assert by_metric["faithfulness"]["verdict"] != "regression"
    assert by_metric["relevancy"]["margin"] == 0.01
    assert by_metric["relevancy"]["verdict"] == "regression"


def test_a_floor_in_the_settings_makes_a_steady_run_regress(
    config: Path, store: EvalStore
) -> None:
    config.write_text(SETTINGS.format(floors="{faithfulness: 0.99}"), encoding="utf-8")
    save_runs(store)

    result = evaluate(config, "compare", "r2-steady", "--json")

    assert result.exit_code == 1, result.output
    floor = json.loads(result.stdout)["comparison"]["metrics"][0]
    assert floor["verdict"] == "regression"
    assert floor["floor"] == 0.99


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "r9-missing"], "recent runs: r4-fallen"),
        (["compare", "r1-old"], "no baseline"),
        (["compare", "r4-fallen", "--margin", "faith=x"], "is not a number"),
        (["compare", "r4-fallen", "--floor", "0.5"], "is not METRIC=NUMBER"),
        (["compare", "r4-fallen", "--confidence", "3"], "less than or equal to"),
    ],
)
def test_bad_usage_exits_2(
    config: Path, store: EvalStore, args: list[str], message: str
) -> None:
    save_runs(store)

    result = evaluate(config, *args)

    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_compare_without_any_run_exits_2(config: Path) -> None:
    result = evaluate(config, "compare", "latest")

    assert result.exit_code == 2, result.output
    assert not (config.parent / "data").exists(), "reading creates no database"


def test_latest_names_the_newest_run(config: Path, store: EvalStore) -> None:
    save_runs(store)

    result = evaluate(config, "compare", "latest", "--json")

    assert json.loads(result.stdout)["run"]["run_id"] == "r4-fallen", result.output


def test_runs_lists_newest_first_with_means_and_coverage(
    config: Path, store: EvalStore
) -> None:
    save_runs(store)

    result = evaluate(config, "runs", "--dataset", "golden", "--json")

    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    assert [r["run_id"] for r in runs] == ["r4-fallen", "r2-steady", "r1-old"]
    assert runs[0]["questions"] == N
    assert runs[0]["scores"]["faithfulness"]["coverage"] == 1.0
    assert runs[0]["collection"] == "docs"

    table = evaluate(config, "runs")
    assert table.exit_code == 0, table.output
    assert "r3-other" in table.output and "faithfulness" in table.output


def test_runs_on_a_fresh_project_says_there_are_none(config: Path) -> None:
    result = evaluate(config, "runs")

    assert result.exit_code == 0, result.output
    assert "No evaluation runs" in result.output


def test_the_group_is_mounted_on_the_ragline_command(
    config: Path, store: EvalStore
) -> None:
    save_runs(store)

    result = CliRunner().invoke(
        cli.app, ["--config", str(config), "eval", "compare", "r4-fallen", "r1-old"]
    )

    assert result.exit_code == 1, result.output
    assert "regression: faithfulness" in result.output
