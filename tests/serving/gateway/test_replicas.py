"""Two real ``ragline serve`` replicas share one allowance: budgets, rate limits, audit.

The module starts two service processes (``python -m ragline serve``) from
one settings file. They share the catalog database (SQLite: API keys and the
audit log) and one Redis (budgets and rate limits), and call one upstream
model: :class:`FixedUpstream`, an OpenAI-compatible server in a thread of
the test, which answers every chat completion at once with the same text
and the same ``usage``.
Keys are made with ``ragline keys create``, as an operator would.

The usage the upstream reports equals the worst case the gateway reserves
for each request (the estimated prompt plus ``max_tokens``), so a budget of
ten times that amount fits exactly ten requests, however they interleave.

Teams of the settings, one per test so the tests do not share counters:

* ``search``: a token budget of exactly ten requests a day;
* ``burst``: no budget; its key has a per-minute request limit;
* ``ops``: administrators, whose key flushes and reads the audit log.

The last test runs the budget scenario in this process instead, on the SQL
budget store in the SQLite catalog.

Budgets count per UTC day, and the replicas read the real clock: a run
that crosses midnight UTC starts a new budget day half way and may fail.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import redis
import yaml

from ragline.runtime import Runtime
from ragline.serve import build_app
from ragline.settings import Settings, load_settings, parse_settings
from serving.gateway.audit import AuditEntry, AuditLog
from serving.gateway.budgets import Budgets, BudgetStatus, Subjects
from serving.gateway.core import _MESSAGE_OVERHEAD
from serving.gateway.openai_compat import (
    OpenAICompatibleConfig,
    OpenAICompatibleProvider,
)
from serving.gateway.store import ApiKeyStore
from tests.conftest import REPO

from .conftest import free_port

pytestmark = pytest.mark.slow

REDIS_URL = "redis://127.0.0.1:6379/0"
ROUTE = "POST /v1/chat/completions"
MODEL = "chat"
QUESTION = "Which replica answers this question about shared budgets?"
MAX_TOKENS = 40
FITS = 10  # requests the team budget fits
BURST = 50  # requests sent at once against the budget
RATE = 10  # requests per minute of the rate-limited key
HAMMER = 40  # requests sent at once against the rate limit
_START_SECONDS = 120.0
_STOP_SECONDS = 20.0
_AUDIT_SECONDS = 15.0
_KEY_FORM = re.compile(r"rk_([0-9a-f]{12})_\S+")


def _provider_settings(base_url: str) -> dict[str, Any]:
    """The one target: an OpenAI-compatible server at ``base_url``."""
    return {
        "type": "openai",
        "name": "upstream",
        "base_url": base_url,
        "model": "stub",
        "context_window": 4096,
        "trust_env": False,
    }


def _prompt_estimate() -> int:
    """The prompt tokens ``GovernedProvider`` reserves for the one-message request.

    It counts each message with the first target's ``count_tokens`` and adds
    the chat template's overhead per message.
    """
    config = OpenAICompatibleConfig.model_validate(
        _provider_settings("http://127.0.0.1:1/v1")
    )
    provider = OpenAICompatibleProvider(config)
    try:
        return provider.count_tokens(QUESTION) + _MESSAGE_OVERHEAD
    finally:
        asyncio.run(provider.close())


PROMPT_TOKENS = _prompt_estimate()
HOLD = PROMPT_TOKENS + MAX_TOKENS  # what one request reserves, and is charged
BUDGET = FITS * HOLD

BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": QUESTION}],
    "max_tokens": MAX_TOKENS,
}
COMPLETION = {
    "id": "chatcmpl-stub",
    "object": "chat.completion",
    "created": 0,
    "model": "stub",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Both of them, in turn."},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": MAX_TOKENS,
        "total_tokens": HOLD,
    },
}


# -- the upstream -------------------------------------------------------------------


class FixedUpstream:
    """An OpenAI-compatible server in a thread: every chat completion gets COMPLETION.

    It answers at once and counts the completions it served, so a test can
    tell how many requests reached the model.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()
        self._server = _FixedServer(("127.0.0.1", 0), _FixedHandler)
        self._server.upstream = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fixed-upstream",
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def count_call(self) -> None:
        with self._lock:
            self.calls += 1

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()  # waits for the requests being answered
        self._thread.join()


class _FixedServer(ThreadingHTTPServer):
    # The default backlog of 5 would make a burst wait for TCP retries.
    request_queue_size = 256
    daemon_threads = False
    upstream: FixedUpstream


class _FixedHandler(BaseHTTPRequestHandler):
    server: _FixedServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if not self.path.endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        self.server.upstream.count_call()
        self._send(200, COMPLETION)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the tests count calls instead."""

    def _send(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def fixed_upstream() -> Iterator[FixedUpstream]:
    upstream = FixedUpstream()
    try:
        yield upstream
    finally:
        upstream.stop()


# -- the replicas -------------------------------------------------------------------


class Replica:
    """One ``ragline serve`` process on a port of its own."""

    def __init__(self, settings_path: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._settings_path = settings_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        """Starts the process; :meth:`wait_until_healthy` waits for it."""
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ragline",
                "--config",
                str(self._settings_path),
                "serve",
                "--port",
                str(self.port),
            ],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=_environment(),
        )

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + _START_SECONDS
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self._process is None or self._process.poll() is not None:
                    pytest.fail(f"ragline serve exited while starting:\n{self.tail()}")
                try:
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        pytest.fail(
            f"ragline serve did not answer /healthz in {_START_SECONDS:g} s:\n"
            f"{self.tail()}"
        )

    def stop(self) -> None:
        """SIGTERM, so the audit log is written out; SIGKILL if it hangs."""
        process = self._process
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=_STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAGLINE_CONFIG"}
    env.update(HF_HUB_OFFLINE="1", RAGAS_DO_NOT_TRACK="true")
    return env


def _create_key(settings_path: Path, user: str, team: str) -> tuple[str, str]:
    """A key from ``ragline keys create``: its plaintext and its id."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ragline",
            "--config",
            str(settings_path),
            "keys",
            "create",
            "--user",
            user,
            "--team",
            team,
        ],
        cwd=REPO,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    match = _KEY_FORM.fullmatch(key)
    assert match is not None, f"ragline keys create printed no key: {done.stdout!r}"
    return key, match.group(1)


def _cluster_settings(
    root: Path,
    upstream: FixedUpstream,
    prefixes: tuple[str, str],
    rate_limited_key: str | None,
) -> dict[str, Any]:
    """The settings of both replicas; ``prefixes`` are the budget and rate ones."""
    budget_prefix, rate_prefix = prefixes
    limited = (
        {rate_limited_key: {"requests_per_minute": RATE}} if rate_limited_key else {}
    )
    return {
        "data_dir": str(root / "data"),
        "collections": [{"name": "docs", "index": "faiss"}],
        "sources": [],
        "gateway": {
            "providers": [_provider_settings(upstream.base_url)],
            "routing": {
                "models": [
                    {"name": MODEL, "targets": [{"target": "upstream"}], "retries": 0}
                ]
            },
            "identity": {"api_keys": {"cache_seconds": 0}},
            "policy": {
                "teams": {
                    "search": {"collections": "*", "models": "*"},
                    "burst": {"collections": "*", "models": "*"},
                    "ops": {"admin": True},
                }
            },
            "budgets": {
                "backend": "redis",
                "redis_url": REDIS_URL,
                "key_prefix": budget_prefix,
                "teams": {"search": {"tokens_per_day": BUDGET}},
            },
            "rate_limits": {
                "backend": "redis",
                "redis_url": REDIS_URL,
                "key_prefix": rate_prefix,
                "keys": limited,
            },
            "loop_guard": {"enabled": False},
        },
    }


@dataclass
class Key:
    plaintext: str
    key_id: str
    team: str

    @property
    def secret(self) -> str:
        return self.plaintext.split("_", 2)[2]


@dataclass
class Cluster:
    settings: Settings
    replicas: list[Replica]
    upstream: FixedUpstream
    keys: dict[str, Key]  # by team

    @property
    def catalog_url(self) -> str:
        return self.settings.catalog_url()

    def model_calls(self) -> int:
        """Chat completions the upstream has served so far."""
        return self.upstream.calls


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two replicas over one catalog and one Redis; everything undone afterwards."""
    root = tmp_path_factory.mktemp("replicas")
    tag = uuid.uuid4().hex
    prefixes = (f"ragline-test:{tag}:budget:", f"ragline-test:{tag}:rate:")
    upstream = FixedUpstream()
    settings_path = root / "ragline.yaml"
    replicas: list[Replica] = []
    try:
        keys = _make_keys(root, settings_path, upstream, prefixes)
        replicas = [Replica(settings_path, root / f"replica-{i}.log") for i in range(2)]
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_until_healthy()
        yield Cluster(load_settings(settings_path), replicas, upstream, keys)
    finally:
        for replica in replicas:
            replica.stop()
        upstream.stop()
        _delete_redis_keys(prefixes)


def _make_keys(
    root: Path,
    settings_path: Path,
    upstream: FixedUpstream,
    prefixes: tuple[str, str],
) -> dict[str, Key]:
    """Creates one key per team, then names the rate-limited one in the settings."""

    def write(rate_limited_key: str | None) -> None:
        settings = _cluster_settings(root, upstream, prefixes, rate_limited_key)
        settings_path.write_text(yaml.safe_dump(settings), encoding="utf-8")

    write(None)
    keys = {}
    for team in ("search", "burst", "ops"):
        plaintext, key_id = _create_key(settings_path, f"{team}-user", team)
        keys[team] = Key(plaintext, key_id, team)
    write(keys["burst"].key_id)
    return keys


def _delete_redis_keys(prefixes: Sequence[str]) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for prefix in prefixes:
            found = list(client.scan_iter(match=f"{prefix}*"))
            if found:
                client.delete(*found)
    finally:
        client.close()


# -- requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    request_id: str
    replica: str
    status: int
    headers: httpx.Headers
    body: dict[str, Any]


async def _chat(client: httpx.AsyncClient, url: str, key: Key, n: int) -> Outcome:
    request_id = f"{key.team}-{uuid.uuid4().hex[:12]}-{n}"
    response = await client.post(
        f"{url}/v1/chat/completions",
        json=BODY,
        headers={
            "Authorization": f"Bearer {key.plaintext}",
            "X-Request-ID": request_id,
        },
    )
    return Outcome(
        request_id, url, response.status_code, response.headers, response.json()
    )


def _client(**options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=60.0,
        trust_env=False,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
        **options,
    )


async def _burst(
    client: httpx.AsyncClient, urls: Sequence[str], key: Key, count: int
) -> list[Outcome]:
    """``count`` chat completions at once, sent to the replicas in turn."""
    return list(
        await asyncio.gather(
            *(_chat(client, urls[n % len(urls)], key, n) for n in range(count))
        )
    )


def _statuses(outcomes: Sequence[Outcome]) -> Counter[int]:
    return Counter(o.status for o in outcomes)


def _by_replica(outcomes: Sequence[Outcome]) -> dict[str, Counter[int]]:
    found: dict[str, Counter[int]] = {}
    for outcome in outcomes:
        found.setdefault(outcome.replica, Counter())[outcome.status] += 1
    return found


# -- audit --------------------------------------------------------------------------


def _audit_of(cluster: Cluster, key: Key, expected: int) -> list[AuditEntry]:
    """The key's records, once every replica has written what it holds.

    ``GET /admin/audit`` makes the replica it reaches write its queue first;
    a record is queued just after its response is sent, so the last few may
    need another round.
    """
    admin = {"Authorization": f"Bearer {cluster.keys['ops'].plaintext}"}
    log = AuditLog(cluster.catalog_url)
    deadline = time.monotonic() + _AUDIT_SECONDS
    try:
        with httpx.Client(timeout=30.0, trust_env=False) as client:
            while True:
                for replica in cluster.replicas:
                    response = client.get(
                        f"{replica.url}/admin/audit",
                        params={"key_id": key.key_id, "limit": 1},
                        headers=admin,
                    )
                    assert response.status_code == 200, response.text
                entries = log.query(key_id=key.key_id, limit=10_000)
                if len(entries) >= expected or time.monotonic() > deadline:
                    return entries
                time.sleep(0.1)
    finally:
        log.close_blocking()


def _check_audit(
    entries: Sequence[AuditEntry], outcomes: Sequence[Outcome], key: Key
) -> None:
    """Exactly one record per request, with its status, and no key in it."""
    sent = {o.request_id: o.status for o in outcomes}
    counts = Counter(e.request_id for e in entries)
    repeated = {rid: n for rid, n in counts.items() if n > 1}
    assert not repeated, f"requests audited more than once: {repeated}"
    missing = sorted(set(sent) - set(counts))
    assert not missing, f"{len(missing)} requests have no audit record: {missing[:5]}"
    strangers = sorted(set(counts) - set(sent))
    assert not strangers, f"audit records of requests never sent: {strangers[:5]}"
    for entry in entries:
        assert entry.status == sent[entry.request_id], entry
        assert entry.route == ROUTE, entry
        assert (entry.team, entry.key_id, entry.user) == (
            key.team,
            key.key_id,
            f"{key.team}-user",
        ), entry
        stored = json.dumps(entry.to_dict(), default=str)
        assert key.secret not in stored, f"the key's secret is in {entry.request_id}"
        if entry.status == 200:
            assert entry.model == MODEL, entry
            assert (entry.prompt_tokens, entry.completion_tokens) == (
                PROMPT_TOKENS,
                MAX_TOKENS,
            ), entry
            assert [(a.target, a.outcome) for a in entry.attempts] == [
                ("upstream", "ok")
            ], entry
        else:
            assert entry.error, f"a refused request's record says why: {entry}"
            assert not entry.attempts, f"a refused request reached the model: {entry}"


def _check_no_secret_anywhere(cluster: Cluster) -> None:
    """No audit record of any key, and no replica's log, holds a key's secret."""
    log = AuditLog(cluster.catalog_url)
    try:
        everything = json.dumps(
            [e.to_dict() for e in log.query(limit=10_000)], default=str
        )
    finally:
        log.close_blocking()
    logs = "\n".join(r.log_path.read_text(errors="replace") for r in cluster.replicas)
    for key in cluster.keys.values():
        assert key.secret not in everything, f"the audit log holds the {key.team} key"
        assert key.secret not in logs, f"a replica's log holds the {key.team} key"


# -- budgets ------------------------------------------------------------------------


async def _watch_spend(
    budgets: Budgets, subjects: Subjects, stop: asyncio.Event
) -> list[BudgetStatus]:
    """Where the budget stands, read from the store again and again until ``stop``."""
    seen: list[BudgetStatus] = []
    while not stop.is_set():
        seen += await budgets.status(subjects)
        await asyncio.sleep(0.002)
    seen += await budgets.status(subjects)
    return seen


async def _burst_watching_spend(
    client: httpx.AsyncClient, urls: Sequence[str], key: Key, budgets: Budgets
) -> tuple[list[Outcome], list[BudgetStatus]]:
    """The budget burst, with the team's spend read from the store all along."""
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_spend(budgets, Subjects(team=key.team), stop))
    try:
        outcomes = await _burst(client, urls, key, BURST)
    finally:
        stop.set()
    return outcomes, await watcher


def _check_budget_burst(
    outcomes: Sequence[Outcome], seen: Sequence[BudgetStatus], team: str
) -> None:
    statuses = _statuses(outcomes)
    assert statuses == Counter({200: FITS, 429: BURST - FITS}), (
        f"a budget of {FITS} requests let {statuses[200]} through: {statuses}; "
        f"per replica: {_by_replica(outcomes)}"
    )

    now = datetime.now(UTC)
    for outcome in outcomes:
        if outcome.status != 429:
            continue
        body = outcome.body
        assert body["budget"] == f"team:{team} tokens/day", body
        assert body["limit"] == BUDGET, body
        resets_at = datetime.fromisoformat(body["resets_at"])
        assert now < resets_at <= now + timedelta(days=1), body
        assert (resets_at.hour, resets_at.minute) == (0, 0), body
        assert body["request_id"] == outcome.request_id, body
        assert int(outcome.headers["retry-after"]) >= 1, outcome.headers

    assert seen, "the spend was never read"
    worst = max(s.spent + s.held for s in seen)
    assert worst <= BUDGET, f"spent and held reached {worst}, over {BUDGET}"
    last = seen[-1]
    assert (last.spent, last.held, last.limit) == (BUDGET, 0, BUDGET), last


def test_a_team_budget_holds_across_two_replicas(cluster: Cluster) -> None:
    key = cluster.keys["search"]
    calls_before = cluster.model_calls()

    outcomes, seen = asyncio.run(_budget_burst_on_cluster(cluster, key))

    _check_budget_burst(outcomes, seen, key.team)
    spread = {url: sum(c.values()) for url, c in _by_replica(outcomes).items()}
    assert sorted(spread.values()) == [BURST // 2] * 2, spread
    assert cluster.model_calls() - calls_before == FITS, (
        "refused calls reached the model"
    )
    _check_audit(_audit_of(cluster, key, BURST), outcomes, key)
    _check_no_secret_anywhere(cluster)


async def _budget_burst_on_cluster(
    cluster: Cluster, key: Key
) -> tuple[list[Outcome], list[BudgetStatus]]:
    urls = [r.url for r in cluster.replicas]
    budgets = Budgets.open(cluster.settings.gateway.budgets, cluster.catalog_url)
    try:
        async with _client() as client:
            return await _burst_watching_spend(client, urls, key, budgets)
    finally:
        await budgets.close()


# -- rate limits --------------------------------------------------------------------


def test_a_key_rate_limit_holds_across_two_replicas(cluster: Cluster) -> None:
    """GCRA admits a quiet key's whole minute at once, then one per 60/RATE s.

    So in a hammering that lasts ``elapsed`` seconds, the admitted count is
    at least ``RATE`` and at most ``RATE`` plus what refilled meanwhile.
    Replicas counting apart would admit ``2 * RATE``.
    """
    key = cluster.keys["burst"]
    urls = [r.url for r in cluster.replicas]

    started = time.monotonic()
    outcomes = asyncio.run(_hammer(urls, key))
    elapsed = time.monotonic() - started

    statuses = _statuses(outcomes)
    refilled = math.floor(elapsed * RATE / 60.0 + 0.001)
    admitted = statuses[200]
    assert RATE <= admitted <= RATE + refilled, (
        f"a limit of {RATE} per minute admitted {admitted} in {elapsed:.2f} s: "
        f"{statuses}; per replica: {_by_replica(outcomes)}"
    )
    assert statuses[429] == HAMMER - admitted, statuses
    interval = 60.0 / RATE
    for outcome in outcomes:
        if outcome.status != 429:
            continue
        retry_after = int(outcome.headers["retry-after"])
        assert 1 <= retry_after <= math.ceil(interval) + 1, outcome.headers
        assert f"key:{key.key_id} requests/minute" in outcome.body["error"], (
            outcome.body
        )

    _check_audit(_audit_of(cluster, key, HAMMER), outcomes, key)
    _check_no_secret_anywhere(cluster)


async def _hammer(urls: Sequence[str], key: Key) -> list[Outcome]:
    async with _client() as client:
        return await _burst(client, urls, key, HAMMER)


# -- one process, SQL budgets -------------------------------------------------------


def test_a_team_budget_holds_in_one_process_on_sqlite(
    tmp_path: Path, fixed_upstream: FixedUpstream
) -> None:
    raw = {
        "data_dir": str(tmp_path / "data"),
        "collections": [{"name": "docs", "index": "faiss"}],
        "gateway": {
            "providers": [_provider_settings(fixed_upstream.base_url)],
            "routing": {
                "models": [
                    {"name": MODEL, "targets": [{"target": "upstream"}], "retries": 0}
                ]
            },
            "identity": {"api_keys": {"cache_seconds": 0}},
            "policy": {"teams": {"search": {"collections": "*", "models": "*"}}},
            "budgets": {
                "backend": "sql",
                "teams": {"search": {"tokens_per_day": BUDGET}},
            },
            "loop_guard": {"enabled": False},
        },
    }
    settings = parse_settings(raw, base_dir=tmp_path)
    settings.data_dir.mkdir(parents=True)
    with ApiKeyStore(settings.catalog_url(), cache_seconds=0) as store:
        record, plaintext = store.create("search-user", "search")
    key = Key(plaintext, record.key_id, "search")

    outcomes, seen = asyncio.run(_serve_in_process(settings, key))

    _check_budget_burst(outcomes, seen, key.team)
    assert fixed_upstream.calls == FITS, "refused calls reached the model"
    log = AuditLog(settings.catalog_url())
    try:
        entries = log.query(key_id=key.key_id, limit=10_000)
    finally:
        log.close_blocking()
    _check_audit(entries, outcomes, key)


async def _serve_in_process(
    settings: Settings, key: Key
) -> tuple[list[Outcome], list[BudgetStatus]]:
    """The budget burst against the app in this event loop.

    Leaving the app's lifespan shuts it down, which writes the audit log out.
    """
    app = build_app(Runtime(settings), warm_up=False)
    url = "http://ragline.test"
    budgets = Budgets.open(settings.gateway.budgets, settings.catalog_url())
    try:
        async with (
            app.router.lifespan_context(app),
            _client(transport=httpx.ASGITransport(app=app)) as client,
        ):
            return await _burst_watching_spend(client, [url], key, budgets)
    finally:
        await budgets.close()
