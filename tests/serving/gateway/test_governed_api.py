"""The governed service end to end: identity, policy, budgets and audit on every route.

The index and embedding model are real (the demo handbook); the chat model is
a :class:`ScriptedProvider` behind the gateway's router. Callers:

* ``alice``: team ``search``, role ``admin`` (may manage keys and read the audit);
* ``bob``: team ``search``;
* ``mallory``: team ``outsiders``, which may use no collection and no model;
* ``tina``: team ``tight``, whose token budget fits about two calls;
* JWT callers signed with a shared secret, team from the ``team`` claim.

The service runs in uvicorn (in a thread) and every test calls it over
real HTTP, the OpenAI-compatible routes also through the official ``openai``
client.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from starlette.requests import Request
from starlette.routing import Route

from eval.store import EvalStore
from ingestion.embedding import CachedEmbedder
from ragline.runtime import Runtime
from ragline.serve import build_app
from ragline.settings import parse_settings
from serving.gateway.providers import GenerationRequest, ScriptedProvider
from serving.gateway.store import ApiKeyStore
from serving.openai_api import ChatCompletionRequest, _parsed_body
from tests.conftest import EXAMPLES
from tests.eval.builders import make_run

from .conftest import free_port

SECRET = "s" * 48
ISSUER = "https://id.example.test"
AUDIENCE = "ragline"
GOVERNED = ("/ask", "/search", "/v1/", "/admin/", "/ingest/", "/eval/")


def _answer(request: GenerationRequest) -> str:
    """Cite passage [1] when there is one; otherwise echo the last message."""
    context = "\n".join(m.content for m in request.messages)
    if "\n[1] " in context:
        start = context.index("\n[1] ") + len("\n[1] ")
        return f"{context[start:].strip().splitlines()[0][:60]} [1]"
    return "echo: " + request.messages[-1].content[:40]


def _settings(root: Path) -> dict[str, Any]:
    return {
        "data_dir": str(root / "data"),
        "collections": [{"name": "docs", "index": "faiss"}, {"name": "secret"}],
        "sources": [
            {
                "name": "handbook",
                "type": "files",
                "collection": "docs",
                "path": str(root / "handbook"),
                "include": ["**/*.md"],
            }
        ],
        "serve": {"index_check_seconds": 0},
        "gateway": {
            "identity": {
                "api_keys": {"cache_seconds": 0},
                "jwt": {
                    "issuer": ISSUER,
                    "audience": AUDIENCE,
                    "algorithms": ["HS256"],
                    "secret": SECRET,
                },
            },
            "policy": {
                "teams": {
                    "search": {
                        "collections": ["docs"],
                        "models": ["default"],
                        "roles": {"admin": {"admin": True}},
                    },
                    "tight": {"collections": ["docs"], "models": ["default"]},
                    "outsiders": {"collections": [], "models": []},
                }
            },
            "budgets": {
                "backend": "sql",
                "teams": {"tight": {"tokens_per_day": 600}},
            },
            "rate_limits": {"backend": "memory"},
            "loop_guard": {"backend": "memory", "max_repeats": 3, "window_s": 60},
        },
    }


@dataclass
class Governed:
    app: FastAPI
    client: httpx.Client
    base_url: str
    keys: dict[str, str]
    store: ApiKeyStore
    provider: ScriptedProvider

    def headers(self, who: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"} if who else {}

    def ask(self, who: str | None, question: str, **extra: Any) -> Any:
        body = {"question": question, "collection": "docs", **extra}
        return self.client.post("/ask", json=body, headers=self.headers(who))

    def chat(self, who: str | None, content: str, model: str = "default") -> Any:
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        return self.client.post(
            "/v1/chat/completions", json=body, headers=self.headers(who)
        )


@pytest.fixture(scope="module")
def governed(
    tmp_path_factory: pytest.TempPathFactory, real_embedder: Any
) -> Iterator[Governed]:
    root = tmp_path_factory.mktemp("governed")
    shutil.copytree(EXAMPLES / "handbook", root / "handbook")
    settings = parse_settings(_settings(root), base_dir=root)
    runtime = Runtime(settings)
    for collection in settings.collections:
        config = settings.embedder_for(collection)
        runtime._embedders[config] = CachedEmbedder(real_embedder, runtime.catalog)
    reports = runtime.ingest()
    assert all(r.status == "ok" for r in reports), reports
    store = ApiKeyStore(settings.catalog_url())
    keys = {
        "alice": store.create("alice", "search", roles=["admin"])[1],
        "bob": store.create("bob", "search")[1],
        "mallory": store.create("mallory", "outsiders")[1],
        "tina": store.create("tina", "tight")[1],
        "revoked": store.create("rex", "search")[1],
    }
    # A key made an hour ago that expired a minute ago.
    earlier = ApiKeyStore(
        settings.catalog_url(), clock=lambda: datetime.now(UTC) - timedelta(hours=1)
    )
    keys["expired"] = earlier.create(
        "eve", "search", expires_at=datetime.now(UTC) - timedelta(minutes=1)
    )[1]
    earlier.close()
    store.revoke(keys["revoked"])
    with EvalStore(settings.catalog_url()) as runs:
        runs.save(make_run("run-docs", {"faithfulness": [0.9, 0.8]}))
    provider = ScriptedProvider([_answer])
    app = build_app(runtime, provider=provider, warm_up=False)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, (
            "uvicorn did not start"
        )
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            yield Governed(app, client, f"{base_url}/v1", keys, store, provider)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        store.close()


def _token(**claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "jay",
        "team": "search",
        "iat": now,
        "exp": now + 300,
        **claims,
    }
    return jwt.encode(payload, SECRET, algorithm="HS256")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- identity -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (lambda: {}, "Authorization: Bearer"),
        (lambda: {"Authorization": "Basic dXNlcjpwdw=="}, "scheme"),
        (lambda: {"Authorization": "Bearer rk_nothex_x"}, "API key"),
        (lambda: {"Authorization": "Bearer not-a-key-or-token"}, "neither"),
        (lambda: _bearer(_token(exp=int(time.time()) - 3600)), "expired"),
        (lambda: _bearer(_token(aud="someone-else")), "audience"),
        (lambda: _bearer(_token(iss="https://evil.example.test")), "issuer"),
        (lambda: _bearer(_token()[:-4] + "AAAA"), "signature"),
    ],
    ids=[
        "none",
        "basic",
        "bad-key",
        "garbage",
        "expired",
        "audience",
        "issuer",
        "signature",
    ],
)
def test_bad_credentials_get_401_with_a_clear_message(
    governed: Governed, headers: Callable[[], dict[str, str]], message: str
) -> None:
    # Tokens are made when the test runs: made at collection they could expire.
    response = governed.client.post(
        "/search", json={"query": "on-call", "collection": "docs"}, headers=headers()
    )

    assert response.status_code == 401, response.text
    assert message.lower() in response.json()["error"].lower(), response.text
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("who", "word"), [("revoked", "revoked"), ("expired", "expired")]
)
def test_revoked_and_expired_keys_get_401(
    governed: Governed, who: str, word: str
) -> None:
    response = governed.ask(who, "How long is an on-call shift?")

    assert response.status_code == 401, response.text
    assert word in response.json()["error"], response.text


def test_a_valid_jwt_is_served(governed: Governed) -> None:
    response = governed.client.post(
        "/search",
        json={"query": "on-call rotation", "collection": "docs"},
        headers=_bearer(_token()),
    )

    assert response.status_code == 200, response.text
    assert response.json()["results"]


# -- policy ---------------------------------------------------------------------------


def test_a_team_may_not_use_a_collection_it_is_not_granted(governed: Governed) -> None:
    response = governed.client.post(
        "/search",
        json={"query": "anything", "collection": "secret"},
        headers=governed.headers("bob"),
    )

    assert response.status_code == 403, response.text
    assert "secret" in response.json()["error"], response.text


def test_a_team_may_not_use_a_model_it_is_not_granted(governed: Governed) -> None:
    denied = governed.chat("mallory", "hello")
    unknown = governed.chat("bob", "hello", model="no-such-model")

    assert denied.status_code == 403, denied.text
    assert "default" in denied.json()["error"], denied.text
    assert unknown.status_code == 403, (
        "a model outside the grant is denied, known or not"
    )


def test_admin_routes_need_admin_rights(governed: Governed) -> None:
    bob = governed.client.get("/admin/keys", headers=governed.headers("bob"))
    alice = governed.client.get("/admin/keys", headers=governed.headers("alice"))

    assert bob.status_code == 403, bob.text
    assert alice.status_code == 200, alice.text
    listed = json.dumps(alice.json())
    assert all(key not in listed for key in governed.keys.values()), "no secrets listed"


def _sample_requests(app: FastAPI) -> list[tuple[str, str, dict[str, Any] | None]]:
    """One request for each governed route and method of the app's OpenAPI schema."""
    bodies: dict[str, dict[str, Any]] = {
        "/ask": {"question": "How long is an on-call shift?", "collection": "docs"},
        "/search": {"query": "on-call", "collection": "docs"},
        "/v1/chat/completions": {
            "model": "default",
            "messages": [{"role": "user", "content": "hi"}],
        },
        "/admin/keys": {"user": "x", "team": "search"},
        "/ingest/{source}": {"op": "delete", "key": "a"},
    }
    found = []
    for path, operations in app.openapi()["paths"].items():
        if not path.startswith(GOVERNED):
            continue
        for method in operations:
            body = bodies.get(path) if method == "post" else None
            concrete = (
                path.replace("{key_id}", "0" * 12)
                .replace("{source}", "tickets")
                .replace("{run_id}", "run-docs")
                .replace("{baseline_id}", "run-docs")
            )
            found.append((method.upper(), concrete, body))
    return found


def test_no_governed_route_bypasses_identity_or_policy(governed: Governed) -> None:
    """Walk every route: none answers without credentials or to a team without rights."""
    requests = _sample_requests(governed.app)
    assert len(requests) >= 8, requests
    for method, path, body in requests:
        anonymous = governed.client.request(method, path, json=body)
        assert anonymous.status_code == 401, (path, anonymous.text)
        outsider = governed.client.request(
            method, path, json=body, headers=governed.headers("mallory")
        )
        if path == "/v1/models":
            # Listing is allowed; it lists nothing the team may not use.
            assert outsider.status_code == 200, outsider.text
            assert outsider.json()["data"] == [], outsider.text
        elif path == "/eval/runs":
            # Listing is allowed; it lists no run of a collection the team may not use.
            listed = governed.client.get(
                path, params={"format": "json"}, headers=governed.headers("mallory")
            )
            assert outsider.status_code == 200, outsider.text
            assert listed.json() == [], listed.text
            insider = governed.client.get(
                path, params={"format": "json"}, headers=governed.headers("bob")
            )
            assert [r["run_id"] for r in insider.json()] == ["run-docs"], insider.text
        else:
            assert outsider.status_code == 403, (path, outsider.text)


# -- budgets, loop guard --------------------------------------------------------------


def test_an_exhausted_budget_gets_429_naming_the_budget(governed: Governed) -> None:
    # The scripted model counts a token a word: each call uses over 100 of the
    # 600 tokens, and each reserves that plus 256 for the answer first.
    words = " ".join(f"word{i}" for i in range(100))
    statuses = [governed.chat("tina", f"{i} {words}").status_code for i in range(6)]
    refused = governed.chat("tina", f"one more {words}")

    assert statuses[0] == 200, statuses
    assert 429 in statuses, statuses
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["budget"] == "team:tight tokens/day", body
    assert body["limit"] == 600, body
    assert body["resets_at"].startswith(str(datetime.now(UTC).year)), body
    assert int(refused.headers["retry-after"]) >= 1


def test_the_same_request_again_and_again_is_throttled(governed: Governed) -> None:
    statuses = [
        governed.client.post(
            "/search",
            json={"query": "the same loop query", "collection": "docs"},
            headers=governed.headers("bob"),
        ).status_code
        for _ in range(5)
    ]

    assert statuses[:3] == [200, 200, 200], statuses
    assert statuses[3:] == [429, 429], statuses


# -- audit ----------------------------------------------------------------------------


def test_every_request_leaves_one_audit_record(governed: Governed) -> None:
    asked = governed.ask("bob", "Who do I escalate to after 20 minutes?")
    assert asked.status_code == 200, asked.text
    request_id = asked.json()["request_id"]
    denied = governed.ask("mallory", "Who do I escalate to?")
    assert denied.status_code == 403

    records = governed.client.get(
        "/admin/audit",
        params={"user": "bob", "limit": 50},
        headers=governed.headers("alice"),
    ).json()["records"]
    mine = [r for r in records if r["request_id"] == request_id]
    refused = governed.client.get(
        "/admin/audit", params={"user": "mallory"}, headers=governed.headers("alice")
    ).json()["records"]

    assert len(mine) == 1, records
    record = mine[0]
    assert record["route"] == "POST /ask" and record["status"] == 200, record
    assert record["team"] == "search" and record["key_id"], record
    assert record["model"] == "default", record
    assert record["attempts"] and record["attempts"][-1]["outcome"] == "ok", record
    assert record["cited_chunk_ids"] == [
        c["chunk_id"] for c in asked.json()["citations"]
    ], record
    assert any(d["check"] == "collection" and d["allowed"] for d in record["policy"])
    assert refused and refused[0]["status"] == 403, refused
    assert any(not d["allowed"] for d in refused[0]["policy"]), refused[0]
    everything = json.dumps(records + refused)
    assert all(key not in everything for key in governed.keys.values())


# -- the OpenAI-compatible API through the official client ----------------------------


def test_the_openai_client_lists_and_calls_models(governed: Governed) -> None:
    from openai import OpenAI

    client = OpenAI(
        base_url=governed.base_url, api_key=governed.keys["bob"], max_retries=0
    )
    models = [m.id for m in client.models.list()]
    completion = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "say hello"}],
        max_tokens=16,
        temperature=0,
    )
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "say hello again"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert models == ["default", "rag/docs"], models
    assert completion.choices[0].message.content == "echo: say hello", completion
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: say hello again", chunks
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_the_rag_model_answers_with_citations(governed: Governed) -> None:
    from openai import OpenAI

    client = OpenAI(
        base_url=governed.base_url, api_key=governed.keys["bob"], max_retries=0
    )
    completion = client.chat.completions.create(
        model="rag/docs",
        messages=[{"role": "user", "content": "How long is a primary on-call shift?"}],
    )

    answer = completion.choices[0].message.content or ""
    citations = (completion.model_extra or {})["citations"]
    assert "[1]" in answer, answer
    assert citations and citations[0]["uri"].endswith(".md"), citations


def test_the_openai_client_sees_governance_errors(governed: Governed) -> None:
    import openai

    def call(key: str, model: str = "default") -> None:
        client = openai.OpenAI(base_url=governed.base_url, api_key=key, max_retries=0)
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi there"}]
        )

    with pytest.raises(openai.AuthenticationError):
        call("rk_0123456789ab_wrongwrongwrongwrongwrongwrongwrongwrongwro")
    with pytest.raises(openai.PermissionDeniedError):
        call(governed.keys["mallory"])
    with pytest.raises(openai.PermissionDeniedError):
        call(governed.keys["bob"], model="rag/secret")


# -- the lean chat completions route --------------------------------------------------

VALID_CHAT = b'{"model": "default", "messages": [{"role": "user", "content": "hi"}]}'
# Bodies the chat route refuses: the body, its Content-Type (None: not sent),
# and a pattern one of the problems its 422 lists starts with.
INVALID_CHATS: list[tuple[bytes, str | None, str]] = [
    (b'{"model": "default"}', "application/json", "messages:"),
    (b'{"model": "default", "messages": []}', "application/json", "messages:"),
    (
        b'{"model": "default", "messages": [{"role": "robot", "content": "hi"}]}',
        "application/json",
        r"messages\.0\.role:",
    ),
    (
        b'{"model": "default", "max_tokens": 0, '
        b'"messages": [{"role": "user", "content": "hi"}]}',
        "application/json",
        "max_tokens:",
    ),
    (b'["not", "an", "object"]', "application/json", "body:"),
    (b"model=default", "application/x-www-form-urlencoded", "body:"),
    (b"", "application/json", "body:"),
    (VALID_CHAT, None, "body:"),
    (b'{"model": "default", "messages": [', "application/json", r"\d+: JSON decode"),
]


@pytest.mark.parametrize(("raw", "content_type", "place"), INVALID_CHATS)
def test_an_invalid_chat_request_gets_422_naming_the_problem(
    governed: Governed, raw: bytes, content_type: str | None, place: str
) -> None:
    response = governed.client.post(
        "/v1/chat/completions",
        content=raw,
        headers={**governed.headers("bob"), **_content_type(content_type)},
    )

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"], body
    assert any(re.match(place, problem) for problem in body["detail"]), body


def _content_type(value: str | None) -> dict[str, str]:
    return {} if value is None else {"Content-Type": value}


def test_the_lean_route_judges_bodies_as_the_documented_route_does() -> None:
    """The same body gets the same answer from FastAPI's validation and the lean one."""
    documented = FastAPI()

    @documented.post("/chat")
    async def chat(body: ChatCompletionRequest) -> dict[str, Any]:
        return body.model_dump(mode="json")

    async def lean_chat(request: Request) -> Any:
        body = _parsed_body(await request.body(), request.headers.get("content-type"))
        return JSONResponse(body.model_dump(mode="json"))

    lean = FastAPI(routes=[Route("/chat", lean_chat, methods=["POST"])])
    bodies = [*INVALID_CHATS, (VALID_CHAT, "application/json; charset=utf-8", "")]
    with TestClient(documented) as fastapi_side, TestClient(lean) as lean_side:
        for raw, content_type, _ in bodies:
            headers = _content_type(content_type)
            expected = fastapi_side.post("/chat", content=raw, headers=headers)
            got = lean_side.post("/chat", content=raw, headers=headers)

            assert got.status_code == expected.status_code, (raw, got.text)
            assert got.json() == expected.json(), (raw, got.text, expected.text)


def test_the_openapi_schema_documents_the_chat_request(governed: Governed) -> None:
    schema = governed.app.openapi()
    operation = schema["paths"]["/v1/chat/completions"]["post"]

    reference = operation["requestBody"]["content"]["application/json"]["schema"]
    assert reference["$ref"].endswith("/ChatCompletionRequest"), operation
    assert (
        "messages"
        in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    ), schema["components"]["schemas"]


def test_an_oversized_chat_request_gets_413_and_is_audited(governed: Governed) -> None:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "x" * 100_000}],
    }
    response = governed.client.post(
        "/v1/chat/completions", json=body, headers=governed.headers("bob")
    )

    assert response.status_code == 413, response.text
    records = governed.client.get(
        "/admin/audit", params={"status": 413}, headers=governed.headers("alice")
    ).json()["records"]
    request_id = response.headers["x-request-id"]
    (record,) = [r for r in records if r["request_id"] == request_id]
    assert record["route"] == "POST /v1/chat/completions", record
    assert "serve.max_request_bytes" in record["error"], record


def test_each_request_gets_an_id_of_its_own(governed: Governed) -> None:
    ids = [governed.chat("bob", f"hello number {n}") for n in range(3)]

    assert all(r.status_code == 200 for r in ids), [r.text for r in ids]
    values = [r.headers["x-request-id"] for r in ids]
    assert len(set(values)) == 3, values
    assert all(re.fullmatch(r"[0-9a-f]{32}", v) for v in values), values
    assert [r.json()["id"] for r in ids] == [f"chatcmpl-{v}" for v in values]


def test_eval_reports_are_served_to_teams_of_their_collection(
    governed: Governed,
) -> None:
    report = governed.client.get("/eval/runs/run-docs", headers=governed.headers("bob"))
    assert report.status_code == 200, report.text
    assert "text/html" in report.headers["content-type"]
    assert "run-docs" in report.text
    refused = governed.client.get(
        "/eval/runs/run-docs", headers=governed.headers("mallory")
    )
    assert refused.status_code == 403, refused.text
    assert "may not use" in refused.json()["error"]
