"""The HTTP API over a real index of the demo handbook, with a scripted model.

The index, catalog and embedding model are real; the chat model is a
:class:`ScriptedProvider` that cites the first passage it is shown, so the
tests can tell exactly which passages reached the model. Three callers hold
different access labels: ``alice`` (finance), ``bob`` (people) and ``carol``
(none, so public documents only).
"""

from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ingestion.embedding import CachedEmbedder
from ragline.runtime import Runtime
from ragline.serve import build_app
from ragline.settings import parse_settings
from serving.gateway.providers import GenerationRequest, ScriptedProvider
from tests.conftest import EXAMPLES

KEYS = {
    "alice": "alice-key-0123456789abcdef",
    "bob": "bob-key-0123456789abcdef00",
    "carol": "carol-key-0123456789abcdef",
}

FINANCE_DOC = """# Project Kestrel budget

The Kestrel sensor programme has a confidential budget of 4.2 million EUR for
the 2027 financial year. Half of it pays for the new calibration line.
"""

PEOPLE_DOC = """# Salary bands

Salary bands for field engineers are reviewed every March. The Kestrel
programme pays a retention bonus of 8 percent to its field engineers.
"""


def _cite_first(request: GenerationRequest) -> str:
    """Answer with the first line of passage [1], citing it."""
    context = "\n".join(m.content for m in request.messages)
    start = context.index("\n[1] ") + len("\n[1] ")
    first_line = context[start:].strip().splitlines()[0]
    return f"{first_line[:80]} [1]"


@dataclass
class Served:
    client: TestClient
    runtime: Runtime
    provider: ScriptedProvider
    root: Path

    def post(self, path: str, user: str | None, body: dict[str, object]):
        headers = {"Authorization": f"Bearer {KEYS[user]}"} if user else {}
        return self.client.post(path, json=body, headers=headers)

    def ask(self, user: str, question: str, **extra: object) -> dict[str, object]:
        response = self.post(
            "/ask", user, {"question": question, "collection": "docs", **extra}
        )
        assert response.status_code == 200, response.text
        return response.json()

    def cited_uris(self, answer: dict[str, object]) -> list[str]:
        return [str(c["uri"]) for c in answer["citations"]]  # type: ignore[attr-defined]


def _settings(root: Path) -> dict[str, object]:
    return {
        "data_dir": str(root / "data"),
        "collections": [{"name": "docs", "index": "faiss"}],
        "sources": [
            {
                "name": "handbook",
                "type": "files",
                "collection": "docs",
                "path": str(root / "handbook"),
                "include": ["**/*.md", "**/*.html", "**/*.txt"],
            },
            {
                "name": "finance",
                "type": "files",
                "collection": "docs",
                "path": str(root / "finance"),
                "access_labels": ["finance"],
            },
            {
                "name": "people",
                "type": "files",
                "collection": "docs",
                "path": str(root / "people"),
                "access_labels": ["people"],
            },
        ],
        "serve": {
            "index_check_seconds": 0,
            "max_question_chars": 500,
            "auth": {
                "api_keys": [
                    {"name": "alice", "key": KEYS["alice"], "labels": ["finance"]},
                    {"name": "bob", "key": KEYS["bob"], "labels": ["people"]},
                    {"name": "carol", "key": KEYS["carol"]},
                ]
            },
        },
    }


def _runtime(root: Path, raw: dict[str, object], embedder) -> Runtime:
    settings = parse_settings(raw, base_dir=root)
    runtime = Runtime(settings)
    # Share the session's model instead of loading a second copy.
    for collection in settings.collections:
        config = settings.embedder_for(collection)
        runtime._embedders[config] = CachedEmbedder(embedder, runtime.catalog)
    return runtime


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, real_embedder) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(EXAMPLES / "handbook", root / "handbook")
    (root / "finance").mkdir()
    (root / "finance" / "kestrel-budget.md").write_text(FINANCE_DOC, encoding="utf-8")
    (root / "people").mkdir()
    (root / "people" / "salary-bands.md").write_text(PEOPLE_DOC, encoding="utf-8")
    runtime = _runtime(root, _settings(root), real_embedder)
    reports = runtime.ingest()
    assert all(r.status == "ok" for r in reports), reports
    provider = ScriptedProvider([_cite_first])
    app = build_app(runtime, provider=provider, warm_up=False)
    with TestClient(app) as client:
        yield Served(client, runtime, provider, root)


# -- health, readiness, metrics, freshness ------------------------------------------


def test_what_lives_from_startup_on_is_kept_out_of_garbage_collections(
    served: Served,
) -> None:
    assert gc.get_freeze_count() > 0, "the startup heap was not frozen"


def test_health_and_readiness_answer(served: Served) -> None:
    assert served.client.get("/healthz").json() == {"status": "ok"}
    ready = served.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["collections"]["docs"].startswith("live generation")


def test_freshness_lists_every_source(served: Served) -> None:
    rows = served.client.get("/freshness").json()["sources"]
    by_name = {row["source"]: row for row in rows}
    assert set(by_name) == {"handbook", "finance", "people"}
    assert by_name["handbook"]["documents"] > 5
    assert by_name["finance"]["staleness_s"] is not None


def test_metrics_show_stages_cache_and_index_size(served: Served) -> None:
    served.ask("carol", "How long is a primary on-call shift?")
    text = served.client.get("/metrics").text
    assert 'ragline_stage_seconds_count{route="ask",stage="retrieve"}' in text
    assert "ragline_cache_lookups_total" in text
    assert 'ragline_index_chunks{collection="docs"' in text
    assert "ragline_tokens_total" in text


def test_openapi_documents_the_routes(served: Served) -> None:
    paths = served.client.get("/openapi.json").json()["paths"]
    assert {"/ask", "/search", "/healthz", "/readyz", "/metrics", "/freshness"} <= set(
        paths
    )


# -- /search and /ask ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dense", "lexical", "hybrid"])
def test_search_finds_the_on_call_page_in_every_mode(served: Served, mode: str) -> None:
    response = served.post(
        "/search",
        "carol",
        {
            "query": "who gets paged when the primary on-call does not acknowledge",
            "collection": "docs",
            "top_k": 3,
            "mode": mode,
        },
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results, "no results"
    assert set(results[0]) == {"uri", "doc_id", "chunk_id", "score", "text"}
    assert any("on-call.md" in r["uri"] for r in results), results


def test_ask_returns_an_answer_with_citations_usage_and_timings(served: Served) -> None:
    answer = served.ask("carol", "What is the code freeze time for firmware releases?")
    assert answer["citations"], answer
    citation = answer["citations"][0]  # type: ignore[index]
    assert set(citation) == {
        "n",
        "doc_id",
        "chunk_id",
        "uri",
        "title",
        "score",
        "as_of",
    }
    assert citation["n"] == 1
    assert citation["as_of"] is not None
    assert answer["usage"]["completion_tokens"] > 0  # type: ignore[index]
    assert set(answer["timings"]) == {"retrieve_ms", "generate_ms", "total_ms"}
    assert answer["model"] == "scripted-model"
    assert answer["request_id"]


def test_request_id_is_taken_from_the_caller_and_returned(served: Served) -> None:
    response = served.client.post(
        "/ask",
        json={"question": "What is the travel expense limit?", "collection": "docs"},
        headers={
            "Authorization": f"Bearer {KEYS['carol']}",
            "X-Request-ID": "trace-42",
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "trace-42"
    assert response.json()["request_id"] == "trace-42"


def test_streaming_sends_tokens_then_the_whole_answer(served: Served) -> None:
    with served.client.stream(
        "POST",
        "/ask",
        json={
            "question": "Which glossary term means the on-call handover?",
            "collection": "docs",
            "stream": True,
        },
        headers={"Authorization": f"Bearer {KEYS['carol']}"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response.iter_lines())
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done", kinds
    assert kinds.count("token") >= 1, kinds
    done = events[-1][1]
    tokens = "".join(data["text"] for kind, data in events if kind == "token")
    assert tokens.strip() == done["answer"]
    assert done["citations"] and done["usage"]["completion_tokens"] > 0


def _sse_events(lines: Iterator[str]) -> list[tuple[str, dict[str, object]]]:
    events, kind = [], "message"
    for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((kind, json.loads(line.removeprefix("data: "))))
    return events


def test_no_relevant_passage_means_i_dont_know_without_the_model(
    served: Served, real_embedder
) -> None:  # type: ignore[no-untyped-def]
    raw = _settings(served.root)
    raw["serve"]["prompt"] = {"min_score": 0.99}  # type: ignore[index]
    runtime = _runtime(served.root, raw, real_embedder)
    provider = ScriptedProvider(["never used [1]"])
    with TestClient(build_app(runtime, provider=provider, warm_up=False)) as client:
        response = client.post(
            "/ask",
            json={"question": "How do penguins navigate?", "collection": "docs"},
            headers={"Authorization": f"Bearer {KEYS['carol']}"},
        )
    assert response.status_code == 200, response.text
    assert response.json()["answer"].startswith("I don't know")
    assert response.json()["citations"] == []
    assert provider.requests == [], "the model was called with no relevant passage"


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"question": "   ", "collection": "docs"}, 400, "empty"),
        ({"question": "x" * 501, "collection": "docs"}, 400, "limit is 500"),
        ({"question": "hi", "collection": "nope"}, 404, "nope"),
        ({"question": "hi", "collection": "docs", "top_k": 0}, 400, "top_k"),
        ({"question": "hi", "collection": "docs", "top_k": 5000}, 400, "top_k"),
        ({"question": "hi", "collection": "docs", "filters": {"x": 1}}, 422, "filters"),
        (
            {"question": "hi", "collection": "docs", "filters": {"sources": "a"}},
            422,
            "sources",
        ),
        ({"question": "hi", "collection": "docs", "mode": "fuzzy"}, 422, "mode"),
        ({"collection": "docs"}, 422, "question"),
        ({"question": 3, "collection": "docs"}, 422, "question"),
    ],
)
def test_bad_requests_get_a_4xx_that_says_why(
    served: Served, body: dict[str, object], status: int, words: str
) -> None:
    response = served.post("/ask", "carol", body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"], response.text


def test_a_body_that_is_not_json_is_a_422(served: Served) -> None:
    response = served.client.post(
        "/ask",
        content=b"{not json",
        headers={
            "Authorization": f"Bearer {KEYS['carol']}",
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 422, response.text
    assert "error" in response.json()


def test_an_oversized_body_is_a_413(served: Served) -> None:
    response = served.post(
        "/ask", "carol", {"question": "x" * 200_000, "collection": "docs"}
    )
    assert response.status_code == 413, response.text
    assert "serve.max_request_bytes" in response.json()["error"]


def test_an_oversized_chunked_body_is_a_413(served: Served) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"question": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'", "collection": "docs"}'

    response = served.client.post(
        "/ask",
        content=body(),
        headers={
            "Authorization": f"Bearer {KEYS['carol']}",
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 413, response.text


def test_missing_and_wrong_keys_are_401(served: Served) -> None:
    body = {"question": "hi", "collection": "docs"}
    missing = served.client.post("/ask", json=body)
    wrong = served.client.post(
        "/search",
        json={"query": "hi", "collection": "docs"},
        headers={"X-API-Key": "not-a-key-of-anybody-at-all"},
    )
    assert missing.status_code == 401, missing.text
    assert wrong.status_code == 401, wrong.text
    assert missing.headers["www-authenticate"] == "Bearer"


# -- access control -----------------------------------------------------------------

KESTREL = "What is the budget of the Kestrel programme?"


def test_search_shows_each_caller_only_their_documents(served: Served) -> None:
    def uris(user: str) -> set[str]:
        response = served.post(
            "/search",
            user,
            {
                "query": "Kestrel programme budget bonus",
                "collection": "docs",
                "top_k": 50,
            },
        )
        assert response.status_code == 200, response.text
        return {r["uri"] for r in response.json()["results"]}

    alice, bob, carol = uris("alice"), uris("bob"), uris("carol")
    assert any("kestrel-budget" in u for u in alice)
    assert not any("salary-bands" in u for u in alice)
    assert any("salary-bands" in u for u in bob)
    assert not any("kestrel-budget" in u for u in bob)
    assert not any("kestrel-budget" in u or "salary-bands" in u for u in carol)


def test_ask_and_both_caches_never_cross_access_scopes(served: Served) -> None:
    first = served.ask("alice", KESTREL)
    assert any("kestrel-budget" in u for u in served.cited_uris(first)), first
    again = served.ask("alice", KESTREL)
    assert again["cached"] is True, "alice's repeated question missed the cache"

    for user in ("bob", "carol"):
        exact = served.ask(user, KESTREL)
        assert exact["cached"] is False, f"{user} got alice's cached answer"
        assert not any("kestrel-budget" in u for u in served.cited_uris(exact))
        assert "4.2 million" not in str(exact["answer"])

    paraphrase = KESTREL.replace("What is", "What's")
    semantic_alice = served.ask("alice", paraphrase)
    assert semantic_alice["cached"] is True, "the paraphrase missed the semantic cache"
    semantic_bob = served.ask("bob", paraphrase + " ")
    assert not any("kestrel-budget" in u for u in served.cited_uris(semantic_bob))


def test_a_key_limited_to_other_collections_is_refused(
    served: Served, real_embedder
) -> None:  # type: ignore[no-untyped-def]
    raw = _settings(served.root)
    raw["serve"]["auth"]["api_keys"][2]["collections"] = ["other"]  # type: ignore[index]
    runtime = _runtime(served.root, raw, real_embedder)
    app = build_app(runtime, provider=ScriptedProvider(["x [1]"]), warm_up=False)
    with TestClient(app) as client:
        response = client.post(
            "/search",
            json={"query": "on-call", "collection": "docs"},
            headers={"Authorization": f"Bearer {KEYS['carol']}"},
        )
    assert response.status_code == 403, response.text
    assert "carol" in response.json()["error"]


# -- the cache follows the index ----------------------------------------------------


def test_a_changed_cited_document_invalidates_the_cached_answer(served: Served) -> None:
    question = "What is the policy on lab safety glasses?"
    first = served.ask("carol", question)
    cited = served.cited_uris(first)
    assert cited, first
    assert served.ask("carol", question)["cached"] is True

    page = next(
        p for p in (served.root / "handbook").rglob("*") if p.as_uri() == cited[0]
    )
    page.write_text(
        page.read_text(encoding="utf-8") + "\n\nSafety glasses are now blue.\n"
    )
    reports = served.runtime.ingest(["handbook"])
    assert reports[0].changed == 1, reports

    after = served.ask("carol", question)
    assert after["cached"] is False, "an answer citing a changed document was reused"


def test_a_new_generation_invalidates_cached_answers(served: Served) -> None:
    question = "How many days of annual leave do I get?"
    served.ask("carol", question)
    assert served.ask("carol", question)["cached"] is True

    generation, reports = served.runtime.build("docs")
    assert all(r.status == "ok" for r in reports), reports
    served.runtime.catalog.promote("docs", generation.id)

    after = served.ask("carol", question)
    assert after["cached"] is False, "an answer of the old generation was reused"
    again = served.ask("carol", question)
    assert again["cached"] is True


# -- tracing -------------------------------------------------------------------------


def _printed_spans(text: str) -> list[dict[str, object]]:
    """The JSON objects the console exporter printed, one per span."""
    decoder, spans, position = json.JSONDecoder(), [], 0
    while (start := text.find("{", position)) != -1:
        span, position = decoder.raw_decode(text, start)
        spans.append(span)
    return spans


def test_an_ask_is_one_trace_with_a_span_per_stage(
    served: Served, real_embedder, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    raw = _settings(served.root)
    raw["serve"]["tracing"] = {"exporter": "console"}  # type: ignore[index]
    runtime = _runtime(served.root, raw, real_embedder)
    app = build_app(runtime, provider=ScriptedProvider([_cite_first]), warm_up=False)
    capsys.readouterr()
    with TestClient(app) as client:
        response = client.post(
            "/ask",
            json={"question": "How long is an on-call rotation?", "collection": "docs"},
            headers={"Authorization": f"Bearer {KEYS['carol']}"},
        )
    assert response.status_code == 200, response.text

    spans = {s["name"]: s for s in _printed_spans(capsys.readouterr().out)}
    assert {"ask", "embed", "retrieve", "generate"} <= spans.keys(), spans.keys()
    ask = spans["ask"]["context"]
    for stage in ("embed", "retrieve", "generate"):
        context = spans[stage]["context"]
        assert context["trace_id"] == ask["trace_id"], f"{stage} is in another trace"
        assert spans[stage]["parent_id"] == ask["span_id"], f"{stage} is not in ask"
