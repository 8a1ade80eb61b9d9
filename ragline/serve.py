"""Assembly of the HTTP service: live collections, the model, the cache, the app.

:class:`LiveCollections` is the service's view of the catalog and the vector
indexes. It never writes: a FAISS generation is followed read-only
(:class:`~index.vectors.follower.FollowingIndex`), so ``ragline ingest`` can
run beside the service, whose searches see each committed batch within
``serve.index_check_seconds``. Promotion and rollback are noticed on the same
clock: the next request after the check runs against the new generation,
while requests already running finish on the old one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request

from eval.api import eval_router
from eval.compare import compare, summarize
from eval.store import EvalStore
from index.catalog import Generation
from index.vectors import open_vector_index
from index.vectors.base import VectorIndex
from index.vectors.follower import FollowingIndex
from ingestion.embedding import Embedder
from ingestion.errors import AccessDenied, GenerationError
from retrieval.batching import QueryEmbedder
from retrieval.rerank import CrossEncoderReranker, Reranker
from retrieval.retriever import Retriever
from serving.admin_api import admin_router
from serving.app import Readiness, create_app
from serving.auth import Authenticator
from serving.cache import AnswerCache, open_answer_cache
from serving.gateway.anthropic import AnthropicProvider
from serving.gateway.audit import AuditLog
from serving.gateway.budgets import Budgets
from serving.gateway.config import GatewayConfig, LlamaCppTargetConfig
from serving.gateway.core import Gateway
from serving.gateway.identity import Authenticator as Identities
from serving.gateway.llamacpp import LlamaCppProvider
from serving.gateway.loopguard import LoopGuard
from serving.gateway.openai_compat import OpenAICompatibleProvider
from serving.gateway.policy import Policy
from serving.gateway.providers import Provider
from serving.gateway.ratelimit import RateLimiter
from serving.gateway.routing import (
    Router,
    RouterConfig,
    TargetConfig,
    VirtualModelConfig,
)
from serving.gateway.store import ApiKeyStore
from serving.ingest_api import ingest_router
from serving.observability import Observer
from serving.openai_api import openai_router
from serving.service import AnswerService

from .runtime import Runtime

__all__ = ["LiveCollections", "build_app", "build_gateway"]

logger = logging.getLogger(__name__)


@dataclass
class _Live:
    generation: Generation
    index: VectorIndex
    retriever: Retriever


class LiveCollections:
    """The live generation of every collection, reopened when it changes."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        check_seconds: float = 1.0,
        reranker: Reranker | None = None,
    ) -> None:
        self._runtime = runtime
        self._settings = runtime.settings
        self._check_seconds = check_seconds
        self._reranker = reranker
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._retired: dict[str, _Live] = {}
        self._checked: dict[str, float] = {}
        self._embedders: dict[str, QueryEmbedder] = {}

    def names(self) -> list[str]:
        return [c.name for c in self._settings.collections]

    def retriever(self, collection: str) -> Retriever:
        """A retriever over the live generation; raises ``NotFound`` or ``GenerationError``."""
        return self._current(collection).retriever

    def query_embedder(self, collection: str) -> QueryEmbedder:
        config = self._settings.collection(collection)
        key = repr(self._settings.embedder_for(config))
        with self._lock:
            if key not in self._embedders:
                self._embedders[key] = QueryEmbedder(
                    self._query_model(collection), self._settings.retrieval.batching
                )
            return self._embedders[key]

    def document_versions(
        self, collection: str, doc_ids: Sequence[str]
    ) -> dict[str, str | None]:
        generation = self._current(collection).generation
        return self._runtime.catalog.document_versions(generation.id, list(doc_ids))

    def open_all(self) -> dict[str, str]:
        """Open every collection that has a live generation; the state of each."""
        states = {}
        for name in self.names():
            try:
                live = self._current(name)
                states[name] = f"live generation {live.generation.id}"
            except GenerationError:
                states[name] = "empty: no live generation yet (run `ragline ingest`)"
        return states

    def index_sizes(self) -> dict[str, tuple[int, int]]:
        """(generation, live chunks) of every open collection."""
        with self._lock:
            opened = dict(self._live)
        return {
            name: (live.generation.id, live.index.count())
            for name, live in opened.items()
        }

    async def close(self) -> None:
        for embedder in list(self._embedders.values()):
            await embedder.close()
        with self._lock:
            for live in [*self._live.values(), *self._retired.values()]:
                live.index.close()
            self._live.clear()
            self._retired.clear()

    # -- keeping up with the catalog ---------------------------------------

    def _current(self, collection: str) -> _Live:
        config = self._settings.collection(collection)  # NotFound for unknown names
        now = time.monotonic()
        with self._lock:
            live = self._live.get(config.name)
            due = now - self._checked.get(config.name, float("-inf"))
            if live is not None and due < self._check_seconds:
                return live
            self._checked[config.name] = now
            generation = self._runtime.catalog.live_generation(config.name)
            if generation is None:
                raise GenerationError(
                    f"Collection {config.name!r} has no live generation yet; run "
                    "`ragline ingest` to build one."
                )
            if live is not None and live.generation.id == generation.id:
                return live
            fresh = self._open(generation)
            if live is not None:
                logger.info(
                    "serving a new generation: collection=%s generation=%d previous=%d",
                    config.name,
                    generation.id,
                    live.generation.id,
                )
                # Requests still running on the old one finish first: close the
                # generation before it instead.
                older = self._retired.pop(config.name, None)
                if older is not None:
                    older.index.close()
                self._retired[config.name] = live
            self._live[config.name] = fresh
            return fresh

    def _open(self, generation: Generation) -> _Live:
        collection = self._settings.collection(generation.collection)
        dim = int(
            generation.pipeline.get("dim") or self._query_model_dim(collection.name)
        )
        location = self._settings.data_dir / "indexes" / generation.backend
        index: VectorIndex
        if generation.backend == "faiss":
            index = FollowingIndex(
                location / generation.index_name,
                dim=dim,
                config=collection.faiss,
                check_seconds=self._check_seconds,
            )
        else:
            index = open_vector_index(
                "qdrant",
                location=location,
                name=generation.index_name,
                dim=dim,
                qdrant=collection.qdrant,
            )
        retriever = Retriever(
            self._runtime.catalog,
            index,
            generation,
            self._query_model(collection.name),
            self._settings.retrieval,
            self._reranker,
        )
        return _Live(generation, index, retriever)

    def _query_model(self, collection: str) -> Embedder:
        return self._runtime.embedder(self._settings.collection(collection)).inner

    def _query_model_dim(self, collection: str) -> int:
        return self._query_model(collection).dim


class _TracedReranker(Reranker):
    """A reranker whose every call is a ``rerank`` span inside ``retrieve``."""

    def __init__(self, inner: Reranker, observer: Observer) -> None:
        self._inner = inner
        self._observer = observer
        self.candidates = inner.candidates

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        with self._observer.span("rerank", passages=len(passages)):
            return self._inner.score(query, passages)


class _ServiceReadiness(Readiness):
    def __init__(
        self,
        collections: LiveCollections,
        provider: Provider,
        observer: Observer,
        freshness: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self._collections = collections
        self._provider = provider
        self._observer = observer
        self._freshness = freshness

    def check(self) -> tuple[bool, dict[str, Any]]:
        states = self._collections.open_all()
        for name, (generation, chunks) in self._collections.index_sizes().items():
            self._observer.index_size(name, generation, chunks)
        self._observer.source_freshness(self._freshness())
        model_ready = bool(getattr(self._provider, "loaded", True))
        return model_ready, {"model_loaded": model_ready, "collections": states}


def build_app(
    runtime: Runtime,
    *,
    provider: Provider | None = None,
    cache: AnswerCache | None = None,
    warm_up: bool = True,
) -> FastAPI:
    """The FastAPI app for these settings; ``provider`` and ``cache`` may be given.

    The app closes what it opened when it shuts down (the indexes, the
    runtime, and the model and cache unless they were given); a given
    provider or cache stays open for its owner.
    """
    settings = runtime.settings
    serve = settings.serve
    observer = Observer(serve.tracing)
    reranker = (
        _TracedReranker(CrossEncoderReranker(settings.retrieval.rerank), observer)
        if settings.retrieval.rerank is not None
        else None
    )
    collections = LiveCollections(
        runtime, check_seconds=serve.index_check_seconds, reranker=reranker
    )
    gateway = build_gateway(runtime, provider=provider)
    model = gateway.provider
    answer_cache = cache or open_answer_cache(serve.cache)
    service = AnswerService(
        collections,
        model,
        serve.prompt,
        answer_cache,
        observer,
        max_question_chars=serve.max_question_chars,
        max_top_k=settings.retrieval.max_top_k,
        default_mode=settings.retrieval.mode,
        model=gateway.ask_model,
    )

    def streams() -> dict[str, str]:
        return {s.name: s.collection for s in settings.sources if s.streaming}

    async def start() -> None:
        states = await asyncio.to_thread(collections.open_all)
        for name, state in states.items():
            logger.info("collection: name=%s state=%s", name, state)
        await gateway.start()
        if warm_up:
            for target in gateway.router.targets().values():
                await asyncio.to_thread(_warm_up, target)
            for name in collections.names():
                await collections.query_embedder(name).embed("warm up")

    async def stop() -> None:
        await collections.close()
        await gateway.close()  # a given provider is borrowed, and stays open
        if cache is None:
            answer_cache.close()
        runtime.close()

    return create_app(
        service,
        observer=observer,
        gateway=gateway,
        routers=[
            openai_router(service, gateway),
            admin_router(gateway),
            ingest_router(gateway, runtime.push, streams),
            _eval_reports(runtime, gateway),
        ],
        readiness=_ServiceReadiness(collections, model, observer, runtime.source_rows),
        freshness=runtime.source_rows,
        max_request_bytes=serve.max_request_bytes,
        on_startup=start,
        on_shutdown=stop,
    )


def _eval_reports(runtime: Runtime, gateway: Gateway) -> APIRouter:
    """``/eval``: the evaluation runs in the catalog, for callers of their collection."""
    settings = runtime.settings.eval
    stores: list[EvalStore] = []
    opening = threading.Lock()

    def store() -> EvalStore:
        with opening:
            if not stores:  # opened on first use, like the catalog
                stores.append(EvalStore(runtime.catalog.engine))
            return stores[0]

    async def readable(request: Request) -> Callable[[str], bool]:
        identity = await gateway.identify(request.headers)
        decided: dict[str, bool] = {}

        def may_read(collection: str) -> bool:
            if collection not in decided:
                try:
                    gateway.caller(identity, collection)
                    decided[collection] = True
                except AccessDenied:
                    decided[collection] = False
            return decided[collection]

        return may_read

    return eval_router(
        lambda run_id: store().load(run_id),
        lambda: store().list(limit=200),
        summarize,
        lambda run, baseline: compare(
            run,
            baseline,
            margins=settings.margins,
            floors=settings.floors,
            default_margin=settings.default_margin,
            pass_threshold=settings.pass_threshold,
            confidence=settings.confidence,
            resamples=settings.resamples,
        ),
        readable=readable,
    )


def _warm_up(provider: Provider) -> None:
    warm = getattr(provider, "warm_up", None)
    if callable(warm):
        warm()


# -- the gateway ------------------------------------------------------------------


class _Borrowed:
    """A provider the caller owns: the router uses it but never closes it."""

    def __init__(self, inner: Provider) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def context_window(self) -> int:
        return self._inner.context_window

    def count_tokens(self, text: str) -> int:
        return self._inner.count_tokens(text)

    async def generate(self, request: Any) -> Any:
        return await self._inner.generate(request)

    def stream(self, request: Any) -> Any:
        return self._inner.stream(request)

    async def close(self) -> None:
        """Leaves the provider open for its owner."""


def _targets(settings: Any, provider: Provider | None) -> dict[str, Provider]:
    config: GatewayConfig = settings.gateway
    if provider is not None:
        return {"local": _Borrowed(provider)}
    if not config.providers:
        return {"local": LlamaCppProvider(settings.serve.generator)}
    targets: dict[str, Provider] = {}
    for target in config.providers:
        if isinstance(target, LlamaCppTargetConfig):
            fields = target.model_dump(exclude={"type", "name"})
            targets[target.name] = LlamaCppProvider(
                settings.serve.generator.model_validate(fields)
            )
        elif target.type == "openai":
            targets[target.name] = OpenAICompatibleProvider(target)
        else:
            targets[target.name] = AnthropicProvider(target)
    return targets


def build_gateway(runtime: Runtime, *, provider: Provider | None = None) -> Gateway:
    """The governed core of these settings; ``provider`` replaces every target."""
    settings = runtime.settings
    config: GatewayConfig = settings.gateway
    targets = _targets(settings, provider)
    routing = config.routing
    if routing is None or provider is not None:
        routing = RouterConfig(
            models=(
                VirtualModelConfig(
                    name="default",
                    targets=tuple(
                        TargetConfig(target=name, priority=i)
                        for i, name in enumerate(targets)
                    ),
                ),
            )
        )
    router = Router(routing, targets)
    catalog_url = settings.catalog_url()
    key_store = None
    if config.identity is not None and config.identity.api_keys is not None:
        key_store = ApiKeyStore.from_config(
            runtime.catalog.engine, config.identity.api_keys
        )
    policy = Policy(
        config.policy,
        collections=[c.name for c in settings.collections],
        models=router.models(),
    )
    return Gateway(
        authenticator=Identities(config.identity, key_store=key_store),
        policy=policy,
        router=router,
        budgets=Budgets.open(config.budgets, catalog_url)
        if config.budgets.enabled
        else None,
        limiter=RateLimiter.open(config.rate_limits)
        if config.rate_limits.enabled
        else None,
        loop_guard=LoopGuard.open(config.loop_guard)
        if config.loop_guard.enabled
        else None,
        audit=AuditLog(catalog_url, config.audit) if config.audit.enabled else None,
        ask_model=config.ask_model if routing is config.routing else None,
        static_keys=Authenticator(settings.serve.auth)
        if config.identity is None and settings.serve.auth is not None
        else None,
        key_store=key_store,
    )
