"""Scoring cells with RAGAS: deterministic metrics, the judge's failures, its cache."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from eval.models import AnswerRecord, Cell, GoldenItem
from eval.scoring import (
    METRICS,
    EmbedderEmbeddings,
    GatewayJudge,
    JudgeCache,
    governed_judge,
    score,
)
from ingestion.errors import ConfigError
from serving.gateway.providers import GenerationRequest, ScriptedProvider

PARIS = GoldenItem(
    "paris",
    "What is the capital of France?",
    reference="Paris is the capital of France.",
    reference_uris=("geo/france.md",),
    metadata={
        "reference_contexts": ["Paris is the capital and largest city of France."]
    },
)
HAMLET = GoldenItem(
    "hamlet",
    "Who wrote Hamlet?",
    reference_chunk_ids=("c3", "c9"),
)
BARE = GoldenItem("bare", "Is there anything to compare with?")

ANSWERS = [
    AnswerRecord(
        "paris",
        PARIS.question,
        "The capital of France is Paris.",
        (
            "Paris is the capital and largest city of France.",
            "Lyon is a city in the south-east of France.",
        ),
        ("docs/geo/france.md", "docs/geo/lyon.md"),
        ("c1", "c2"),
    ),
    AnswerRecord(
        "hamlet",
        HAMLET.question,
        "William Shakespeare wrote Hamlet.",
        ("Hamlet is a tragedy by William Shakespeare.",),
        ("lit/hamlet.md",),
        ("c3",),
    ),
    AnswerRecord(
        "bare", BARE.question, "Nothing.", ("A passage.",), ("a.md",), ("c7",)
    ),
]

STATEMENTS = json.dumps({"statements": ["Paris is the capital.", "It has 90 moons."]})
VERDICTS = json.dumps(
    {
        "statements": [
            {"statement": "Paris is the capital.", "reason": "stated", "verdict": 1},
            {"statement": "It has 90 moons.", "reason": "not stated", "verdict": 0},
        ]
    }
)


def by_key(cells: list[Cell]) -> dict[tuple[str, str], Cell]:
    return {(c.question_id, c.metric): c for c in cells}


def scripted_judge(
    script: list[Any], *, cache: JudgeCache | None = None, delay: float = 0.0
) -> tuple[GatewayJudge, ScriptedProvider]:
    """A judge whose model answers from a script, behind the routing core."""
    model = ScriptedProvider(script, context_window=16384, delay=delay)
    return GatewayJudge(governed_judge(model), model_id="scripted", cache=cache), model


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"scoring tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_id_metrics_compare_chunk_ids_when_the_question_lists_them() -> None:
    cells = by_key(
        score(
            [HAMLET], ANSWERS, ["id_context_precision", "id_context_recall"], None, None
        )
    )

    assert cells["hamlet", "id_context_precision"].score == 1.0, cells
    assert cells["hamlet", "id_context_recall"].score == 0.5, cells


def test_id_metrics_match_document_uris_by_path_suffix() -> None:
    cells = by_key(
        score(
            [PARIS], ANSWERS, ["id_context_precision", "id_context_recall"], None, None
        )
    )

    assert cells["paris", "id_context_precision"].score == 0.5, cells
    assert cells["paris", "id_context_recall"].score == 1.0, cells


def test_a_uri_suffix_must_start_at_a_path_boundary() -> None:
    item = GoldenItem("paris", PARIS.question, reference_uris=("france.md",))
    answer = AnswerRecord(
        "paris", PARIS.question, "Paris.", ("p",), ("docs/nfrance.md",), ("c1",)
    )

    (cell,) = score([item], [answer], ["id_context_recall"], None, None)

    assert cell.score == 0.0, cell


def test_nonllm_context_recall_compares_reference_passages_as_strings() -> None:
    (cell,) = score([PARIS], ANSWERS, ["nonllm_context_recall"], None, None)

    assert cell.status == "scored" and cell.score == 1.0, cell


def test_semantic_similarity_embeds_with_the_local_model(real_embedder: Any) -> None:
    cells = score(
        [PARIS, HAMLET], ANSWERS, ["semantic_similarity"], None, real_embedder
    )

    paris, hamlet = cells
    assert paris.status == "scored" and paris.score is not None, paris
    assert paris.score > 0.8, f"near paraphrases should be similar: {paris}"
    assert hamlet.status == "not_applicable", hamlet


def test_metrics_that_need_what_the_question_lacks_are_not_applicable() -> None:
    metrics = ["id_context_precision", "nonllm_context_recall", "context_recall"]
    judge, model = scripted_judge(["{}"])

    cells = score([BARE], ANSWERS, metrics, judge, None)

    assert [c.status for c in cells] == ["not_applicable"] * 3, cells
    assert (
        cells[2].reason == "The question has no a reference answer." or cells[2].reason
    )
    assert model.requests == [], "a cell that does not apply must not call the judge"


def test_an_unknown_metric_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        score([PARIS], ANSWERS, ["faithfulness", "bleu"], None, None)

    message = str(caught.value)
    assert "'bleu'" in message, message
    assert all(name in message for name in METRICS), message


def test_a_judge_metric_without_a_judge_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="needs a judge"):
        score([PARIS], ANSWERS, ["faithfulness"], None, None)


def test_faithfulness_scores_with_the_judges_verdicts_as_reason() -> None:
    judge, model = scripted_judge([STATEMENTS, VERDICTS])

    (cell,) = score([PARIS], ANSWERS, ["faithfulness"], judge, None)

    assert cell.status == "scored" and cell.score == 0.5, cell
    assert cell.reason and "[0] It has 90 moons.: not stated" in cell.reason, cell
    grammars = [r.grammar or "" for r in model.requests]
    assert all("root ::=" in g and "statements" in g for g in grammars), grammars


def test_invalid_json_from_the_judge_is_an_error_cell_and_the_rest_score() -> None:
    judge, _ = scripted_judge(["The answer is yes."])
    metrics = ["faithfulness", "id_context_recall"]

    cells = by_key(score([PARIS, HAMLET], ANSWERS, metrics, judge, None))

    for question in ("paris", "hamlet"):
        cell = cells[question, "faithfulness"]
        assert cell.status == "error" and cell.error_type == "JudgeOutputError", cell
        assert cell.error and "StatementGeneratorOutput" in cell.error, cell
        assert cells[question, "id_context_recall"].status == "scored"


def test_json_of_the_wrong_shape_is_an_error_cell() -> None:
    judge, _ = scripted_judge([json.dumps({"statement": 3})])

    (cell,) = score([PARIS], ANSWERS, ["faithfulness"], judge, None)

    assert cell.error_type == "JudgeOutputError", cell


def test_a_judge_time_out_is_an_error_cell_and_the_rest_score() -> None:
    judge, _ = scripted_judge([STATEMENTS], delay=5.0)
    metrics = ["faithfulness", "id_context_precision"]

    cells = by_key(score([PARIS], ANSWERS, metrics, judge, None, timeout_s=0.2))

    timed_out = cells["paris", "faithfulness"]
    assert timed_out.status == "error" and timed_out.error_type == "TimeoutError", (
        timed_out
    )
    assert cells["paris", "id_context_precision"].status == "scored"


def test_a_failed_pipeline_answer_and_a_missing_answer_are_error_cells() -> None:
    failed = AnswerRecord(
        "paris", PARIS.question, "", (), (), (), error="retrieval down"
    )

    cells = by_key(score([PARIS, HAMLET], [failed], ["id_context_recall"], None, None))

    assert cells["paris", "id_context_recall"].error_type == "PipelineError"
    assert cells["hamlet", "id_context_recall"].error_type == "MissingAnswer"


def test_a_second_run_reads_judge_answers_from_the_cache(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "judge.db")
    judge, model = scripted_judge([STATEMENTS, VERDICTS], cache=cache)
    first = score([PARIS], ANSWERS, ["faithfulness"], judge, None)
    calls = len(model.requests)

    again = GatewayJudge(
        judge.provider, model_id="scripted", cache=JudgeCache(cache.path)
    )
    second = score([PARIS], ANSWERS, ["faithfulness"], again, None)

    assert calls == 2 and len(model.requests) == calls, (
        "the second run called the model"
    )
    assert second == first
    assert again.stats.cache_hits == 2


def test_the_cache_key_changes_with_temperature_and_model() -> None:
    key = JudgeCache.key("m", "p", "{}", 0.0)

    assert key != JudgeCache.key("m", "p", "{}", 0.5)
    assert key != JudgeCache.key("n", "p", "{}", 0.0)
    assert key != JudgeCache.key("m", "p", '{"type": "object"}', 0.0)


def test_without_a_cache_every_run_calls_the_judge() -> None:
    judge, model = scripted_judge([STATEMENTS, VERDICTS, STATEMENTS, VERDICTS])

    score([PARIS], ANSWERS, ["faithfulness"], judge, None)
    score([PARIS], ANSWERS, ["faithfulness"], judge, None)

    assert len(model.requests) == 4


def test_judge_requests_carry_temperature_and_accounting_metadata() -> None:
    judge, model = scripted_judge([STATEMENTS, VERDICTS])
    judge.temperature = 0.3

    score([PARIS], ANSWERS, ["faithfulness"], judge, None)

    request: GenerationRequest = model.requests[0]
    assert request.temperature == 0.3
    assert (
        request.metadata["route"] == "eval" and request.metadata["purpose"] == "judge"
    )


def test_scoring_never_opens_a_network_connection(
    no_network: None, real_embedder: Any
) -> None:
    from ragas._analytics import do_not_track

    judge, _ = scripted_judge([STATEMENTS, VERDICTS])
    metrics = ["faithfulness", "id_context_recall", "nonllm_context_recall"]
    metrics.append("semantic_similarity")

    cells = score([PARIS], ANSWERS, metrics, judge, EmbedderEmbeddings(real_embedder))

    assert all(c.status == "scored" for c in cells), cells
    assert do_not_track(), "RAGAS usage tracking must be off"


@pytest.mark.slow
def test_the_local_judge_scores_through_the_routing_core(
    judge_llama: Any, real_embedder: Any, tmp_path: Path
) -> None:
    provider = governed_judge(judge_llama)
    cache = JudgeCache(tmp_path / "judge.db")
    judge = GatewayJudge(
        provider, model_id="SmolLM2-135M-Instruct", cache=cache, max_tokens=384
    )
    metrics = ["faithfulness", "answer_relevancy"]
    items = [PARIS, HAMLET]

    cells = score(items, ANSWERS, metrics, judge, real_embedder, timeout_s=300)

    assert len(cells) == 4
    for cell in cells:
        if cell.status == "scored":
            assert cell.score is not None and 0.0 <= cell.score <= 1.0, cell
        else:
            assert cell.status == "error" and cell.error_type and cell.error, cell
    assert judge.stats.calls > 0

    calls = judge.stats.calls
    again = score(items, ANSWERS, metrics, judge, real_embedder, timeout_s=300)

    assert judge.stats.calls == calls, "the second run called the model"
    assert again == cells
