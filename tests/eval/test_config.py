"""The ``eval:`` section of the settings file."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.config import EvalConfig
from ingestion.errors import ConfigError
from ragline.settings import parse_settings

BASE = {"collections": [{"name": "docs"}]}


def test_settings_without_an_eval_section_get_the_defaults() -> None:
    settings = parse_settings(BASE, base_dir=Path("."))

    assert settings.eval == EvalConfig()
    assert settings.eval.default_margin == 0.05
    assert settings.eval.confidence == 0.95


def test_the_eval_section_is_read() -> None:
    raw = {
        **BASE,
        "eval": {
            "margins": {"faithfulness": 0.03},
            "floors": {"faithfulness": 0.7},
            "pass_threshold": 0.6,
            "resamples": 500,
        },
    }

    config = parse_settings(raw, base_dir=Path(".")).eval

    assert config.margins == {"faithfulness": 0.03}
    assert config.floors == {"faithfulness": 0.7}
    assert (config.pass_threshold, config.resamples) == (0.6, 500)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"margin": {}}, "eval.margin: unknown key"),
        ({"margins": {"faithfulness": -0.1}}, "give a number of 0 or more"),
        ({"floors": {"faithfulness": float("nan")}}, "must be a finite number"),
        ({"confidence": 1.0}, "eval.confidence"),
        ({"resamples": 10}, "eval.resamples"),
    ],
)
def test_bad_eval_settings_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings({**BASE, "eval": section}, base_dir=Path("."))
