"""The answer pipeline: retrieve passages the caller may see, then generate.

``/ask`` runs these steps, each timed and traced:

1. *Check* the request (question length, ``top_k``, collection, filters).
2. *Exact cache*: the same question in the same scope (collection, index
   generation, prompt version, model, the caller's access scope, retrieval
   parameters) returns the cached answer, provided no cited document changed.
3. *Embed* the question, batched with concurrent questions.
4. *Semantic cache*: a question of the same scope whose embedding is close
   enough returns its answer, on the same condition.
5. *Retrieve* the passages the caller may see.
6. *Generate*: passages below ``prompt.min_score`` are dropped; with none
   left the answer is "I don't know" and no model is called. Otherwise the
   best passages that fit the model's window are numbered into the prompt and
   the provider writes the answer; its ``[n]`` marks, checked against the
   passages' words, become citations.

The service knows collections through :class:`CollectionDirectory` and models
through the :class:`~serving.gateway.providers.Provider` protocol only; the
composition root supplies both.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from index.vectors.base import VectorArray
from ingestion.errors import AccessDenied, RequestError
from retrieval.batching import QueryEmbedder
from retrieval.config import SearchMode
from retrieval.filters import AccessScope, SearchFilters
from retrieval.retriever import Retriever, SearchHit

from .cache.base import AnswerCache, CacheScope
from .gateway.providers import (
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    Provider,
    TokenDelta,
)
from .observability import Observer
from .prompts import (
    Passage,
    PromptConfig,
    build_messages,
    citation_grammar,
    context_budget,
    pack_context,
    verified_citations,
)

__all__ = [
    "UNKNOWN_ANSWER",
    "AnswerService",
    "AskOutcome",
    "Caller",
    "CollectionDirectory",
]

logger = logging.getLogger(__name__)

UNKNOWN_ANSWER = "I don't know: none of the documents I can search answers that."


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the identity the access filter and the cache scope use."""

    user: str = "anonymous"
    scope: AccessScope = field(default_factory=AccessScope)
    collections: frozenset[str] | None = None  # None: every collection

    def may_use(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections


class CollectionDirectory(Protocol):
    """What the service needs to know about collections."""

    def names(self) -> list[str]: ...

    def retriever(self, collection: str) -> Retriever:
        """A retriever over the live generation (raises ``NotFound``)."""
        ...

    def query_embedder(self, collection: str) -> QueryEmbedder: ...

    def document_versions(
        self, collection: str, doc_ids: Sequence[str]
    ) -> dict[str, str | None]:
        """The content hash of each document in the live generation (None if gone)."""
        ...


@dataclass
class _Packing:
    """The passages a request shows its model; a fallback may pack them again."""

    packed: Any


@dataclass
class AskOutcome:
    """Everything ``/ask`` returns, before it becomes JSON."""

    answer: str
    citations: list[dict[str, Any]]
    usage: dict[str, int]
    model: str
    request_id: str
    cached: bool
    timings: dict[str, float]
    cache_kind: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "citations": self.citations,
            "usage": self.usage,
            "model": self.model,
            "request_id": self.request_id,
            "cached": self.cached,
            "timings": self.timings,
        }


@dataclass
class _Timer:
    started: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Any:
        begun = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + (
                time.perf_counter() - begun
            )

    def timings(self) -> dict[str, float]:
        retrieve = sum(self.stages.get(s, 0.0) for s in ("embed", "retrieve", "rerank"))
        return {
            "retrieve_ms": round(1000 * retrieve, 3),
            "generate_ms": round(1000 * self.stages.get("generate", 0.0), 3),
            "total_ms": round(1000 * (time.perf_counter() - self.started), 3),
        }


@dataclass
class _Prepared:
    """A checked request with its retriever and cache scope."""

    question: str
    collection: str
    top_k: int
    mode: SearchMode
    filters: SearchFilters
    retriever: Retriever
    cache_scope: CacheScope


class AnswerService:
    """Answers questions and runs searches for the HTTP layer."""

    def __init__(
        self,
        directory: CollectionDirectory,
        provider: Provider,
        prompt: PromptConfig,
        cache: AnswerCache,
        observer: Observer,
        *,
        max_question_chars: int = 2000,
        max_top_k: int = 50,
        default_mode: SearchMode = "hybrid",
        model: str | None = None,
    ) -> None:
        self._directory = directory
        self._provider = provider
        self._model = model
        self._prompt = prompt
        self._template = prompt.prompt_template()
        self._cache = cache
        self._observer = observer
        self._max_question_chars = max_question_chars
        self._max_top_k = max_top_k
        self._default_mode = default_mode

    @property
    def provider(self) -> Provider:
        return self._provider

    def collections(self) -> list[str]:
        """The names of the collections the service answers from."""
        return self._directory.names()

    @property
    def cache(self) -> AnswerCache:
        return self._cache

    # -- /search -----------------------------------------------------------

    async def search(
        self,
        query: str,
        collection: str,
        caller: Caller,
        *,
        top_k: int = 5,
        mode: SearchMode | None = None,
        filters: SearchFilters | None = None,
        request_id: str | None = None,
    ) -> list[SearchHit]:
        """The passages ``caller`` may see that best match ``query``."""
        prepared = self._prepare(query, collection, caller, top_k, mode, filters)
        timer = _Timer()
        with self._observer.span("search", collection=collection):
            hits = await self._retrieve(prepared, caller, timer, None)
        self._observer.request_done("search", timer.stages)
        return hits

    # -- /ask --------------------------------------------------------------

    async def ask(
        self,
        question: str,
        collection: str,
        caller: Caller,
        *,
        top_k: int = 5,
        mode: SearchMode | None = None,
        filters: SearchFilters | None = None,
        request_id: str | None = None,
    ) -> AskOutcome:
        """A grounded answer with citations (see the module docstring)."""
        outcome: AskOutcome | None = None
        async for event in self._answer(
            question,
            collection,
            caller,
            top_k,
            mode,
            filters,
            stream=False,
            request_id=request_id,
        ):
            if isinstance(event, AskOutcome):
                outcome = event
        if outcome is None:  # pragma: no cover - _answer always ends with one
            raise RuntimeError("the answer pipeline ended without an answer")
        return outcome

    def ask_stream(
        self,
        question: str,
        collection: str,
        caller: Caller,
        *,
        top_k: int = 5,
        mode: SearchMode | None = None,
        filters: SearchFilters | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[TokenDelta | AskOutcome]:
        """Token deltas as the model writes them, then the whole outcome."""
        return self._answer(
            question,
            collection,
            caller,
            top_k,
            mode,
            filters,
            stream=True,
            request_id=request_id,
        )

    async def _answer(
        self,
        question: str,
        collection: str,
        caller: Caller,
        top_k: int,
        mode: SearchMode | None,
        filters: SearchFilters | None,
        *,
        stream: bool,
        request_id: str | None,
    ) -> AsyncIterator[TokenDelta | AskOutcome]:
        """The steps below, as one ``ask`` span that the stages' spans sit in."""
        request_id = request_id or uuid.uuid4().hex
        with self._observer.span("ask", collection=collection, request_id=request_id):
            async for event in self._answer_steps(
                question,
                collection,
                caller,
                top_k,
                mode,
                filters,
                stream=stream,
                request_id=request_id,
            ):
                yield event

    async def _answer_steps(
        self,
        question: str,
        collection: str,
        caller: Caller,
        top_k: int,
        mode: SearchMode | None,
        filters: SearchFilters | None,
        *,
        stream: bool,
        request_id: str,
    ) -> AsyncIterator[TokenDelta | AskOutcome]:
        timer = _Timer()
        prepared = self._prepare(question, collection, caller, top_k, mode, filters)
        versions = self._version_lookup(prepared.collection)

        with self._observer.span("cache.exact"):
            hit = self._cache.get_exact(
                prepared.cache_scope, prepared.question, versions
            )
        self._observer.cache_lookup("exact", hit is not None)
        if hit is not None:
            cached = self._from_cache(hit.payload, request_id, timer, "exact")
            if stream:
                yield TokenDelta(cached.answer)
            yield cached
            return

        with timer.stage("embed"), self._observer.span("embed"):
            vector = await self._directory.query_embedder(collection).embed(
                prepared.question
            )
        with self._observer.span("cache.semantic"):
            hit = self._cache.get_semantic(prepared.cache_scope, vector[0], versions)
        self._observer.cache_lookup("semantic", hit is not None)
        if hit is not None:
            cached = self._from_cache(hit.payload, request_id, timer, "semantic")
            if stream:
                yield TokenDelta(cached.answer)
            yield cached
            return

        hits = await self._retrieve(prepared, caller, timer, vector)
        result: GenerationResult | None = None
        packed = None
        relevant = self._relevant(hits)
        if relevant:
            with timer.stage("generate"), self._observer.span("generate"):
                packing, request = self._generation_request(
                    prepared, relevant, request_id
                )
                if stream:
                    async for event in self._provider.stream(request):
                        if isinstance(event, TokenDelta):
                            yield event
                        else:
                            result = event
                else:
                    result = await self._provider.generate(request)
                # A fallback model with a smaller window may have had the
                # passages packed again: cite from what it was shown.
                packed = packing.packed

        outcome = self._outcome(result, packed, relevant, request_id, timer)
        if result is not None and outcome.citations:
            self._remember(prepared, vector, outcome)
        self._observer.request_done("ask", timer.stages, outcome.usage)
        logger.debug(
            "ask: request_id=%s user=%s collection=%s generation=%d passages=%d "
            "cited=%d prompt_tokens=%d completion_tokens=%d total_ms=%.1f",
            request_id,
            caller.user,
            collection,
            prepared.retriever.generation.id,
            len(hits),
            len(outcome.citations),
            outcome.usage["prompt_tokens"],
            outcome.usage["completion_tokens"],
            outcome.timings["total_ms"],
        )
        if stream and result is None:
            yield TokenDelta(outcome.answer)
        yield outcome

    # -- steps -------------------------------------------------------------

    def _prepare(
        self,
        question: str,
        collection: str,
        caller: Caller,
        top_k: int,
        mode: SearchMode | None,
        filters: SearchFilters | None,
    ) -> _Prepared:
        text = question.strip()
        if not text:
            raise RequestError("The question is empty; send the text to answer.")
        if len(text) > self._max_question_chars:
            raise RequestError(
                f"The question has {len(text)} characters; the limit is "
                f"{self._max_question_chars} (serve.max_question_chars)."
            )
        if not 1 <= top_k <= self._max_top_k:
            raise RequestError(
                f"top_k must be between 1 and {self._max_top_k}, not {top_k}."
            )
        if not caller.may_use(collection):
            raise AccessDenied(
                f"{caller.user} may not use the collection {collection!r}; ask an "
                "administrator to grant it."
            )
        retriever = self._directory.retriever(collection)
        mode = mode or self._default_mode
        filters = filters or SearchFilters()
        scope = CacheScope(
            collection=collection,
            generation=retriever.generation.id,
            prompt_version=self._prompt.prompt_version,
            model=self._model or _model_name(self._provider),
            top_k=top_k,
            mode=mode,
            access_labels=[f"scope:{caller.scope.fingerprint}"],
            filters=filters.model_dump(mode="json", exclude_defaults=True),
        )
        return _Prepared(text, collection, top_k, mode, filters, retriever, scope)

    async def _retrieve(
        self,
        prepared: _Prepared,
        caller: Caller,
        timer: _Timer,
        vector: VectorArray | None,
    ) -> list[SearchHit]:
        if vector is None and prepared.mode != "lexical":
            with timer.stage("embed"), self._observer.span("embed"):
                embedder = self._directory.query_embedder(prepared.collection)
                vector = await embedder.embed(prepared.question)
        plan = functools.partial(
            prepared.retriever.plan,
            prepared.question,
            prepared.top_k,
            mode=prepared.mode,
            filters=prepared.filters,
            scope=caller.scope,
            query_vector=vector,
        )
        with timer.stage("retrieve"), self._observer.span("retrieve"):
            if prepared.mode != "dense":
                return await asyncio.to_thread(
                    lambda: prepared.retriever.finish(plan())
                )
            # A dense search reads the index and a few catalog rows: about 2 ms
            # even at 100k chunks, less than handing it to a thread costs under
            # load. Only a plan that must look further goes to a thread.
            ready = plan()
            if ready.quick:
                return prepared.retriever.finish(ready)
            return await asyncio.to_thread(prepared.retriever.finish, ready)

    def _relevant(self, hits: Sequence[SearchHit]) -> list[SearchHit]:
        floor = self._prompt.min_score
        if floor is None:
            return list(hits)
        return [h for h in hits if h.dense_score is not None and h.dense_score >= floor]

    def _generation_request(
        self, prepared: _Prepared, hits: Sequence[SearchHit], request_id: str
    ) -> tuple[_Packing, GenerationRequest]:
        passages = [_passage(hit, rank) for rank, hit in enumerate(hits)]
        packing = _Packing(self._pack(prepared, passages, self._provider.count_tokens))

        def repack(
            prompt_tokens: int, count: Callable[[str], int]
        ) -> list[ChatMessage]:
            window = prompt_tokens + self._prompt.reserve_answer_tokens
            packing.packed = self._pack(prepared, passages, count, window)
            return build_messages(self._template, prepared.question, packing.packed)

        packed = packing.packed
        request = GenerationRequest(
            messages=build_messages(self._template, prepared.question, packed),
            max_tokens=self._prompt.reserve_answer_tokens,
            temperature=0.0,
            model=self._model,
            grammar=(
                citation_grammar(len(packed))
                if self._template.cite_by_grammar and len(packed)
                else None
            ),
            metadata={"request_id": request_id, "collection": prepared.collection},
            repack=repack,
        )
        return packing, request

    def _pack(
        self,
        prepared: _Prepared,
        passages: list[Passage],
        count: Callable[[str], int],
        window: int | None = None,
    ) -> Any:
        budget = context_budget(
            self._template,
            prepared.question,
            count,
            self._provider.context_window if window is None else window,
            self._prompt,
        )
        return pack_context(passages, count, budget)

    def _outcome(
        self,
        result: GenerationResult | None,
        packed: Any,
        hits: Sequence[SearchHit],
        request_id: str,
        timer: _Timer,
    ) -> AskOutcome:
        if result is None:
            return AskOutcome(
                answer=UNKNOWN_ANSWER,
                citations=[],
                usage={"prompt_tokens": 0, "completion_tokens": 0},
                model=self._model or _model_name(self._provider),
                request_id=request_id,
                cached=False,
                timings=timer.timings(),
            )
        scores = {hit.chunk_id: hit.score for hit in hits}
        citations = [
            _citation(cited.number, cited.passage, scores[cited.passage.chunk_id])
            for cited in verified_citations(result.text, packed)
        ]
        return AskOutcome(
            answer=result.text.strip(),
            citations=citations,
            usage={
                "prompt_tokens": result.usage.prompt_tokens,
                "completion_tokens": result.usage.completion_tokens,
            },
            model=result.model or self._provider.name,
            request_id=request_id,
            cached=False,
            timings=timer.timings(),
        )

    def _remember(
        self, prepared: _Prepared, vector: VectorArray, outcome: AskOutcome
    ) -> None:
        doc_ids = sorted({c["doc_id"] for c in outcome.citations})
        versions = self._directory.document_versions(prepared.collection, doc_ids)
        if any(v is None for v in versions.values()):
            return  # a cited document vanished while we answered: don't keep it
        self._cache.put(
            prepared.cache_scope,
            prepared.question,
            vector[0],
            outcome.to_json(),
            {d: v for d, v in versions.items() if v is not None},
        )

    def _from_cache(
        self, payload: Mapping[str, Any], request_id: str, timer: _Timer, kind: str
    ) -> AskOutcome:
        outcome = AskOutcome(
            answer=payload["answer"],
            citations=list(payload["citations"]),
            usage={"prompt_tokens": 0, "completion_tokens": 0},
            model=payload["model"],
            request_id=request_id,
            cached=True,
            timings=timer.timings(),
            cache_kind=kind,
        )
        self._observer.request_done("ask", timer.stages, outcome.usage)
        return outcome

    def _version_lookup(
        self, collection: str
    ) -> Callable[[Sequence[str]], Mapping[str, str | None]]:
        def lookup(doc_ids: Sequence[str]) -> Mapping[str, str | None]:
            return self._directory.document_versions(collection, list(doc_ids))

        return lookup


def _model_name(provider: Provider) -> str:
    """The model behind a provider, for cache keys: a new model never reuses answers."""
    return str(getattr(provider, "model", None) or provider.name)


def _passage(hit: SearchHit, rank: int) -> Passage:
    # Packing takes the best score first: give it the retrieval order (MMR and
    # reranking may order hits otherwise than their scores).
    return Passage(
        chunk_id=hit.chunk_id,
        doc_id=hit.doc_id,
        uri=hit.uri,
        title=hit.title,
        text=hit.text,
        score=-float(rank),
        # The content was read from the source then: the answer holds as of it.
        as_of=hit.indexed_at or hit.modified_at,
    )


def _citation(number: int, passage: Passage, score: float) -> dict[str, Any]:
    as_of: datetime | None = passage.as_of
    return {
        "n": number,
        "doc_id": passage.doc_id,
        "chunk_id": passage.chunk_id,
        "uri": passage.uri,
        "title": passage.title,
        "score": round(score, 6),
        "as_of": as_of.isoformat() if as_of else None,
    }
