"""/ask end to end with the real parts: the demo handbook, MiniLM, FAISS, SmolLM2.

The questions are the demo's own (``examples/questions.jsonl``), each with
the handbook page that answers it; answers must cite that page.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from ingestion.embedding import CachedEmbedder
from ragline.runtime import Runtime
from ragline.serve import build_app
from ragline.settings import parse_settings
from tests.conftest import EXAMPLES

pytestmark = pytest.mark.slow

QUESTIONS = [
    json.loads(line)
    for line in (EXAMPLES / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    if line.strip()
]


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, real_embedder, llama_provider
) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("handbook")
    shutil.copytree(EXAMPLES / "handbook", root / "handbook")
    settings = parse_settings(
        {
            "data_dir": str(root / "data"),
            "collections": [{"name": "docs"}],
            "sources": [
                {
                    "name": "handbook",
                    "type": "files",
                    "collection": "docs",
                    "path": str(root / "handbook"),
                    "include": ["**/*.md", "**/*.html", "**/*.txt"],
                }
            ],
        },
        base_dir=root,
    )
    runtime = Runtime(settings)
    config = settings.embedder_for(settings.collections[0])
    runtime._embedders[config] = CachedEmbedder(real_embedder, runtime.catalog)
    [report] = runtime.ingest()
    assert report.status == "ok", report
    app = build_app(runtime, provider=llama_provider, warm_up=False)
    with TestClient(app) as test_client:
        yield test_client


def _page(uri: str) -> str:
    return uri.split("/handbook/", 1)[-1]


# SmolLM2-135M is the smallest chat model that answers at all: on this set it
# cites the right page in six or seven of eight answers, and in the others
# writes a claim of its own and cites the passage that matches that claim. The
# floor catches a pipeline that stops citing the right page.
CITED_FLOOR = 5


def test_answers_cite_the_page_that_holds_them(client: TestClient) -> None:
    missed = []
    for item in QUESTIONS[:8]:
        response = client.post(
            "/ask",
            json={"question": item["question"], "collection": "docs", "top_k": 4},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] > 0, body
        assert body["model"] == "SmolLM2-135M-Instruct", body
        cited = [_page(c["uri"]) for c in body["citations"]]
        if item["source"] not in cited:
            missed.append(f"{item['question']!r}: {body['answer']!r} cites {cited}")
    assert len(missed) <= 8 - CITED_FLOOR, (
        f"{len(missed)} of 8 answers do not cite the page that holds the answer:\n"
        + "\n".join(missed)
    )


def test_streaming_with_the_real_model_ends_with_the_answer(client: TestClient) -> None:
    item = QUESTIONS[0]
    body = {"question": item["question"], "collection": "docs", "stream": True}
    with client.stream("POST", "/ask", json=body) as response:
        assert response.status_code == 200
        lines = list(response.iter_lines())
    events = [
        line.removeprefix("event: ") for line in lines if line.startswith("event:")
    ]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert events[-1] == "done", events
    streamed = "".join(d["text"] for d in data[:-1])
    assert streamed.strip() == data[-1]["answer"]
