"""What the governed gateway adds to a model call, beside a direct call and LiteLLM.

Prints, in one run, against the same upstream and the same load generator:

* the latency each path adds over calling the upstream directly (p50 and
  p99), one request at a time (one ``wrk`` connection, closed loop) and at a
  fixed 100 requests per second (open loop);
* the highest request rate each path sustains with p99 under 50 ms (the
  best passing step of a rising ``wrk`` connection count);
* ragline's sustained rate over LiteLLM's, and ragline's added p50, beside
  their goals (at most 1 ms added at p50; at least 1,000 requests per second
  with p99 under 50 ms; at least 10 times LiteLLM's rate);
* the peak resident memory of each gateway process.

The three paths:

``direct``
    the upstream itself: Debian's nginx answering a fixed chat completion
    (``bench/gateway/nginx.conf``), so that the upstream costs next to
    nothing and only the gateway in front of it is measured;
``ragline``
    ``ragline serve`` with a gateway that routes the virtual model ``bench``
    to that upstream, with identity (an API key made by ``ragline keys
    create``), policy, budgets, rate limits, the loop guard and audit all on
    (``RAGLINE_SETTINGS`` below). A service without the OpenAI-compatible
    endpoint (it answers 404) is skipped with a message;
``litellm``
    the LiteLLM proxy (PyPI ``litellm[proxy]``, in a virtualenv of its own
    under ``bench/.cache/litellm-venv``, made by ``bench/gateway/install.sh``
    on first use), one model pointing at the upstream, no database, offline.

Each gateway runs as one worker process pinned to one core (``taskset -c``
the first core this process may use); the upstream, ``wrk`` and this process
(which sends the fixed-rate load) share the second one. ``wrk`` cannot hold
a fixed rate (``wrk2`` is not packaged by Debian), so the 100 requests per
second come from an open-loop asyncio client here, which sends each request
at its scheduled time whether or not earlier ones have been answered, on
connections of its own, so a stalled gateway is charged for every request
that waited for it (no coordinated omission).

Every request body is different (it carries its number), so the loop guard
and any answer cache see ordinary traffic.

A run takes about three minutes once the LiteLLM virtualenv exists (making
it takes about a minute more, once). Servers' logs, settings and nginx's
files are in ``bench/.cache/gateway``.

Usage: python bench/bench_gateway.py [--paths direct,ragline,litellm]
    [--seconds S] [--rate R] [--step-seconds S] [--p99-limit MS]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import REPO, latency_ms, print_table, progress

CACHE = REPO / "bench" / ".cache"
HERE = REPO / "bench" / "gateway"
RUN_DIR = CACHE / "gateway"
LITELLM_VENV = CACHE / "litellm-venv"
RAGLINE = Path(sys.executable).parent / "ragline"
PATHS = ("direct", "ragline", "litellm")
MODEL = "bench"  # the model name callers ask every path for
UPSTREAM_MODEL = "bench-upstream"  # what the upstream calls itself
CHAT = "/v1/chat/completions"
CONNECTION_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WARM_UP_SECONDS = 3.0
REQUEST_TIMEOUT = 30.0  # seconds one open-loop request may take before it fails

# Goals printed beside the figures.
ADDED_P50_GOAL_MS = 1.0
RATE_GOAL = 1000.0
LITELLM_RATIO_GOAL = 10.0

# -- ragline's settings: TEMPLATE ---------------------------------------------
#
# TEMPLATE of the settings file `ragline serve` runs with here; keep its
# "gateway" section in step with the settings models of serving/gateway/
# (config.py and the models it composes) whenever they change. What it
# assumes: a provider of type openai at the upstream; one virtual model,
# MODEL, routed to it with no retries; API keys from `ragline keys create`,
# sent as "Authorization: Bearer"; a policy that lets BENCH_TEAM call MODEL;
# budgets and rate limits on, with limits far above what the benchmark can
# spend, so that every check runs and none refuses; the loop guard and the
# audit log on. Strings holding "{upstream}", "{port}" or "{data_dir}" are
# filled in by `ragline_settings`; the file is written as JSON (valid YAML).
BENCH_TEAM = "bench"
RAGLINE_SETTINGS: dict[str, Any] = {
    "data_dir": "{data_dir}",
    "logging": {"level": "WARNING"},
    "collections": [{"name": "bench", "index": "faiss"}],
    "serve": {"host": "127.0.0.1", "port": "{port}"},
    "gateway": {
        "providers": [
            {
                "type": "openai",
                "name": "upstream",
                "base_url": "{upstream}/v1",
                "model": UPSTREAM_MODEL,
                "context_window": 4096,
                "max_tokens": 16,
                "max_connections": 512,
                "max_keepalive_connections": 512,
                "trust_env": False,
            }
        ],
        "routing": {
            "models": [
                {
                    "name": MODEL,
                    "targets": [{"target": "upstream"}],
                    "retries": 0,
                    "timeout": 10.0,
                }
            ]
        },
        "identity": {"api_keys": {"cache_seconds": 5.0}},
        "policy": {"teams": {BENCH_TEAM: {"models": [MODEL]}}},
        "budgets": {
            "enabled": True,
            "backend": "sql",
            "teams": {BENCH_TEAM: {"tokens_per_day": 10**12, "cost_per_day": 10**6}},
            "default_price": {"input_per_million": 0.1, "output_per_million": 0.2},
        },
        "rate_limits": {
            "enabled": True,
            "backend": "memory",
            "teams": {
                BENCH_TEAM: {
                    "requests_per_minute": 10**9,
                    "tokens_per_minute": 10**12,
                }
            },
        },
        "loop_guard": {"enabled": True, "backend": "memory"},
        "audit": {"enabled": True},
    },
}


def ragline_settings(data_dir: Path, port: int, upstream: str) -> dict[str, Any]:
    """``RAGLINE_SETTINGS`` with its placeholders filled in."""
    values = {"data_dir": str(data_dir), "port": str(port), "upstream": upstream}

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(value) for value in node]
        if isinstance(node, str) and "{" in node:
            text = node.format(**values)
            return int(text) if text.isdigit() else text
        return node

    return dict(fill(RAGLINE_SETTINGS))


# -- processes -----------------------------------------------------------------


class PathFailed(Exception):
    """A path could not be started or failed under load; the others still run."""


class Process:
    """A server this benchmark started, pinned to a core, with its log in RUN_DIR."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        core: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = RUN_DIR / f"{name}.log"
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(
            ["taskset", "-c", str(core), *command],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group, stopped as one
        )

    def wait_ready(self, url: str, timeout: float) -> None:
        """Until ``GET url`` answers at all (any status), or exit on failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self.stop()
                raise PathFailed(
                    f"{self.name} exited with code {self._process.returncode} "
                    f"before it was ready; its log: {self.log_path}\n"
                    + _tail(self.log_path)
                )
            try:
                _http("GET", url, timeout=2)
                return
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise PathFailed(
            f"{self.name} did not answer within {timeout:.0f}s; its log: "
            f"{self.log_path}\n" + _tail(self.log_path)
        )

    def peak_rss_mb(self) -> float:
        """Resident-memory high-water marks of the process and its children, added."""
        pids = [self._process.pid, *_descendants(self._process.pid)]
        total_kb = 0
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
        return total_kb / 1024

    def stop(self) -> None:
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        self._log.close()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    key: str = "",
    timeout: float = 10,
) -> tuple[int, str]:
    """One plain request; returns the status and the body. Raises OSError."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1", parts.port, timeout=timeout
    )
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, parts.path or "/", payload, headers)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    except http.client.HTTPException as err:
        raise OSError(f"{method} {url} failed: {err}") from err
    finally:
        connection.close()


# -- the three paths -----------------------------------------------------------


class Endpoint:
    """One path to the upstream: where requests go, with which key, through what."""

    def __init__(self, name: str, url: str, key: str, process: Process | None) -> None:
        self.name = name
        self.url = url
        self.key = key
        self.process = process

    def peak_rss_mb(self) -> float:
        return self.process.peak_rss_mb() if self.process else float("nan")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def start_upstream(core: int) -> tuple[Process, str]:
    """nginx answering a fixed chat completion, as this user, in RUN_DIR."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = _free_port()
    prefix = RUN_DIR / "nginx"
    shutil.rmtree(prefix, ignore_errors=True)
    (prefix / "tmp").mkdir(parents=True)
    config = prefix / "nginx.conf"
    config.write_text((HERE / "nginx.conf").read_text().replace("@PORT@", str(port)))
    command = [nginx, "-p", str(prefix), "-c", str(config), "-e", "error.log"]
    process = Process("nginx", command, core)
    url = f"http://127.0.0.1:{port}"
    process.wait_ready(f"{url}/v1/models", timeout=10)
    return process, url


def start_ragline(core: int, upstream: str) -> Endpoint | None:
    """``ragline serve`` with the gateway of ``RAGLINE_SETTINGS``, or None.

    Makes a fresh data directory, writes the settings file, creates an API
    key with ``ragline keys create``, starts the service and sends one
    request. None (with a message) when the service has no chat endpoint
    yet; PathFailed, with the answer, when the endpoint refuses the request.
    """
    data_dir = RUN_DIR / "ragline"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    port = _free_port()
    config = data_dir / "ragline.yaml"
    config.write_text(json.dumps(ragline_settings(data_dir, port, upstream), indent=2))
    env = {"HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}

    created = subprocess.run(
        [
            *(str(RAGLINE), "--config", str(config), "keys", "create"),
            *("--user", "bench", "--team", BENCH_TEAM, "--description", "benchmark"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    if created.returncode != 0:
        raise PathFailed(
            f"`ragline keys create` failed with code {created.returncode} for the "
            f"settings in {config}; adjust RAGLINE_SETTINGS in {__file__}:\n"
            + created.stderr[-2000:]
        )
    key = created.stdout.strip().splitlines()[-1]

    command = [str(RAGLINE), "--config", str(config), "serve"]
    process = Process("ragline", command, core, env)
    url = f"http://127.0.0.1:{port}"
    with _stopped_on_failure(process):
        process.wait_ready(f"{url}/healthz", timeout=180)
        status, body = _probe(process, url, key)
    if status == 404:
        process.stop()
        progress(
            f"skipping ragline: POST {CHAT} answered 404, so this `ragline serve` "
            f"has no OpenAI-compatible chat endpoint yet ({body[:200]})"
        )
        return None
    _expect_completion(process, status, body)
    return Endpoint("ragline", url, key, process)


def start_litellm(core: int, upstream: str) -> Endpoint:
    """The LiteLLM proxy in front of the upstream: one worker, no database."""
    litellm = LITELLM_VENV / "bin" / "litellm"
    if not litellm.exists():
        progress(f"installing the LiteLLM proxy into {LITELLM_VENV} (once)")
        subprocess.run(["bash", str(HERE / "install.sh")], check=True)
    port = _free_port()
    key = "sk-bench-" + secrets.token_hex(16)
    env = {
        "LITELLM_MASTER_KEY": key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "BENCH_UPSTREAM_URL": f"{upstream}/v1",
        "BENCH_UPSTREAM_KEY": "sk-upstream-unused",
        "NO_PROXY": "127.0.0.1,localhost",
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        str(litellm),
        "--config",
        str(HERE / "litellm.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    process = Process("litellm", command, core, env)
    url = f"http://127.0.0.1:{port}"
    with _stopped_on_failure(process):
        process.wait_ready(f"{url}/health/liveliness", timeout=180)
        status, body = _probe(process, url, key)
    _expect_completion(process, status, body)
    return Endpoint("litellm", url, key, process)


def litellm_version() -> str:
    python = LITELLM_VENV / "bin" / "python"
    done = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


@contextmanager
def _stopped_on_failure(process: Process) -> Iterator[None]:
    """Stop ``process`` when the block fails (or is interrupted)."""
    try:
        yield
    except BaseException:
        process.stop()
        raise


def _probe(process: Process, url: str, key: str) -> tuple[int, str]:
    """One chat request, as a check that the path works before it is loaded."""
    body = {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Say hello, probe."}],
    }
    try:
        return _http("POST", url + CHAT, body, key, timeout=30)
    except OSError as err:
        raise PathFailed(
            f"{process.name} did not answer a chat request: {err}; "
            f"its log: {process.log_path}"
        ) from err


def _expect_completion(process: Process, status: int, body: str) -> None:
    if status == 200 and '"choices"' in body:
        return
    process.stop()
    raise PathFailed(
        f"{process.name} answered a chat request with {status}: {body[:500]}\n"
        f"its log: {process.log_path}"
    )


# -- the load --------------------------------------------------------------------


def wrk(
    path: Endpoint, connections: int, seconds: float, *, check: bool = True
) -> dict[str, float]:
    """Requests per second and latency of ``connections`` closed-loop connections."""
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(HERE / "chat.lua"),
        path.url,
        "--",
        path.key,
        MODEL,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    report = done.stdout
    errors = _wrk_errors(report)
    if check and errors:
        raise PathFailed(
            f"{path.name} answered errors under load ({errors} of them); one "
            f"request now gets {_sample_answer(path)}\n{report}"
        )
    rps = re.search(r"Requests/sec:\s+([\d.]+)", report)
    return {
        "connections": connections,
        "rps": float(rps[1]) if rps else 0.0,
        "p50": _wrk_ms(report, "50%"),
        "p99": _wrk_ms(report, "99%"),
        "errors": errors,
    }


def _sample_answer(path: Endpoint) -> str:
    body = {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": f"Say hello, {time.time_ns()}."}],
    }
    try:
        status, answer = _http("POST", path.url + CHAT, body, path.key)
    except OSError as err:
        return f"no answer ({err})"
    return f"{status}: {answer[:300]}"


def _wrk_errors(report: str) -> int:
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", report)
    if non_2xx:
        errors += int(non_2xx[1])
    sockets = re.search(r"Socket errors:(.*)", report)
    if sockets:
        errors += sum(int(n) for n in re.findall(r"(\d+)", sockets[1]))
    return errors


def _wrk_ms(report: str, percentile: str) -> float:
    match = re.search(rf"{re.escape(percentile)}\s+([\d.]+)(us|ms|s)\b", report)
    if match is None:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match[2]]
    return float(match[1]) * scale


def sustained(path: Endpoint, seconds: float, p99_limit_ms: float) -> dict[str, Any]:
    """The best rate with p99 under the limit, over a rising connection count.

    Stops at the first step over the limit, or with errors, or when the rate
    no longer rises (more connections past saturation only add queueing).
    """
    best: dict[str, Any] = {"connections": 0, "rps": 0.0, "p50": float("nan")}
    best["p99"] = float("nan")
    for connections in CONNECTION_STEPS:
        step = wrk(path, connections, seconds, check=False)
        progress(
            f"  {path.name}: {connections} connections: {step['rps']:,.0f}/s, "
            f"p50 {step['p50']:.2f} ms, p99 {step['p99']:.2f} ms"
            + (f", {step['errors']} errors" if step["errors"] else "")
        )
        if step["errors"] or not step["p99"] < p99_limit_ms:
            break
        rising = step["rps"] > 1.05 * best["rps"]
        if step["rps"] > best["rps"]:
            best = step
        if not rising and connections >= 8:
            break  # saturated: more connections only queue
    return best


def fixed_rate(path: Endpoint, rate: float, seconds: float) -> dict[str, float]:
    """Latency at ``rate`` requests per second, open loop (see the module doc).

    A path slower than the rate falls behind, and its latency then counts the
    time requests waited in its queue; ``answered`` (requests answered per
    second of the run) shows it.
    """
    started = time.perf_counter()
    durations, failures = asyncio.run(_open_loop(path, rate, seconds))
    elapsed = time.perf_counter() - started
    sent = len(durations) + len(failures)
    if failures:
        progress(
            f"  {path.name}: {len(failures)} of {sent} requests failed at "
            f"{rate:g}/s; the first: {failures[0][:300]}"
        )
    if len(failures) * 2 > sent:
        raise PathFailed(f"{path.name} failed most requests at {rate:g}/s")
    figures = latency_ms(durations)
    return {
        "p50": figures["p50"],
        "p99": figures["p99"],
        "answered": len(durations) / elapsed,
        "failed": len(failures),
    }


async def _open_loop(
    path: Endpoint, rate: float, seconds: float
) -> tuple[list[float], list[str]]:
    """Send ``rate * seconds`` requests on schedule; their durations and failures.

    Each request is timed from the start of its task, which the schedule
    starts when the request is due (give or take the event loop's timer),
    until its answer is read. It goes on a connection no other request is
    using, an idle one or else a new one, so a slow answer never holds back
    the requests due after it.
    """
    parts = urlsplit(path.url)
    host, port = parts.hostname or "127.0.0.1", int(parts.port or 80)
    auth = f"Authorization: Bearer {path.key}\r\n" if path.key else ""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    durations: list[float] = []
    failures: list[str] = []

    def request(number: int) -> bytes:
        body = json.dumps(
            {
                "model": MODEL,
                "max_tokens": 16,
                "messages": [
                    {"role": "user", "content": f"Say hello, request {number}."}
                ],
            }
        ).encode()
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def one(number: int) -> None:
        started = time.perf_counter()
        writer = None
        try:
            connection = idle.pop() if idle else await _connect(host, port)
            reader, writer = connection
            writer.write(request(number))
            status, body = await asyncio.wait_for(
                _read_response(reader), REQUEST_TIMEOUT
            )
        except (OSError, asyncio.IncompleteReadError, ValueError) as err:
            if writer is not None:
                writer.close()
            failures.append(f"{type(err).__name__}: {err}")
            return
        took = time.perf_counter() - started
        idle.append(connection)
        if status != 200:
            failures.append(f"{status}: {body.decode(errors='replace')}")
            return
        durations.append(took)

    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    for number in range(round(rate * seconds)):
        delay = start + number / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(number))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))
    for _, writer in idle:
        writer.close()
    return durations, failures


async def _connect(
    host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(host, port), REQUEST_TIMEOUT)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response (fixed length or chunked)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status = int(head.split(" ", 2)[1])
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in head.split("\r\n")[1:])
        if name
    }
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += chunk[:-2]
    raise ValueError("a response without Content-Length or chunked encoding")


# -- the run -----------------------------------------------------------------------


def measure(path: Endpoint, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one path; the gateway process's peak memory last."""
    progress(f"{path.name}: warm-up, {WARM_UP_SECONDS:.0f}s at 4 connections")
    wrk(path, 4, WARM_UP_SECONDS)
    progress(f"{path.name}: one request at a time, {args.seconds:.0f}s")
    serial = wrk(path, 1, args.seconds)
    progress(f"{path.name}: {args.rate:g} requests/s open loop, {args.seconds:.0f}s")
    paced = fixed_rate(path, args.rate, args.seconds)
    progress(f"{path.name}: rising load, {args.step_seconds:.0f}s a step")
    best = sustained(path, args.step_seconds, args.p99_limit)
    return {
        "serial": serial,
        "paced": paced,
        "sustained": best,
        "peak_rss_mb": path.peak_rss_mb(),
    }


def cores() -> tuple[int, int]:
    """The gateway's core and the load's core: the first two this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit(
            f"this benchmark pins the gateway and the load to two different cores, "
            f"and this process may use only {allowed}"
        )
    return allowed[0], allowed[1]


def main() -> None:
    args = parse_args()
    gateway_core, load_core = cores()
    os.sched_setaffinity(0, {load_core})  # wrk and the open-loop client too
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    try:
        upstream, upstream_url = start_upstream(load_core)
    except PathFailed as err:
        raise SystemExit(f"the upstream did not start: {err}") from err

    starters: dict[str, Callable[[], Endpoint | None]] = {
        "direct": lambda: Endpoint("direct", upstream_url, "", None),
        "ragline": lambda: start_ragline(gateway_core, upstream_url),
        "litellm": lambda: start_litellm(gateway_core, upstream_url),
    }
    figures: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    failed = False
    try:
        for name in args.paths:
            progress(f"starting {name}")
            try:
                figures[name] = run_path(starters[name], args)
            except PathFailed as err:
                if name == "direct":
                    raise SystemExit(f"the direct path failed: {err}") from err
                progress(f"{name} failed: {err}")
                notes.append(f"{name}: failed, see above and {RUN_DIR}")
                failed = True
                continue
            if not figures[name]:
                del figures[name]
                notes.append(f"{name}: skipped, no chat endpoint yet")
    finally:
        upstream.stop()

    version = litellm_version() if "litellm" in figures else ""
    report(figures, args, version, notes)
    if failed:
        raise SystemExit(1)


def run_path(
    start: Callable[[], Endpoint | None], args: argparse.Namespace
) -> dict[str, Any]:
    """Start a path, measure it and stop it; empty when it was skipped."""
    path = start()
    if path is None:
        return {}
    try:
        return measure(path, args)
    finally:
        path.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help="Comma-separated paths to measure: direct and any of ragline, litellm.",
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="Length of each latency run."
    )
    parser.add_argument(
        "--rate", type=float, default=100.0, help="The fixed rate, requests/s."
    )
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=5.0,
        help="Length of each step of the rising load.",
    )
    parser.add_argument(
        "--p99-limit",
        type=float,
        default=50.0,
        help="The p99 (ms) a sustained rate must stay under.",
    )
    args = parser.parse_args()
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if args.paths[:1] != ["direct"] or not set(args.paths) <= set(PATHS):
        parser.error(
            "--paths starts with direct (the baseline), then any of ragline, "
            f"litellm; got {','.join(args.paths)}"
        )
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing; run `bash bench/prepare` first.")
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        progress("nginx is missing; running bench/gateway/install.sh")
        subprocess.run(["bash", str(HERE / "install.sh")], check=True)
    return args


def report(
    figures: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    version: str,
    notes: Sequence[str],
) -> None:
    labels = {
        "direct": "direct (nginx)",
        "ragline": "ragline serve",
        "litellm": f"LiteLLM {version}",
    }
    print(
        "\nupstream: nginx answering a fixed chat completion; each gateway one "
        "worker on a core of its own; the upstream and the load on the other core"
    )
    print_table(
        f"latency, one request at a time (1 wrk connection, closed loop), "
        f"{args.seconds:g}s",
        ["path", "p50 ms", "p99 ms", "added p50", "added p99", "peak MB"],
        [
            [labels[name], *_latency_cells(figures, name, "serial"), f["peak_rss_mb"]]
            for name, f in figures.items()
        ],
    )
    print_table(
        f"latency at {args.rate:g} requests/s (open-loop asyncio client; wrk2 is "
        f"not packaged), {args.seconds:g}s",
        [
            *("path", "p50 ms", "p99 ms", "added p50", "added p99"),
            *("answered/s", "failed", "peak MB"),
        ],
        [
            [
                labels[name],
                *_latency_cells(figures, name, "paced"),
                f["paced"]["answered"],
                f["paced"]["failed"],
                f["peak_rss_mb"],
            ]
            for name, f in figures.items()
        ],
    )
    print_table(
        f"highest rate with p99 under {args.p99_limit:g} ms "
        f"(wrk, rising connection count, {args.step_seconds:g}s a step)",
        ["path", "requests/s", "connections", "p50 ms", "p99 ms", "peak MB"],
        [
            [
                labels[name],
                f["sustained"]["rps"],
                f["sustained"]["connections"],
                f["sustained"]["p50"],
                f["sustained"]["p99"],
                f["peak_rss_mb"],
            ]
            for name, f in figures.items()
        ],
    )
    print("\n(added = the path's percentile minus the direct path's)")
    for note in notes:
        print(note)
    for line in goal_lines(figures, args, labels):
        print(line)


def goal_lines(
    figures: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    labels: dict[str, str],
) -> list[str]:
    """ragline's headline figures beside their goals, and LiteLLM's for scale."""
    lines = []
    for name in ("ragline", "litellm"):
        if name not in figures:
            continue
        serial = _added(figures, name, "serial", "p50")
        paced = _added(figures, name, "paced", "p50")
        rate = figures[name]["sustained"]["rps"]
        goals = name == "ragline"
        lines += [
            f"{labels[name]}: added p50 {serial:.3f} ms one at a time, "
            f"{paced:.3f} ms at {args.rate:g}/s"
            + (f"   (goal <= {ADDED_P50_GOAL_MS:g} ms)" if goals else ""),
            f"{labels[name]}: {rate:,.0f} requests/s with p99 < "
            f"{args.p99_limit:g} ms"
            + (f"   (goal >= {RATE_GOAL:,.0f}/s)" if goals else ""),
        ]
    if "ragline" in figures and "litellm" in figures:
        litellm = figures["litellm"]["sustained"]["rps"]
        ratio = figures["ragline"]["sustained"]["rps"] / litellm if litellm else 0.0
        lines.append(
            f"ragline rate / LiteLLM rate: {ratio:.1f}   "
            f"(goal >= {LITELLM_RATIO_GOAL:g})"
        )
        litellm_added = _added(figures, "litellm", "serial", "p50")
        if litellm_added > 0:
            share = _added(figures, "ragline", "serial", "p50") / litellm_added
            lines.append(f"ragline added p50 / LiteLLM added p50: {share:.2f}")
    return lines


def _added(figures: dict[str, Any], name: str, mode: str, figure: str) -> float:
    return float(figures[name][mode][figure] - figures["direct"][mode][figure])


def _latency_cells(figures: dict[str, Any], name: str, mode: str) -> list[Any]:
    own = figures[name][mode]
    if name == "direct":
        return [own["p50"], own["p99"], "-", "-"]
    return [
        own["p50"],
        own["p99"],
        _added(figures, name, mode, "p50"),
        _added(figures, name, mode, "p99"),
    ]


if __name__ == "__main__":
    main()
