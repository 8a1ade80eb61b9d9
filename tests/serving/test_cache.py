"""The contract every answer cache backend keeps (see ``serving/cache/base.py``).

One suite runs against the in-process cache and against Redis through the
``open_cache`` fixture. The Redis cases need the server at
``RAGLINE_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) and fail,
rather than skip, when it is not there. Each test writes under a prefix of
its own and checks that nothing is left under it afterwards.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pydantic
import pytest
import redis

from ingestion.errors import ConfigError
from serving.cache import (
    AnswerCache,
    CacheConfig,
    CacheScope,
    CacheStats,
    DisabledCache,
    InProcessCache,
    RedisCache,
    access_fingerprint,
    normalize_question,
    open_answer_cache,
)
from serving.cache.redis import masked_url

REDIS_URL = os.environ.get("RAGLINE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
UNREACHABLE_URL = "redis://:hunter2@127.0.0.1:1/0"
DIM = 16
QUESTION = "How long is the on-call rotation?"
ANSWER = {"answer": "One week.", "citations": [{"doc_id": "oncall"}]}
CITED = {"oncall": "hash-1"}


class Catalog:
    """A ``current_versions`` fake: the content hash of each document, and who asked."""

    def __init__(self, versions: Mapping[str, str] | None = None) -> None:
        self.versions = dict(CITED if versions is None else versions)
        self.asked: list[list[str]] = []

    def __call__(self, doc_ids: Sequence[str]) -> dict[str, str | None]:
        self.asked.append(list(doc_ids))
        return {doc_id: self.versions.get(doc_id) for doc_id in doc_ids}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Caches:
    """Opens caches of one backend under one key prefix; clears and closes them all."""

    def __init__(self, kind: str, prefix: str) -> None:
        self.kind = kind
        self.prefix = prefix
        self.clock = FakeClock()
        self._opened: list[AnswerCache] = []

    def __call__(self, **settings: Any) -> AnswerCache:
        config = CacheConfig(
            backend="redis" if self.kind == "redis" else "memory",
            redis_url=REDIS_URL,
            key_prefix=self.prefix,
            **settings,
        )
        cache: AnswerCache = (
            RedisCache(config)
            if self.kind == "redis"
            else InProcessCache(config, clock=self.clock)
        )
        self._opened.append(cache)
        return cache

    def wait(self, seconds: float) -> None:
        """Let ``seconds`` pass: on the fake clock in process, for real in Redis."""
        if self.kind == "redis":
            time.sleep(seconds)
        else:
            self.clock.now += seconds

    def close_all(self) -> None:
        for cache in self._opened:
            cache.clear()
            cache.close()


@contextmanager
def opened_caches(kind: str) -> Iterator[Caches]:
    """Caches of ``kind`` under a fresh prefix; for Redis, nothing may be left under it."""
    prefix = f"ragline-test:{uuid.uuid4().hex[:12]}:"
    if kind == "memory":
        caches = Caches("memory", prefix)
        yield caches
        caches.close_all()
        return

    client = _redis_client()
    caches = Caches("redis", prefix)
    try:
        yield caches
        caches.close_all()
        left = list(client.scan_iter(match=f"{prefix}*"))
    finally:
        client.close()
    assert left == [], f"clear() left these keys behind: {left}"


@pytest.fixture(params=["memory", "redis"])
def open_cache(request: pytest.FixtureRequest) -> Iterator[Caches]:
    with opened_caches(request.param) as caches:
        yield caches


@pytest.fixture
def open_redis_cache() -> Iterator[Caches]:
    with opened_caches("redis") as caches:
        yield caches


@pytest.fixture
def cache_warnings(
    caplog: pytest.LogCaptureFixture,
) -> Iterator[pytest.LogCaptureFixture]:
    """Warnings of the Redis backend, caught even if logging was configured."""
    logger = logging.getLogger("serving.cache.redis")
    # The handler sits on the logger itself; stop propagation meanwhile, or
    # the root logger's copy of the same handler would see each record twice.
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


def _redis_client() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as err:
        client.close()
        pytest.fail(
            f"Redis is not reachable at {masked_url(REDIS_URL)} ({err}); start it "
            "(redis-server --daemonize yes) or set RAGLINE_TEST_REDIS_URL."
        )
    return client


def scope(**changes: Any) -> CacheScope:
    fields: dict[str, Any] = {
        "collection": "docs",
        "generation": 3,
        "prompt_version": "ask-v1",
        "model": "smollm2",
        "top_k": 5,
        "mode": "hybrid",
        "access_labels": ("team-a",),
        "filters": {"source": "handbook"},
    }
    return CacheScope(**(fields | changes))


def unit(axis: int) -> np.ndarray:
    vector = np.zeros(DIM, dtype=np.float32)
    vector[axis] = 1.0
    return vector


def at_cosine(axis: int, cosine: float, towards: int = DIM - 1) -> np.ndarray:
    """A unit vector whose cosine similarity with ``unit(axis)`` is ``cosine``."""
    vector = cosine * unit(axis) + math.sqrt(1.0 - cosine**2) * unit(towards)
    return vector.astype(np.float32)


def put(
    cache: AnswerCache,
    where: CacheScope | None = None,
    question: str = QUESTION,
    embedding: np.ndarray | None = None,
    payload: Mapping[str, Any] = ANSWER,
    cited: Mapping[str, str] = CITED,
) -> None:
    cache.put(
        where or scope(),
        question,
        unit(0) if embedding is None else embedding,
        payload,
        cited,
    )


# --- the contract, for every backend -------------------------------------------------


def test_an_answer_put_is_found_by_the_same_question(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache)

    hit = cache.get_exact(scope(), QUESTION, Catalog())

    assert hit is not None, "the answer just put was not found"
    assert hit.payload == ANSWER, hit.payload
    assert (hit.kind, hit.similarity) == ("exact", 1.0), hit


@pytest.mark.parametrize(
    "asked",
    [
        "how long is the on-call rotation",
        "  HOW LONG  is\tthe on-call\nrotation ?? ",
        "How long is the on-call rotation.",
        "Ｈｏｗ long is the on-call rotation？",
    ],
)
def test_case_spacing_and_trailing_punctuation_do_not_change_the_exact_key(
    open_cache: Caches, asked: str
) -> None:
    cache = open_cache()
    put(cache)

    assert cache.get_exact(scope(), asked, Catalog()) is not None, f"{asked!r} missed"


def test_a_different_question_is_an_exact_miss(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache)

    hit = cache.get_exact(scope(), "Who do I escalate to?", Catalog())

    assert hit is None, "another question hit the cached answer"


def test_callers_with_different_access_labels_never_share_an_exact_answer(
    open_cache: Caches,
) -> None:
    cache = open_cache()
    put(cache, scope(access_labels=("team-a", "secret")))

    for labels in [("team-a",), (), ("secret",), ("team-a", "secret", "hr")]:
        hit = cache.get_exact(scope(access_labels=labels), QUESTION, Catalog())
        assert hit is None, f"a caller holding {labels} saw an answer made for others"
    same = scope(access_labels=["secret", "team-a", "secret"])
    assert cache.get_exact(same, QUESTION, Catalog()) is not None, (
        "the same labels in another order missed"
    )


def test_callers_with_different_access_labels_never_share_a_semantic_answer(
    open_cache: Caches,
) -> None:
    cache = open_cache()
    put(cache, scope(access_labels=("team-a", "secret")), embedding=unit(0))

    hit = cache.get_semantic(scope(access_labels=("team-a",)), unit(0), Catalog())

    assert hit is None, "an identical embedding crossed access labels"


@pytest.mark.parametrize(
    "change",
    [
        {"collection": "wiki"},
        {"generation": 4},
        {"prompt_version": "ask-v2"},
        {"model": "other-model"},
        {"top_k": 10},
        {"mode": "dense"},
        {"filters": {"source": "wiki"}},
        {"filters": None},
    ],
    ids=lambda change: next(iter(change)),
)
def test_any_other_change_of_scope_misses_both_lookups(
    open_cache: Caches, change: dict[str, Any]
) -> None:
    cache = open_cache()
    put(cache, embedding=unit(0))
    changed = scope(**change)

    assert cache.get_exact(changed, QUESTION, Catalog()) is None, (
        f"exact hit with {change}"
    )
    assert cache.get_semantic(changed, unit(0), Catalog()) is None, (
        f"semantic hit with {change}"
    )


def test_filters_in_another_key_order_are_the_same_scope(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache, scope(filters={"source": "handbook", "lang": "en"}))

    hit = cache.get_exact(
        scope(filters={"lang": "en", "source": "handbook"}), QUESTION, Catalog()
    )

    assert hit is not None, "equal filters written in another order missed"


def test_a_close_question_is_a_semantic_hit_with_its_similarity(
    open_cache: Caches,
) -> None:
    cache = open_cache()
    put(cache, embedding=unit(0))

    hit = cache.get_semantic(scope(), at_cosine(0, 0.97), Catalog())

    assert hit is not None, "a question at cosine 0.97 missed a 0.95 threshold"
    assert hit.kind == "semantic", hit
    assert hit.similarity == pytest.approx(0.97, abs=1e-5), hit.similarity
    assert hit.payload == ANSWER, hit.payload


def test_a_question_below_the_threshold_is_a_semantic_miss(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache, embedding=unit(0))

    hit = cache.get_semantic(scope(), at_cosine(0, 0.93), Catalog())

    assert hit is None, "a question at cosine 0.93 hit a 0.95 threshold"


def test_the_threshold_is_a_setting(open_cache: Caches) -> None:
    cache = open_cache(semantic_threshold=0.9)
    put(cache, embedding=unit(0))

    hit = cache.get_semantic(scope(), at_cosine(0, 0.93), Catalog())

    assert hit is not None, "a question at cosine 0.93 missed a 0.9 threshold"


def test_the_most_similar_answer_wins(open_cache: Caches) -> None:
    cache = open_cache(semantic_threshold=0.5)
    put(cache, question="first", embedding=unit(0), payload={"answer": "first"})
    put(cache, question="second", embedding=unit(1), payload={"answer": "second"})
    query = (0.6 * unit(0) + 0.8 * unit(1)).astype(np.float32)

    hit = cache.get_semantic(scope(), query, Catalog())

    assert hit is not None and hit.payload == {"answer": "second"}, hit


def test_a_semantic_lookup_only_sees_its_own_scope(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache, scope(generation=3), embedding=unit(0), payload={"answer": "old"})
    put(cache, scope(generation=4), embedding=unit(1), payload={"answer": "new"})

    hit = cache.get_semantic(scope(generation=4), unit(0), Catalog())

    assert hit is None, f"generation 4 found generation 3's answer: {hit}"


def test_an_embedding_that_is_not_normalised_is_compared_by_cosine(
    open_cache: Caches,
) -> None:
    cache = open_cache()
    put(cache, embedding=3.0 * unit(0))

    hit = cache.get_semantic(scope(), 0.5 * at_cosine(0, 0.97), Catalog())

    assert hit is not None and hit.similarity == pytest.approx(0.97, abs=1e-5), hit


def test_a_changed_cited_document_drops_the_answer(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache)

    changed = cache.get_exact(scope(), QUESTION, Catalog({"oncall": "hash-2"}))
    later = cache.get_exact(scope(), QUESTION, Catalog())

    assert changed is None, "an answer citing a changed document was returned"
    assert later is None, "the stale answer stayed in the cache"
    assert cache.stats().stale == 1, cache.stats()


def test_a_changed_cited_document_drops_a_semantic_answer(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache, embedding=unit(0))

    changed = cache.get_semantic(scope(), unit(0), Catalog({"oncall": "hash-2"}))

    assert changed is None, "an answer citing a changed document was returned"
    assert cache.get_semantic(scope(), unit(0), Catalog()) is None, "stale vector kept"
    assert cache.get_exact(scope(), QUESTION, Catalog()) is None, "stale entry kept"


def test_a_deleted_cited_document_drops_the_answer(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache, cited={"oncall": "hash-1", "escalation": "hash-9"})

    hit = cache.get_exact(scope(), QUESTION, Catalog({"oncall": "hash-1"}))

    assert hit is None, "an answer citing a deleted document was returned"


def test_the_version_check_is_asked_about_exactly_the_cited_documents(
    open_cache: Caches,
) -> None:
    cache = open_cache()
    put(cache, cited={"oncall": "hash-1", "escalation": "hash-9"})
    catalog = Catalog({"oncall": "hash-1", "escalation": "hash-9"})

    hit = cache.get_exact(scope(), QUESTION, catalog)

    assert hit is not None, "an answer whose documents are unchanged missed"
    assert [sorted(ids) for ids in catalog.asked] == [["escalation", "oncall"]], (
        catalog.asked
    )


def test_an_answer_citing_nothing_needs_no_version_check(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache, payload={"answer": "I do not know."}, cited={})
    catalog = Catalog()

    hit = cache.get_exact(scope(), QUESTION, catalog)

    assert hit is not None and catalog.asked == [], (hit, catalog.asked)


def test_answers_expire_after_the_ttl(open_cache: Caches) -> None:
    cache = open_cache(ttl_seconds=1)
    put(cache, embedding=unit(0))

    open_cache.wait(1.1)

    assert cache.get_exact(scope(), QUESTION, Catalog()) is None, (
        "exact hit after its TTL"
    )
    assert cache.get_semantic(scope(), unit(0), Catalog()) is None, (
        "semantic hit after its TTL"
    )


def test_each_scope_keeps_at_most_max_entries_per_scope_embeddings(
    open_cache: Caches,
) -> None:
    cache = open_cache(max_entries_per_scope=2)
    for axis in range(3):
        put(cache, question=f"question {axis}", embedding=unit(axis))
        open_cache.wait(0.01)

    oldest = cache.get_semantic(scope(), unit(0), Catalog())
    newest = [cache.get_semantic(scope(), unit(axis), Catalog()) for axis in (1, 2)]

    assert oldest is None, "the oldest embedding outlived the bound of 2"
    assert all(hit is not None for hit in newest), newest
    assert cache.get_exact(scope(), "question 0", Catalog()) is not None, (
        "dropping an embedding must keep its exact entry"
    )


def test_putting_the_same_question_again_replaces_the_answer(
    open_cache: Caches,
) -> None:
    cache = open_cache()
    put(cache, embedding=unit(0), payload={"answer": "old"})
    put(cache, embedding=unit(1), payload={"answer": "new"})

    exact = cache.get_exact(scope(), QUESTION, Catalog())
    by_old_vector = cache.get_semantic(scope(), unit(0), Catalog())

    assert exact is not None and exact.payload == {"answer": "new"}, exact
    assert by_old_vector is None, (
        f"the replaced embedding still matched: {by_old_vector}"
    )


def test_a_hit_returns_a_copy_that_callers_may_change(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache)

    first = cache.get_exact(scope(), QUESTION, Catalog())
    assert first is not None, "the answer just put was not found"
    first.payload["answer"] = "changed by a caller"
    second = cache.get_exact(scope(), QUESTION, Catalog())

    assert second is not None and second.payload == ANSWER, second


def test_a_payload_that_is_not_json_is_refused(open_cache: Caches) -> None:
    cache = open_cache()

    with pytest.raises(TypeError, match="not JSON-able"):
        put(cache, payload={"answer": object()})


def test_invalidating_a_document_drops_every_answer_citing_it(
    open_cache: Caches,
) -> None:
    cache = open_cache()
    put(cache, scope(generation=3), cited={"oncall": "h1"})
    put(
        cache,
        scope(generation=4),
        embedding=unit(1),
        cited={"oncall": "h1", "hr": "h2"},
    )
    put(cache, question="Expense limit?", cited={"finance": "h3"})

    found = cache.invalidate_documents(["oncall"])
    catalog = Catalog({"oncall": "h1", "hr": "h2", "finance": "h3"})

    assert found == 2, f"expected the 2 answers citing 'oncall', found {found}"
    assert cache.get_exact(scope(generation=3), QUESTION, catalog) is None, "gen 3 kept"
    assert cache.get_exact(scope(generation=4), QUESTION, catalog) is None, "gen 4 kept"
    assert cache.get_semantic(scope(generation=4), unit(1), catalog) is None, (
        "vector kept"
    )
    assert cache.get_exact(scope(), "Expense limit?", catalog) is not None, (
        "an answer citing another document was dropped"
    )


def test_stats_count_hits_misses_and_stale_answers(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache, embedding=unit(0))

    cache.get_exact(scope(), QUESTION, Catalog())
    cache.get_exact(scope(), "something else", Catalog())
    cache.get_semantic(scope(), unit(0), Catalog())
    cache.get_semantic(scope(), unit(1), Catalog())
    cache.get_semantic(scope(), unit(0), Catalog({"oncall": "hash-2"}))

    assert cache.stats() == CacheStats(
        exact_hits=1, exact_misses=1, semantic_hits=1, semantic_misses=2, stale=1
    ), cache.stats()


def test_clear_drops_every_answer(open_cache: Caches) -> None:
    cache = open_cache()
    put(cache, scope(generation=3), embedding=unit(0))
    put(cache, scope(generation=4), embedding=unit(0))

    cache.clear()

    for generation in (3, 4):
        where = scope(generation=generation)
        assert cache.get_exact(where, QUESTION, Catalog()) is None, (
            f"gen {generation} kept"
        )
        assert cache.get_semantic(where, unit(0), Catalog()) is None, (
            f"gen {generation}"
        )


def test_with_semantic_off_only_exact_lookups_hit(open_cache: Caches) -> None:
    cache = open_cache(semantic=False)
    put(cache, embedding=unit(0))

    assert cache.get_semantic(scope(), unit(0), Catalog()) is None, (
        "semantic hit while off"
    )
    assert cache.get_exact(scope(), QUESTION, Catalog()) is not None, "exact missed"


# --- what only the in-process cache promises ----------------------------------------


def test_the_least_recently_used_answer_is_evicted_first_in_process() -> None:
    cache = InProcessCache(CacheConfig(max_entries=2))
    put(cache, question="first")
    put(cache, question="second")
    cache.get_exact(scope(), "first", Catalog())

    put(cache, question="third")

    assert len(cache) == 2, f"{len(cache)} entries kept under a bound of 2"
    assert cache.get_exact(scope(), "second", Catalog()) is None, "the LRU entry stayed"
    for kept in ("first", "third"):
        assert cache.get_exact(scope(), kept, Catalog()) is not None, (
            f"{kept} was evicted"
        )


def test_concurrent_puts_and_gets_keep_the_bounds_in_process() -> None:
    cache = InProcessCache(CacheConfig(max_entries=50, max_entries_per_scope=20))
    errors: list[BaseException] = []
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(400, DIM)).astype(np.float32)

    def work(worker: int) -> None:
        try:
            for i in range(100):
                where = scope(generation=i % 3)
                question = f"question {worker}-{i}"
                put(cache, where, question, vectors[(worker * 100 + i) % 400])
                cache.get_exact(where, question, Catalog())
                cache.get_semantic(where, vectors[i], Catalog())
        except BaseException as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == [], errors
    assert len(cache) <= 50, f"{len(cache)} entries kept under a bound of 50"
    stats = cache.stats()
    assert stats.exact_hits + stats.exact_misses == 400, stats


# --- what only the Redis cache promises ---------------------------------------------


def test_an_unreachable_redis_is_a_miss_with_a_warning(
    cache_warnings: pytest.LogCaptureFixture,
) -> None:
    cache = RedisCache(CacheConfig(backend="redis", redis_url=UNREACHABLE_URL))

    exact = cache.get_exact(scope(), QUESTION, Catalog())
    semantic = cache.get_semantic(scope(), unit(0), Catalog())
    cache.close()

    assert (exact, semantic) == (None, None), (exact, semantic)
    assert cache.stats().errors == 1, (
        f"the pause after the first error: {cache.stats()}"
    )
    warning = _only_warning(cache_warnings)
    assert isinstance(warning.args, dict), warning.args
    assert warning.args["url"] == "redis://:***@127.0.0.1:1/0", warning.args
    assert warning.args["operation"] == "get_exact", warning.args
    assert "hunter2" not in warning.getMessage(), warning.getMessage()


def test_a_put_to_an_unreachable_redis_is_skipped_with_a_warning(
    cache_warnings: pytest.LogCaptureFixture,
) -> None:
    cache = RedisCache(CacheConfig(backend="redis", redis_url=UNREACHABLE_URL))

    put(cache)
    cache.invalidate_documents(["oncall"])
    cache.clear()
    cache.close()

    warning = _only_warning(cache_warnings)
    assert isinstance(warning.args, dict) and warning.args["operation"] == "put", (
        warning
    )


def _only_warning(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, (
        f"expected one warning, got {[r.getMessage() for r in warnings]}"
    )
    return warnings[0]


def test_a_value_that_is_not_an_answer_is_a_miss_and_is_deleted(
    open_redis_cache: Caches, cache_warnings: pytest.LogCaptureFixture
) -> None:
    cache = open_redis_cache()
    put(cache)
    client = _redis_client()
    [key] = client.scan_iter(match=f"{open_redis_cache.prefix}*:e:*")
    client.set(key, b"not json", ex=60)

    hit = cache.get_exact(scope(), QUESTION, Catalog())

    left = client.exists(key)
    client.close()
    assert hit is None, hit
    assert left == 0, "the foreign value was not deleted"
    assert "does not hold an answer" in _only_warning(cache_warnings).getMessage()


def test_an_invalid_redis_url_is_a_config_error() -> None:
    config = CacheConfig(backend="redis", redis_url="http://user:hunter2@example.org")

    with pytest.raises(ConfigError, match="not a Redis URL") as caught:
        RedisCache(config)

    assert "hunter2" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://app:hunter2@host:6380/1", "rediss://app:***@host:6380/1"),
        (
            "unix:///run/redis.sock?db=0&password=hunter2",
            "unix:///run/redis.sock?db=0&password=***",
        ),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redis_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert masked_url(url) == shown, masked_url(url)


# --- keys, settings and the factory -------------------------------------------------


@pytest.mark.parametrize(
    ("question", "normal"),
    [
        ("  What IS  ragline？ ", "what is ragline"),
        ("Straße?!", "strasse"),
        ("what is C#?", "what is c#"),
        ("ﬁle formats…", "file formats"),
        ("Why (really)?", "why (really)"),
    ],
)
def test_questions_are_normalised_for_the_exact_key(question: str, normal: str) -> None:
    assert normalize_question(question) == normal, normalize_question(question)


def test_the_access_fingerprint_ignores_order_and_repeats() -> None:
    assert access_fingerprint(["b", "a", "b"]) == access_fingerprint(("a", "b")), (
        "the same labels gave different fingerprints"
    )
    assert access_fingerprint([]) != access_fingerprint([""]), "no label is not ''"


def test_a_single_string_is_refused_as_access_labels() -> None:
    with pytest.raises(TypeError, match="not one string"):
        scope(access_labels="team-a")


def test_open_answer_cache_follows_the_config() -> None:
    assert isinstance(open_answer_cache(CacheConfig(enabled=False)), DisabledCache)
    assert isinstance(open_answer_cache(CacheConfig()), InProcessCache)
    cache = open_answer_cache(CacheConfig(backend="redis", redis_url=REDIS_URL))
    cache.close()
    assert isinstance(cache, RedisCache), cache
    for opened in (DisabledCache(), InProcessCache(), cache):
        assert isinstance(opened, AnswerCache), f"{opened} does not keep the protocol"


def test_a_disabled_cache_never_hits() -> None:
    cache = DisabledCache()
    put(cache)

    assert cache.get_exact(scope(), QUESTION, Catalog()) is None, "a disabled cache hit"
    assert cache.stats() == CacheStats(), cache.stats()


@pytest.mark.parametrize(
    "settings",
    [
        {"semantic_threshold": 1.5},
        {"semantic_threshold": 0},
        {"ttl_seconds": 0},
        {"colour": 1},
    ],
)
def test_the_cache_config_refuses_bad_settings(settings: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        CacheConfig(**settings)


def test_a_scope_is_hashable_and_equal_by_value() -> None:
    assert scope() == scope(access_labels=["team-a", "team-a"]), "equal scopes differ"
    assert len({scope(), scope(), scope(top_k=3)}) == 2, "scopes do not hash by value"
    assert "team-a" not in repr(scope()), "a scope's repr shows the caller's labels"
