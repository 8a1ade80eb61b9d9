"""Real upstreams for the gateway tests.

``llama_server_factory`` starts llama.cpp's OpenAI-compatible server
(``python -m llama_cpp.server``) with the packaged SmolLM2-135M-Instruct model,
as separate processes on ports of their own; a handle can stop, kill and
start its server again on the same port, so failover can be tested. Every
server started is stopped when the session ends, whatever the tests did.

``stub_upstream`` is a small HTTP server in a thread, for what a real model
server cannot be made to do on demand: answer with an error status, send
malformed JSON, never answer, stall in the middle of a stream. It answers
each request with the next scripted :class:`Reply` and records what it
received.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Literal

import httpx
import pytest

from serving.gateway.llamacpp import packaged_model_path

LLAMA_MODEL_ALIAS = "smollm2"
_SERVER_START_SECONDS = 180.0
_SERVER_STOP_SECONDS = 10.0
# Settings read from the environment by llama_cpp.server that must not leak in.
_SERVER_ENVIRONMENT_OVERRIDES = ("HOST", "PORT", "MODEL", "CONFIG_FILE")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LlamaServer:
    """One llama.cpp OpenAI-compatible server process, always on the same port."""

    def __init__(
        self, port: int, log_path: Path, extra_args: Sequence[str] = ()
    ) -> None:
        self.port = port
        self.log_path = log_path
        self.extra_args = tuple(extra_args)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The API root, to be used as ``base_url`` of a provider."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Starts the server, if it is not running, and waits until it answers."""
        if self.running:
            return
        self._reap()
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self._command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
        )
        self._wait_until_ready()

    def stop(self) -> None:
        """Asks the server to end (SIGTERM), killing it if it does not in time."""
        if self.running:
            assert self._process is not None
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=_SERVER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._reap()

    def kill(self) -> None:
        """Ends the server at once (SIGKILL), as a crash would."""
        if self.running:
            assert self._process is not None
            self._process.kill()
        self._reap()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(packaged_model_path()),
            "--model_alias",
            LLAMA_MODEL_ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            "2048",
            "--n_threads",
            "1",
            "--n_threads_batch",
            "1",
            "--seed",
            "1234",
            # Queue concurrent requests rather than cut the running stream short.
            "--interrupt_requests",
            "False",
            *self.extra_args,
        ]

    @staticmethod
    def _environment() -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _SERVER_ENVIRONMENT_OVERRIDES
        }
        env["HF_HUB_OFFLINE"] = "1"
        return env

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _SERVER_START_SECONDS
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if not self.running:
                    self._reap()
                    pytest.fail(
                        f"llama_cpp.server exited while starting:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/models").status_code == 200:
                        return
                time.sleep(0.2)
        self.kill()
        pytest.fail(
            f"llama_cpp.server did not answer within {_SERVER_START_SECONDS:g} s:\n"
            f"{self.log_tail()}"
        )

    def _reap(self) -> None:
        if self._process is not None:
            self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture(scope="session")
def llama_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., LlamaServer]]:
    """Starts llama.cpp servers on demand; all are stopped at the session's end.

    Call it with extra command-line arguments of ``llama_cpp.server`` if
    needed; it returns a running :class:`LlamaServer`.
    """
    if importlib.util.find_spec("llama_cpp.server") is None:
        pytest.fail(
            "llama_cpp.server is missing; run: "
            ".venv/bin/pip install 'llama-cpp-python[server]>=0.3.9,<0.4'"
        )
    servers: list[LlamaServer] = []

    def start(*extra_args: str) -> LlamaServer:
        log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
        server = LlamaServer(free_port(), log_path, extra_args)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def llama_server(llama_server_factory: Callable[..., LlamaServer]) -> LlamaServer:
    """One llama.cpp server shared by the tests that only need it to answer.

    A test that stops or kills a server starts its own with the factory.
    """
    return llama_server_factory()


@dataclass(frozen=True)
class Reply:
    """What the stub upstream answers to one request.

    ``body`` (bytes, text, or a JSON value) is sent whole with its length;
    ``chunks`` are written one after the other, each flushed at once, and the
    connection closed after them. ``hang`` makes the stub wait, without a
    word, until the client leaves or the stub stops: ``"before_headers"``
    sends nothing at all, ``"after_chunks"`` stops after the chunks.
    """

    status: int = 200
    body: Any = None
    chunks: Sequence[str] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    hang: Literal["before_headers", "after_chunks"] | None = None
    content_type: str = "application/json"


@dataclass(frozen=True)
class Received:
    """One request the stub upstream received; header names are lower case."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


class StubUpstream:
    """A scripted HTTP server in a thread; see the module docstring."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.client_left = threading.Event()
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _StubServer(("127.0.0.1", 0), _StubHandler)
        self._server.stub = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="stub-upstream",
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def script(self, *replies: Reply) -> None:
        """Queues replies, answered in order, one per request."""
        with self._lock:
            self._replies.extend(replies)

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()  # waits for every request being answered
        self._thread.join()

    def _receive(self, received: Received) -> Reply:
        with self._lock:
            self.received.append(received)
            if self._replies:
                return self._replies.popleft()
        return Reply(status=500, body={"error": {"message": "no reply scripted"}})


class _StubServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close joins the threads answering requests
    stub: StubUpstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that leaves in the middle of an answer is expected here."""


class _StubHandler(BaseHTTPRequestHandler):
    server: _StubServer

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the tests read ``received`` instead."""

    def _answer(self) -> None:
        stub = self.server.stub
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        reply = stub._receive(
            Received(
                method=self.command,
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=json.loads(raw) if raw else None,
            )
        )
        try:
            self._send(reply)
        except (BrokenPipeError, ConnectionResetError):
            stub.client_left.set()

    def _send(self, reply: Reply) -> None:
        if reply.hang == "before_headers":
            self._wait_for_leave()
            return
        self.send_response(reply.status)
        self.send_header("content-type", reply.content_type)
        self.send_header("connection", "close")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if reply.chunks:
            self.end_headers()
            for chunk in reply.chunks:
                self.wfile.write(chunk.encode())
                self.wfile.flush()
        else:
            payload = _payload(reply.body)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        if reply.hang == "after_chunks":
            self._wait_for_leave()

    def _wait_for_leave(self) -> None:
        """Waits until the client closes its connection, or the stub stops."""
        stub = self.server.stub
        while not stub._stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                stub.client_left.set()
                return


def _payload(body: Any) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


def sse(*events: Any, named: bool = False) -> list[str]:
    """Server-sent events, one ``data:`` line each (JSON unless a string).

    ``named`` adds an ``event:`` line with the payload's ``type``, as the
    Anthropic API does.
    """
    chunks = []
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        name = f"event: {event['type']}\n" if named and isinstance(event, dict) else ""
        chunks.append(f"{name}data: {data}\n\n")
    return chunks


@pytest.fixture
def stub_upstream() -> Iterator[StubUpstream]:
    """A scripted HTTP server of its own for one test."""
    stub = StubUpstream()
    try:
        yield stub
    finally:
        stub.stop()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh Redis key prefix; every key under it is deleted afterwards."""
    import redis

    from ._support import REDIS_URL

    prefix = f"ragline-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()
