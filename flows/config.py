"""Settings models owned by the flows package: the ``flows:`` key of ``ragline.yaml``.

Per-source sync schedules and freshness objectives live on each source
(``schedule`` and ``max_staleness``); this key holds what belongs to the
flows themselves: when collections are reindexed and how a candidate
generation is judged, how often freshness is checked and where alerts go,
and how many syncs may run at once.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from pydantic import Field, SecretStr, field_validator

from ingestion.config import Duration, Schedule, StrictModel
from ingestion.errors import ConfigError

__all__ = [
    "DEFAULT_GATE",
    "FlowsConfig",
    "FreshnessConfig",
    "GateQuestion",
    "ReindexConfig",
    "WebhookConfig",
]

DEFAULT_GATE = "flows.gates:retrieval_self_check"

_IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class GateQuestion(StrictModel):
    """A query whose expected document must still be found by a new generation."""

    query: str = Field(min_length=1)
    expect: str = Field(
        min_length=1,
        description="A document uri, or a substring of its uri or key, that must "
        "appear among the top gate_k results.",
    )


class ReindexConfig(StrictModel):
    """When collections are rebuilt, and the gate a new generation must pass."""

    schedule: Schedule | None = Field(
        default=None,
        description="How often each collection is checked against the configured "
        "pipeline and rebuilt when it changed. Unset: only when asked.",
    )
    gate: str = Field(
        default=DEFAULT_GATE,
        pattern=_IMPORT_PATH,
        description="Import path (package.module:callable) of the promotion gate.",
    )
    gate_questions: tuple[GateQuestion, ...] | Path = Field(
        default=(),
        description="Questions the candidate must answer: a list of {query, expect}, "
        "or the path of a JSONL file of them. Empty: derived from the candidate.",
    )
    gate_k: int = Field(default=5, ge=1, le=100)
    min_hit_rate: float = Field(default=1.0, ge=0.0, le=1.0)

    def questions(self, base_dir: Path | None = None) -> list[GateQuestion]:
        """The gate questions, read from the JSONL file when one is named.

        A relative file path is read from ``base_dir``: the folder of the
        settings file.
        """
        if not isinstance(self.gate_questions, Path):
            return list(self.gate_questions)
        path = self.gate_questions
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return _read_questions(path)


class WebhookConfig(StrictModel):
    """An HTTP endpoint that receives a JSON body for every freshness breach."""

    url: SecretStr = Field(description="Receives a POST; may carry a token.")
    timeout: Duration = Field(default=timedelta(seconds=5))
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _http(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("webhook url must start with http:// or https://")
        return value


class FreshnessConfig(StrictModel):
    """How often sources are compared with their ``max_staleness`` objectives."""

    schedule: Schedule = Field(default=Schedule(interval=timedelta(minutes=5)))
    webhook: WebhookConfig | None = None


class FlowsConfig(StrictModel):
    """Everything under ``flows:`` in the settings file."""

    reindex: ReindexConfig = ReindexConfig()
    freshness: FreshnessConfig = FreshnessConfig()
    sync_concurrency: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Most source syncs running at once, within one run of "
        "ingest-all and, through a Prefect concurrency limit, across runs.",
    )


def _read_questions(path: Path) -> list[GateQuestion]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(
            f"Cannot read the gate questions file {path}: {err}. Fix "
            "flows.reindex.gate_questions or create the file."
        ) from err
    questions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            questions.append(GateQuestion.model_validate(json.loads(line)))
        except ValueError as err:
            raise ConfigError(
                f"{path}, line {number}: expected a JSON object with 'query' and "
                f"'expect' ({err})."
            ) from err
    return questions
