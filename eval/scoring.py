"""Scoring the cells of a run with RAGAS, offline, the judge called through the routing core.

:func:`score` turns golden questions and the answers the pipeline gave into
one :class:`~eval.models.Cell` per (question, metric). What holds:

- **Nothing leaves the machine.** Importing this module sets
  ``RAGAS_DO_NOT_TRACK=true`` and the Hugging Face offline switches before
  RAGAS is imported, and RAGAS never chooses a model itself: every metric is
  built here with the :class:`GatewayJudge` and :class:`EmbedderEmbeddings`
  it is given, so it can never fall back to a hosted one.
- **The judge is a provider like any other.** :class:`GatewayJudge` sends
  each RAGAS prompt as a :class:`~serving.gateway.providers.GenerationRequest`
  to a :class:`~serving.gateway.providers.Provider`, normally the governed
  one of :func:`governed_judge` (or a gateway's ``provider``), so judge
  traffic is routed, budgeted and audited like ``/ask``. The answer is
  constrained to the JSON schema of the pydantic model RAGAS expects for that
  prompt: the schema is compiled to a GBNF grammar and sent in the request's
  ``grammar`` field, which llama.cpp enforces while sampling. A provider that
  cannot enforce a grammar sends the prompt without it, so the answer is
  still validated against the model and refused as :class:`JudgeOutputError`.
- **Judge answers are cached** in SQLite (:class:`JudgeCache`) by the hash of
  model, prompt, schema, temperature and answer length, so scoring the same
  answers again costs no model call. An answer is kept whether or not it
  validates (at temperature 0 asking again would bring the same answer);
  calls that failed or timed out are not. Pass ``cache=None`` to turn the
  cache off.
- **One cell never stops the others.** A cell is ``scored``, or
  ``not_applicable`` when the metric needs a reference the question lacks,
  or an ``error`` carrying the exception's type name and message: a judge
  time-out (``TimeoutError``), an answer that is not valid JSON for the
  schema (``JudgeOutputError``), a metric that cannot be computed for the
  answer (``ScoreUndefined``), or whatever RAGAS raised.

The metrics, by name (see :data:`METRICS`): ``faithfulness``,
``answer_relevancy``, ``context_precision`` (against the reference answer),
``context_precision_without_reference`` (against the answer given),
``context_recall``, ``id_context_precision`` and ``id_context_recall`` (chunk
ids when the question lists ``reference_chunk_ids``, else document uris
matched as path suffixes of ``reference_uris``), ``nonllm_context_recall``
(string similarity of retrieved passages with reference passages, read from
the question's ``metadata["reference_contexts"]`` until golden items carry
them as a field) and ``semantic_similarity`` (answer against reference, by
embedding).

At temperature 0 ``answer_relevancy`` asks the judge for one question rather
than RAGAS's three: the three would be the same prompt and the same answer.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ingestion.embedding import Embedder, set_offline_environment
from ingestion.errors import ConfigError, RaglineError

from .models import AnswerRecord, Cell, GoldenItem


def _forbid_network() -> None:
    """Telemetry and model hubs off, before RAGAS or its dependencies load."""
    set_offline_environment()
    os.environ["RAGAS_DO_NOT_TRACK"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["LANGCHAIN_TRACING_V2"] = "false"
    os.environ["LANGSMITH_TRACING"] = "false"


# RAGAS and huggingface_hub read these variables when imported, so they are
# set before the imports below.
_forbid_network()

import ragas  # noqa: E402
from ragas.dataset_schema import SingleTurnSample  # noqa: E402
from ragas.embeddings.base import BaseRagasEmbedding  # noqa: E402
from ragas.llms.base import InstructorBaseRagasLLM  # noqa: E402
from ragas.metrics import collections as ragas_metrics  # noqa: E402
from ragas.metrics._context_precision import IDBasedContextPrecision  # noqa: E402
from ragas.metrics._context_recall import (  # noqa: E402
    IDBasedContextRecall,
    NonLLMContextRecall,
)

from serving.gateway.core import GovernedProvider  # noqa: E402
from serving.gateway.providers import (  # noqa: E402
    ChatMessage,
    GenerationRequest,
    Provider,
)
from serving.gateway.routing import (  # noqa: E402
    Router,
    RouterConfig,
    TargetConfig,
    VirtualModelConfig,
)

__all__ = [
    "METRICS",
    "RAGAS_VERSION",
    "EmbedderEmbeddings",
    "GatewayJudge",
    "JudgeCache",
    "JudgeOutputError",
    "ScoreUndefined",
    "ascore_cells",
    "governed_judge",
    "score",
]

logger = logging.getLogger(__name__)

RAGAS_VERSION: str = ragas.__version__

_M = TypeVar("_M", bound=BaseModel)

_REASON_LIMIT = 600
_DEFAULT_JUDGE_TOKENS = 768


class JudgeOutputError(RaglineError, ValueError):
    """The judge's answer is not valid JSON for the schema its prompt asked for."""


class ScoreUndefined(RaglineError, ValueError):
    """A metric has no value for an answer (nothing retrieved, no statements)."""


# -- the judge cache ----------------------------------------------------------


class JudgeCache:
    """Judge answers on disk, in SQLite, by the hash of everything that shaped them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS judge_answers ("
                "key TEXT PRIMARY KEY, model TEXT NOT NULL, answer TEXT NOT NULL, "
                "finish_reason TEXT NOT NULL, created_at REAL NOT NULL)"
            )

    @staticmethod
    def key(
        model: str, prompt: str, schema: str, temperature: float, **extra: Any
    ) -> str:
        """The hash a judge answer is stored under."""
        parts = {
            "model": model,
            "prompt": prompt,
            "schema": schema,
            "temperature": temperature,
            **extra,
        }
        encoded = json.dumps(parts, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(encoded.encode("utf-8")).hexdigest()

    def get(self, key: str) -> tuple[str, str] | None:
        """The answer stored under ``key`` and why it ended, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT answer, finish_reason FROM judge_answers WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def put(self, key: str, model: str, answer: str, finish_reason: str) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO judge_answers VALUES (?, ?, ?, ?, ?)",
                (key, model, answer, finish_reason, time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return int(
                self._db.execute("SELECT COUNT(*) FROM judge_answers").fetchone()[0]
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- the judge ----------------------------------------------------------------


@dataclass
class JudgeStats:
    """What a judge did: model calls, cache hits and the seconds the calls took."""

    calls: int = 0
    cache_hits: int = 0
    seconds: list[float] = field(default_factory=list)


# The judge's parsed answers for the cell being scored, read back for its reason.
_transcript: contextvars.ContextVar[list[BaseModel] | None] = contextvars.ContextVar(
    "ragline_judge_transcript", default=None
)


class GatewayJudge(InstructorBaseRagasLLM):
    """The RAGAS judge, sending every prompt through a ragline provider.

    ``provider`` is normally the governed provider of :func:`governed_judge`
    or a gateway's ``provider``; ``model`` names the virtual model to ask
    (unset: the provider's default). ``model_id`` names the judge in the
    cache key and in run records; give the model file's name and hash so a
    new model never reuses old answers. ``cache`` of ``None`` turns caching
    off. ``metadata`` travels with every request for accounting (route,
    team), never to the model.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        model: str | None = None,
        model_id: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = _DEFAULT_JUDGE_TOKENS,
        cache: JudgeCache | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if not 0.0 <= temperature <= 2.0:
            raise ConfigError(
                f"The judge temperature must lie between 0 and 2, not {temperature}."
            )
        self.provider = provider
        self.model = model
        self.model_id = model_id or model or provider.name
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.cache = cache
        self.metadata = {"route": "eval", "purpose": "judge", **(metadata or {})}
        self.stats = JudgeStats()

    def generate(self, prompt: str, response_model: type[_M]) -> _M:
        """The judge's answer, from synchronous code (no event loop running)."""
        return asyncio.run(self.agenerate(prompt, response_model))

    async def agenerate(self, prompt: str, response_model: type[_M]) -> _M:
        """The judge's answer to ``prompt``, as an instance of ``response_model``."""
        schema = json.dumps(_grammar_schema(response_model.model_json_schema()))
        key = JudgeCache.key(
            self.model_id, prompt, schema, self.temperature, max_tokens=self.max_tokens
        )
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            self.stats.cache_hits += 1
            text, finish_reason = cached
        else:
            text, finish_reason = await self._ask(prompt, schema)
            if self.cache is not None:
                self.cache.put(key, self.model_id, text, finish_reason)
        return self._note(self._parse(text, finish_reason, response_model))

    async def _ask(self, prompt: str, schema: str) -> tuple[str, str]:
        request = GenerationRequest(
            messages=(ChatMessage("user", prompt),),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            model=self.model,
            grammar=_schema_grammar(schema),
            metadata=self.metadata,
        )
        started = time.perf_counter()
        try:
            result = await self.provider.generate(request)
        finally:
            self.stats.calls += 1
            self.stats.seconds.append(time.perf_counter() - started)
        logger.debug(
            "judge answered: model=%s prompt_tokens=%d completion_tokens=%d "
            "finish_reason=%s",
            result.model,
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            result.finish_reason,
        )
        return result.text, result.finish_reason

    def _parse(self, text: str, finish_reason: str, response_model: type[_M]) -> _M:
        if finish_reason == "length":
            raise JudgeOutputError(
                f"The judge {self.model_id} ran out of tokens ({self.max_tokens}) "
                "before closing its JSON answer; raise the judge's max_tokens or "
                "shorten the passages."
            )
        try:
            return _validate(text, response_model)
        except ValueError as err:
            raise JudgeOutputError(
                f"The judge {self.model_id} answered with JSON that does not fit "
                f"{response_model.__name__}: {_first_error(err)}; its answer began "
                f"{text[:120]!r}."
            ) from err

    @staticmethod
    def _note(parsed: _M) -> _M:
        transcript = _transcript.get()
        if transcript is not None:
            transcript.append(parsed)
        return parsed


def _validate(text: str, response_model: type[_M]) -> _M:
    """The answer as ``response_model``; raw line breaks inside strings are allowed.

    llama.cpp's JSON grammar lets a string hold control characters that
    strict JSON forbids; small models write raw line breaks there.
    """
    return response_model.model_validate(json.loads(text, strict=False))


def _first_error(err: ValueError) -> str:
    if not isinstance(err, ValidationError):
        return f"invalid JSON ({err})"
    first = err.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "the answer"
    return f"{where}: {first.get('msg', 'invalid')}"


def _grammar_schema(schema: Any) -> Any:
    """The schema the answer is held to: the model's, with lists never empty.

    Every list in a RAGAS answer has at least one item for a non-empty input
    (statements of an answer, a verdict per statement), and a small model
    constrained to JSON would otherwise take the empty list as the shortest
    valid answer. The model's field order is kept: it is the order the
    answer is written in, reasons before verdicts.
    """
    if isinstance(schema, list):
        return [_grammar_schema(node) for node in schema]
    if not isinstance(schema, dict):
        return schema
    held = {key: _grammar_schema(value) for key, value in schema.items()}
    if held.get("type") == "array" and "minItems" not in held:
        held["minItems"] = 1
    return held


_GRAMMARS: dict[str, str] = {}


def _schema_grammar(schema: str) -> str:
    """The GBNF grammar of a JSON schema, as llama.cpp's own converter writes it."""
    grammar = _GRAMMARS.get(schema)
    if grammar is None:
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        # Importing llama_cpp opens two handles on /dev/null that it never
        # closes; the provider module closes them at exit.
        from serving.gateway.llamacpp import close_null_handles_at_exit

        close_null_handles_at_exit()
        grammar = _GRAMMARS[schema] = json_schema_to_gbnf(schema)
    return grammar


def governed_judge(
    target: Provider,
    *,
    budgets: Any = None,
    limiter: Any = None,
    model: str = "judge",
    timeout_s: float = 120.0,
) -> GovernedProvider:
    """One judge model behind the routing core: a router of one target, under budgets.

    The composition root passes the gateway's own ``provider`` to
    :class:`GatewayJudge` instead; this builds the same path for a judge
    that is not configured in the settings file (scripts, tests).
    """
    config = RouterConfig(
        models=(
            VirtualModelConfig(
                name=model,
                targets=(TargetConfig(target=target.name),),
                retries=0,
                timeout=timeout_s,
            ),
        ),
        default_model=model,
    )
    return GovernedProvider(Router(config, {target.name: target}), budgets, limiter)


# -- the embeddings -----------------------------------------------------------


class EmbedderEmbeddings(BaseRagasEmbedding):
    """A ragline embedder (the local sentence-transformers model) as RAGAS embeddings."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__(cache=None)
        self.embedder = embedder

    def embed_text(self, text: str, **kwargs: Any) -> list[float]:
        return [float(x) for x in self.embedder.embed([text])[0]]

    async def aembed_text(self, text: str, **kwargs: Any) -> list[float]:
        return await asyncio.to_thread(self.embed_text, text)

    def embed_texts(self, texts: list[str], **kwargs: Any) -> list[list[float]]:
        return [[float(x) for x in row] for row in self.embedder.embed(list(texts))]

    async def aembed_texts(self, texts: list[str], **kwargs: Any) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_texts, texts)


# -- the metrics --------------------------------------------------------------


@dataclass(frozen=True)
class _Tools:
    """The judge and embeddings the metrics of one scoring are built with."""

    judge: GatewayJudge | None
    embeddings: EmbedderEmbeddings | None

    @property
    def llm(self) -> GatewayJudge:
        if self.judge is None:
            raise ConfigError("This metric needs a judge; pass a GatewayJudge.")
        return self.judge

    @property
    def embedder(self) -> EmbedderEmbeddings:
        if self.embeddings is None:
            raise ConfigError("This metric needs embeddings; pass the embedder.")
        return self.embeddings


_Run = Callable[[Any, GoldenItem, AnswerRecord], Awaitable[float]]


@dataclass(frozen=True, kw_only=True)
class _Metric:
    """How to build one metric and score one cell with it."""

    build: Callable[[_Tools], Any]
    run: _Run
    judge: bool = False
    embeddings: bool = False
    missing: Callable[[GoldenItem], str | None] = lambda item: None
    """What the question lacks for this metric, or None when it applies."""


def _needs_reference(item: GoldenItem) -> str | None:
    return None if item.reference else "reference answer"


def _needs_reference_ids(item: GoldenItem) -> str | None:
    if item.reference_chunk_ids or item.reference_uris:
        return None
    return "reference chunk ids or uris"


def _needs_reference_contexts(item: GoldenItem) -> str | None:
    return None if _reference_contexts(item) else "reference passages"


def _reference_contexts(item: GoldenItem) -> list[str]:
    raw = item.metadata.get("reference_contexts") or ()
    return [str(text) for text in raw if str(text).strip()]


async def _value(outcome: Awaitable[Any]) -> float:
    result = await outcome
    return float(getattr(result, "value", result))


async def _faithfulness(m: Any, item: GoldenItem, answer: AnswerRecord) -> float:
    return await _value(
        m.ascore(
            user_input=answer.question,
            response=answer.answer,
            retrieved_contexts=list(answer.contexts),
        )
    )


async def _answer_relevancy(m: Any, item: GoldenItem, answer: AnswerRecord) -> float:
    return await _value(m.ascore(user_input=answer.question, response=answer.answer))


async def _precision_with_reference(
    m: Any, item: GoldenItem, answer: AnswerRecord
) -> float:
    return await _value(
        m.ascore(
            user_input=answer.question,
            reference=item.reference,
            retrieved_contexts=list(answer.contexts),
        )
    )


async def _precision_without_reference(
    m: Any, item: GoldenItem, answer: AnswerRecord
) -> float:
    return await _value(
        m.ascore(
            user_input=answer.question,
            response=answer.answer,
            retrieved_contexts=list(answer.contexts),
        )
    )


async def _context_recall(m: Any, item: GoldenItem, answer: AnswerRecord) -> float:
    return await _value(
        m.ascore(
            user_input=answer.question,
            retrieved_contexts=list(answer.contexts),
            reference=item.reference,
        )
    )


async def _semantic_similarity(m: Any, item: GoldenItem, answer: AnswerRecord) -> float:
    return await _value(m.ascore(reference=item.reference, response=answer.answer))


async def _by_ids(m: Any, item: GoldenItem, answer: AnswerRecord) -> float:
    retrieved, reference = _ids(item, answer)
    sample = SingleTurnSample(
        retrieved_context_ids=retrieved, reference_context_ids=reference
    )
    return float(await m.single_turn_ascore(sample))


async def _nonllm_recall(m: Any, item: GoldenItem, answer: AnswerRecord) -> float:
    sample = SingleTurnSample(
        retrieved_contexts=list(answer.contexts) or [""],
        reference_contexts=_reference_contexts(item),
    )
    return float(await m.single_turn_ascore(sample))


def _ids(
    item: GoldenItem, answer: AnswerRecord
) -> tuple[list[str | int], list[str | int]]:
    """Retrieved and reference ids: chunk ids when given, else uris by suffix."""
    if item.reference_chunk_ids:
        return [*answer.context_chunk_ids], [*item.reference_chunk_ids]
    references = [u.strip().lstrip("/") for u in item.reference_uris if u.strip()]
    retrieved = [_matching_uri(uri, references) for uri in answer.context_uris]
    return [*retrieved], [*references]


def _matching_uri(uri: str, references: Sequence[str]) -> str:
    """The reference a retrieved uri ends with (at a path boundary), or the uri."""
    for reference in references:
        if uri == reference or uri.endswith("/" + reference):
            return reference
    return uri


def _answer_relevancy_metric(tools: _Tools) -> Any:
    strictness = 1 if tools.judge and tools.judge.temperature == 0 else 3
    return ragas_metrics.AnswerRelevancy(
        llm=tools.llm, embeddings=tools.embedder, strictness=strictness
    )


METRICS: Mapping[str, _Metric] = {
    "faithfulness": _Metric(
        judge=True,
        build=lambda t: ragas_metrics.Faithfulness(llm=t.llm),
        run=_faithfulness,
    ),
    "answer_relevancy": _Metric(
        judge=True,
        embeddings=True,
        build=_answer_relevancy_metric,
        run=_answer_relevancy,
    ),
    "context_precision": _Metric(
        judge=True,
        missing=_needs_reference,
        build=lambda t: ragas_metrics.ContextPrecisionWithReference(llm=t.llm),
        run=_precision_with_reference,
    ),
    "context_precision_without_reference": _Metric(
        judge=True,
        build=lambda t: ragas_metrics.ContextPrecisionWithoutReference(llm=t.llm),
        run=_precision_without_reference,
    ),
    "context_recall": _Metric(
        judge=True,
        missing=_needs_reference,
        build=lambda t: ragas_metrics.ContextRecall(llm=t.llm),
        run=_context_recall,
    ),
    "id_context_precision": _Metric(
        missing=_needs_reference_ids,
        build=lambda t: IDBasedContextPrecision(),
        run=_by_ids,
    ),
    "id_context_recall": _Metric(
        missing=_needs_reference_ids,
        build=lambda t: IDBasedContextRecall(),
        run=_by_ids,
    ),
    "nonllm_context_recall": _Metric(
        missing=_needs_reference_contexts,
        build=lambda t: NonLLMContextRecall(),
        run=_nonllm_recall,
    ),
    "semantic_similarity": _Metric(
        embeddings=True,
        missing=_needs_reference,
        build=lambda t: ragas_metrics.SemanticSimilarity(embeddings=t.embedder),
        run=_semantic_similarity,
    ),
}
"""The metrics :func:`score` knows, by name."""


# -- scoring ------------------------------------------------------------------


def score(
    items: Sequence[GoldenItem],
    answers: Sequence[AnswerRecord],
    metrics: Sequence[str],
    judge: GatewayJudge | None,
    embeddings: EmbedderEmbeddings | Embedder | None,
    *,
    timeout_s: float = 180.0,
) -> list[Cell]:
    """One cell per (question, metric), in question order then metric order.

    ``judge`` may be None when no metric asks for one, and ``embeddings``
    when neither ``answer_relevancy`` nor ``semantic_similarity`` is asked
    for; a plain ragline embedder is wrapped in :class:`EmbedderEmbeddings`.
    ``timeout_s`` bounds each cell. Raises
    :class:`~ingestion.errors.ConfigError` for an unknown metric or a missing
    judge or embedder. Runs its own event loop; async callers use
    :func:`ascore_cells`.
    """
    return asyncio.run(
        ascore_cells(items, answers, metrics, judge, embeddings, timeout_s=timeout_s)
    )


async def ascore_cells(
    items: Sequence[GoldenItem],
    answers: Sequence[AnswerRecord],
    metrics: Sequence[str],
    judge: GatewayJudge | None,
    embeddings: EmbedderEmbeddings | Embedder | None,
    *,
    timeout_s: float = 180.0,
) -> list[Cell]:
    """:func:`score`, for callers already running an event loop."""
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be positive, not {timeout_s}.")
    tools = _Tools(judge, _as_embeddings(embeddings))
    built = _build(metrics, tools)
    by_question = {answer.question_id: answer for answer in answers}

    cells: list[Cell] = []
    started = time.perf_counter()
    for item in items:
        answer = by_question.get(item.id)
        for name in metrics:
            cells.append(await _cell(name, built[name], item, answer, timeout_s))
    logger.info(
        "cells scored: questions=%d metrics=%d cells=%d errors=%d seconds=%.2f",
        len(items),
        len(metrics),
        len(cells),
        sum(c.status == "error" for c in cells),
        time.perf_counter() - started,
    )
    return cells


def _as_embeddings(
    embeddings: EmbedderEmbeddings | Embedder | None,
) -> EmbedderEmbeddings | None:
    if embeddings is None or isinstance(embeddings, EmbedderEmbeddings):
        return embeddings
    return EmbedderEmbeddings(embeddings)


@functools.cache
def _read_usage_id() -> None:
    """Lets RAGAS read its user id once, with its unclosed-file warning silenced.

    Even with tracking off, RAGAS stamps every event of a classic metric with a
    user id that it reads from (or first writes to) a file in the user data
    directory, leaving the file open; it keeps the id afterwards. Nothing is
    sent anywhere (``RAGAS_DO_NOT_TRACK``), but the open file would raise a
    ``ResourceWarning`` in the middle of scoring.
    """
    from ragas._analytics import get_userid

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        get_userid()


def _build(metrics: Sequence[str], tools: _Tools) -> dict[str, tuple[_Metric, Any]]:
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ConfigError(
            f"Unknown metric {', '.join(map(repr, unknown))}; the metrics are "
            f"{', '.join(METRICS)}."
        )
    _read_usage_id()
    built: dict[str, tuple[_Metric, Any]] = {}
    for name in dict.fromkeys(metrics):
        spec = METRICS[name]
        if spec.judge and tools.judge is None:
            raise ConfigError(
                f"The metric {name!r} needs a judge; pass a GatewayJudge."
            )
        if spec.embeddings and tools.embeddings is None:
            raise ConfigError(
                f"The metric {name!r} needs embeddings; pass the embedder."
            )
        built[name] = (spec, spec.build(tools))
    return built


async def _cell(
    name: str,
    built: tuple[_Metric, Any],
    item: GoldenItem,
    answer: AnswerRecord | None,
    timeout_s: float,
) -> Cell:
    spec, metric = built
    if answer is None:
        return Cell(
            item.id,
            name,
            "error",
            error_type="MissingAnswer",
            error=f"No answer was recorded for the question {item.id!r}.",
        )
    if answer.error is not None:
        return Cell(
            item.id, name, "error", error_type="PipelineError", error=answer.error
        )
    lacking = spec.missing(item)
    if lacking is not None:
        return Cell(
            item.id, name, "not_applicable", reason=f"The question has no {lacking}."
        )

    transcript: list[BaseModel] = []
    token = _transcript.set(transcript)
    started = time.perf_counter()
    try:
        value = await asyncio.wait_for(spec.run(metric, item, answer), timeout_s)
        _check_defined(name, value)
    except TimeoutError:
        return _error_cell(
            item.id,
            name,
            TimeoutError(f"The metric {name} took longer than {timeout_s:g} s."),
            transcript,
        )
    except Exception as err:  # noqa: BLE001 - one cell never stops the others
        return _error_cell(item.id, name, err, transcript)
    finally:
        _transcript.reset(token)
        logger.debug(
            "cell scored: question_id=%s metric=%s seconds=%.2f",
            item.id,
            name,
            time.perf_counter() - started,
        )
    return Cell(item.id, name, "scored", score=value, reason=_reason(transcript))


def _check_defined(name: str, value: float) -> None:
    if math.isnan(value):
        raise ScoreUndefined(
            f"The metric {name} has no value for this answer (RAGAS returned NaN): "
            "nothing to judge, such as no retrieved passages or no statements."
        )


def _error_cell(
    question_id: str, metric: str, err: BaseException, transcript: list[BaseModel]
) -> Cell:
    logger.info(
        "cell failed: question_id=%s metric=%s error_type=%s",
        question_id,
        metric,
        type(err).__name__,
    )
    return Cell(
        question_id,
        metric,
        "error",
        error_type=type(err).__name__,
        error=str(err) or type(err).__name__,
        reason=_reason(transcript),
    )


def _reason(transcript: Sequence[BaseModel]) -> str | None:
    """The judge's verdicts and reasons, one short line each."""
    lines: list[str] = []
    for parsed in transcript:
        _collect(parsed.model_dump(), lines)
    text = "\n".join(dict.fromkeys(lines))
    if not text:
        return None
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 1] + "…"


def _collect(node: Any, lines: list[str]) -> None:
    if isinstance(node, list):
        for child in node:
            _collect(child, lines)
    elif isinstance(node, dict):
        if "reason" in node or "question" in node:
            lines.append(_line(node))
            return
        for child in node.values():
            _collect(child, lines)


def _line(node: Mapping[str, Any]) -> str:
    verdict = node.get("verdict", node.get("attributed"))
    prefix = f"[{verdict}] " if verdict is not None else ""
    if "question" in node:
        flag = " (noncommittal)" if node.get("noncommittal") else ""
        return f"generated question: {node['question']}{flag}"
    subject = node.get("statement")
    reason = node.get("reason", "")
    return f"{prefix}{subject}: {reason}" if subject else f"{prefix}{reason}"
