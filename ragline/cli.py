"""The ``ragline`` command line.

Every command reads the settings file named by ``--config`` (or the
``RAGLINE_CONFIG`` environment variable, or ``./ragline.yaml``). Exit codes:
0 success, 1 a command that ran and found a problem (a failed source, a
verification mismatch), 2 bad settings or usage.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from index.sync import SyncReport
from ingestion.embedding import set_offline_environment
from ingestion.errors import ConfigError, RaglineError
from retrieval.config import SearchMode

from .audit_cli import audit
from .eval_cli import app as eval_app
from .flows_cli import app as flows_app
from .keys_cli import app as keys_app
from .logs import configure_logging
from .runtime import Runtime
from .settings import CONFIG_ENV, Settings, load_settings

__all__ = ["app", "main"]

app = typer.Typer(
    name="ragline",
    help="Ingest sources into a fresh vector index and search it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(
    help="Build, promote, roll back, list and verify index generations."
)
sources_app = typer.Typer(help="Inspect sources and their freshness.")
app.add_typer(index_app, name="index")
app.add_typer(sources_app, name="sources")
app.add_typer(keys_app, name="keys")
app.add_typer(flows_app, name="flows")
app.add_typer(eval_app, name="eval")
app.command("audit")(audit)

# Wide enough that tables are not cut when the output is a file or a pipe.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


class _State:
    config: Path = Path("ragline.yaml")
    log_level: str | None = None


_state = _State()


@app.callback()
def _global_options(
    config: Annotated[
        Path,
        typer.Option("--config", "-c", envvar=CONFIG_ENV, help="The settings file."),
    ] = Path("ragline.yaml"),
    log_level: Annotated[
        str | None,
        typer.Option(help="DEBUG, INFO, WARNING or ERROR; overrides the settings."),
    ] = None,
) -> None:
    _state.config = config
    _state.log_level = log_level


@contextmanager
def _runtime() -> Iterator[Runtime]:
    settings = load_settings(_state.config)
    _configure_logging(settings)
    runtime = Runtime(settings)
    try:
        yield runtime
    finally:
        runtime.close()


def _configure_logging(settings: Settings) -> None:
    secrets = [settings.catalog.url.get_secret_value()] if settings.catalog.url else []
    for collection in settings.collections:
        if collection.qdrant.api_key is not None:
            secrets.append(collection.qdrant.api_key.get_secret_value())
    if settings.serve.auth is not None:
        secrets += [k.key.get_secret_value() for k in settings.serve.auth.api_keys]
    secrets += _gateway_secrets(settings)
    webhook = settings.flows.freshness.webhook
    if webhook is not None:
        # The URL of a chat or paging webhook is itself the credential.
        secrets.append(webhook.url.get_secret_value())
    for source in settings.sources:
        url = getattr(source, "url", None)  # a stream server's URL may hold a password
        if isinstance(url, SecretStr) and "@" in url.get_secret_value():
            secrets.append(url.get_secret_value())
    configure_logging(
        _state.log_level or settings.logging.level,
        json_format=settings.logging.json_format,
        secrets=secrets,
    )


def _gateway_secrets(settings: Settings) -> list[str]:
    """Keys, tokens and Redis URLs of the gateway settings, masked in every log."""
    gateway = settings.gateway
    urls = [
        part.redis_url.get_secret_value()
        for part in (gateway.budgets, gateway.rate_limits, gateway.loop_guard)
    ]
    found = [url for url in urls if "@" in url]  # only URLs with credentials
    for provider in gateway.providers:
        key = getattr(provider, "api_key", None)
        if key is not None:
            found.append(key.get_secret_value())
    jwt = gateway.identity.jwt if gateway.identity is not None else None
    if jwt is not None and jwt.secret is not None:
        found.append(jwt.secret.get_secret_value())
    return found


# -- ingest ---------------------------------------------------------------------


@app.command()
def ingest(
    source: Annotated[
        list[str] | None,
        typer.Option("--source", "-s", help="Only this source (repeatable)."),
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full", help="Re-read and rewrite every document of the sources."
        ),
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 when any document failed.")
    ] = False,
) -> None:
    """Sync sources into the index; only what changed is written."""
    with _runtime() as runtime, _progress() as progress:
        reports = runtime.ingest(source, full=full, on_progress=progress)
    _print_reports(reports)
    failed_sources = [r for r in reports if r.status != "ok"]
    if failed_sources or (strict and any(r.failed for r in reports)):
        raise typer.Exit(1)


@app.command()
def stream(
    source: Annotated[
        list[str] | None,
        typer.Argument(help="Streaming sources to consume (default: all of them)."),
    ] = None,
    idle_exit: Annotated[
        float | None,
        typer.Option(
            "--idle-exit",
            help="Stop after the streams stayed empty this many seconds "
            "(catch up, then exit); default: run until interrupted.",
        ),
    ] = None,
    max_events: Annotated[
        int | None,
        typer.Option("--max-events", help="Stop after this many events per source."),
    ] = None,
) -> None:
    """Consume streaming sources into the index until interrupted (Ctrl-C stops cleanly)."""
    import signal
    import threading

    with _runtime() as runtime:
        names = source or [s.name for s in runtime.settings.sources if s.streaming]
        if not names:
            raise ConfigError(
                "No streaming sources are declared; add one of type redis_stream or "
                "nats under 'sources'."
            )
        for name in names:
            runtime.stream_config(name)  # fail fast on a batch source
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        results: dict[str, Any] = {}
        failures: dict[str, BaseException] = {}

        def consume(name: str) -> None:
            try:
                results[name] = runtime.consume(
                    name, stop, max_events=max_events, idle_exit_s=idle_exit
                )
            except BaseException as error:  # noqa: BLE001 - reported below, exit 1
                failures[name] = error
                stop.set()

        threads = [
            threading.Thread(target=consume, args=(n,), name=f"ragline-stream-{n}")
            for n in names
        ]
        err.print(f"consuming {', '.join(names)} (Ctrl-C stops)", markup=False)
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(timeout=0.5)
    for name in names:
        stats = results.get(name)
        if stats is not None:
            out.print(
                f"{name}: {stats.events} events, {stats.applied} applied, "
                f"{stats.dead_lettered} dead-lettered",
                markup=False,
            )
    for name, error in failures.items():
        err.print(f"error: {name}: {error}", highlight=False, markup=False)
    if failures:
        raise typer.Exit(1)


@contextmanager
def _progress() -> Iterator[Any]:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=err, disable=not err.is_terminal) as progress:
        tasks: dict[str, Any] = {}

        def update(report: SyncReport) -> None:
            if report.source not in tasks:
                tasks[report.source] = progress.add_task(report.source)
            progress.update(
                tasks[report.source],
                description=f"{report.source}: {report.seen} documents, "
                f"{report.chunks_written} chunks written, {report.failed} failed",
            )

        yield update


def _print_reports(reports: list[SyncReport]) -> None:
    table = Table(title="ingest")
    for column in (
        "source",
        "generation",
        "status",
        "seen",
        "added",
        "changed",
        "unchanged",
        "deleted",
        "failed",
        "chunks",
        "seconds",
    ):
        table.add_column(
            column, justify="left" if column in ("source", "status") else "right"
        )
    for r in reports:
        table.add_row(
            r.source,
            str(r.generation_id),
            r.status,
            str(r.seen),
            str(r.added),
            str(r.changed),
            str(r.unchanged),
            str(r.deleted),
            str(r.failed),
            str(r.chunks_written),
            f"{r.seconds:.1f}",
        )
    out.print(table)
    for r in reports:
        if r.error:
            err.print(
                f"source {r.source} failed: {r.error}", markup=False, highlight=False
            )
        for doc_id, message in r.failures[:20]:
            err.print(f"skipped {doc_id}: {message}", markup=False, highlight=False)
        if len(r.failures) > 20:
            err.print(
                f"... and {len(r.failures) - 20} more; `ragline sources status` lists them"
            )


# -- search ---------------------------------------------------------------------


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    collection: Annotated[
        str, typer.Option("--collection", "-C", help="Collection to search.")
    ],
    k: Annotated[
        int, typer.Option("-k", min=1, max=1000, help="How many passages.")
    ] = 5,
    mode: Annotated[
        SearchMode,
        typer.Option(
            help="dense (score: cosine similarity), lexical (BM25) or hybrid "
            "(reciprocal rank fusion of both)."
        ),
    ] = "dense",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Find the passages that best match QUERY."""
    if not query.strip():
        raise ConfigError("The query is empty; say what to look for.")
    with _runtime() as runtime:
        hits = runtime.search(collection, query, k, mode=mode)
    if as_json:
        results = [
            {
                "uri": h.uri,
                "doc_id": h.doc_id,
                "chunk_id": h.chunk_id,
                "score": h.score,
                "text": h.text,
            }
            for h in hits
        ]
        sys.stdout.write(
            json.dumps(
                {"query": query, "collection": collection, "results": results}, indent=2
            )
            + "\n"
        )
        return
    if not hits:
        out.print("No passages found.")
    for rank, hit in enumerate(hits, 1):
        heading = " > ".join(hit.heading_path)
        out.print(
            f"[bold]{rank}.[/bold] {hit.score:.3f}  {escape(hit.uri)}"
            + (f"  ({escape(heading)})" if heading else "")
        )
        out.print(_snippet(hit.text), highlight=False, markup=False)
        out.print()


def _snippet(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# -- serve and ask --------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (serve.host).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to listen on (serve.port).")
    ] = None,
) -> None:
    """Start the HTTP service: /ask, /search, /metrics, /freshness, /docs."""
    import uvicorn

    from .serve import build_app

    settings = load_settings(_state.config)
    _configure_logging(settings)
    host = host or settings.serve.host
    port = port or settings.serve.port
    runtime = Runtime(settings)
    application = build_app(runtime)
    err.print(
        f"ragline serving on http://{host}:{port} (API docs at /docs)", markup=False
    )
    uvicorn.run(application, host=host, port=port, log_config=None, access_log=False)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    collection: Annotated[
        str, typer.Option("--collection", "-C", help="Collection to answer from.")
    ],
    url: Annotated[
        str | None,
        typer.Option(help="The service; default http://serve.host:serve.port."),
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Passages to retrieve.")] = 5,
    api_key: Annotated[
        str | None, typer.Option(envvar="RAGLINE_API_KEY", help="API key, if any.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Ask a running service a question over HTTP; print the answer and citations."""
    import httpx

    settings = load_settings(_state.config)
    base = url or f"http://{settings.serve.host}:{settings.serve.port}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"question": question, "collection": collection, "top_k": k}
    try:
        response = httpx.post(f"{base}/ask", json=body, headers=headers, timeout=300)
    except httpx.HTTPError as error:
        raise RaglineError(
            f"Could not reach the service at {base}: {error}. Start it with "
            "`ragline serve`, or pass --url."
        ) from error
    payload = response.json()
    if response.status_code != 200:
        raise RaglineError(
            f"The service answered {response.status_code}: {payload.get('error')}"
        )
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    out.print(payload["answer"], markup=False, highlight=False)
    out.print()
    for cite in payload["citations"]:
        out.print(
            f"[{cite['n']}] {cite['title'] or cite['doc_id']}  {cite['uri']}  "
            f"(as of {cite['as_of']})",
            markup=False,
            highlight=False,
        )
    timings = payload["timings"]
    out.print(
        f"{payload['model']}: {payload['usage']['completion_tokens']} tokens, "
        f"retrieve {timings['retrieve_ms']:.0f} ms, generate "
        f"{timings['generate_ms']:.0f} ms, cached={payload['cached']}",
        markup=False,
        highlight=False,
    )


# -- index ------------------------------------------------------------------------


@index_app.command("build")
def index_build(
    collection: Annotated[
        str, typer.Option("--collection", "-C", help="Collection to build.")
    ],
) -> None:
    """Build a new generation beside the live one, from all the collection's sources."""
    with _runtime() as runtime, _progress() as progress:
        generation, reports = runtime.build(collection, on_progress=progress)
    _print_reports(reports)
    if generation.state != "ready":
        err.print(
            f"Generation {generation.id} is incomplete; run the build again to finish it."
        )
        raise typer.Exit(1)
    out.print(
        f"Generation {generation.id} of {collection} is ready. Make it live with "
        f"`ragline index promote --collection {collection}`."
    )


@index_app.command("promote")
def index_promote(
    collection: Annotated[str, typer.Option("--collection", "-C")],
    generation: Annotated[
        int | None,
        typer.Option("--generation", "-g", help="Default: the newest ready one."),
    ] = None,
) -> None:
    """Make a built generation live, in one step."""
    with _runtime() as runtime:
        runtime.settings.collection(collection)
        target = generation or _newest_ready(runtime, collection)
        previous = runtime.catalog.promote(collection, target)
    was = f" (was {previous.id}, kept for rollback)" if previous else ""
    out.print(f"Collection {collection} now serves generation {target}{was}.")


def _newest_ready(runtime: Runtime, collection: str) -> int:
    ready = [g for g in runtime.catalog.generations(collection) if g.state == "ready"]
    if not ready:
        raise typer.BadParameter(
            f"collection {collection!r} has no ready generation; build one with "
            f"`ragline index build --collection {collection}`"
        )
    return ready[-1].id


@index_app.command("rollback")
def index_rollback(
    collection: Annotated[str, typer.Option("--collection", "-C")],
) -> None:
    """Serve the previously live generation again."""
    with _runtime() as runtime:
        runtime.settings.collection(collection)
        old, now = runtime.catalog.rollback(collection)
    out.print(f"Collection {collection} now serves generation {now.id} (was {old.id}).")


@index_app.command("list")
def index_list(
    collection: Annotated[str | None, typer.Option("--collection", "-C")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List generations with their state and size."""
    with _runtime() as runtime:
        rows = []
        for g in runtime.catalog.generations(collection):
            docs, chunks = runtime.catalog.counts(g.id)
            rows.append(
                {
                    "id": g.id,
                    "collection": g.collection,
                    "state": g.state,
                    "backend": g.backend,
                    "fingerprint": g.fingerprint,
                    "documents": docs,
                    "chunks": chunks,
                    "created_at": _iso(g.created_at),
                    "promoted_at": _iso(g.promoted_at),
                    "embedding_model": g.pipeline.get("embedding_model"),
                }
            )
    if as_json:
        sys.stdout.write(json.dumps({"generations": rows}, indent=2) + "\n")
        return
    table = Table(title="generations")
    for column in (
        "id",
        "collection",
        "state",
        "backend",
        "fingerprint",
        "documents",
        "chunks",
        "created_at",
        "promoted_at",
    ):
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(
                str(row[c] or "")
                for c in (
                    "id",
                    "collection",
                    "state",
                    "backend",
                    "fingerprint",
                    "documents",
                    "chunks",
                    "created_at",
                    "promoted_at",
                )
            )
        )
    out.print(table)


@index_app.command("verify")
def index_verify(
    collection: Annotated[str | None, typer.Option("--collection", "-C")] = None,
) -> None:
    """Check that catalog and index agree; exit 1 on any mismatch."""
    with _runtime() as runtime:
        results = runtime.verify(collection)
    bad = False
    for name, problems in results.items():
        if problems:
            bad = True
            err.print(f"[red]{name}: {len(problems)} problem(s)[/red]")
            for problem in problems:
                err.print(f"  - {problem}", markup=False, highlight=False)
        else:
            out.print(f"{name}: ok")
    if not results:
        out.print("No live generation to verify yet; run `ragline ingest` first.")
    if bad:
        raise typer.Exit(1)


# -- sources ----------------------------------------------------------------------


@sources_app.command("status")
def sources_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Freshness per source: last sync, objective, stream lag, what the last run found."""
    with _runtime() as runtime:
        rows = runtime.source_rows()
    if as_json:
        sys.stdout.write(json.dumps({"sources": rows}, indent=2) + "\n")
        return
    table = Table(title="sources")
    columns = (
        "source",
        "collection",
        "last_success_at",
        "staleness_s",
        "max_staleness_s",
        "stale",
        "event_lag_s",
        "last_status",
        "documents",
        "seen",
        "changed",
        "deleted",
        "failed",
    )
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(str(row.get(c, "")) if row.get(c) is not None else "" for c in columns)
        )
    out.print(table)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def main() -> None:
    """Entry point of the ``ragline`` console script."""
    set_offline_environment()
    try:
        app()
    except ConfigError as error:
        err.print(f"error: {error}", highlight=False, markup=False)
        sys.exit(2)
    except RaglineError as error:
        err.print(f"error: {error}", highlight=False, markup=False)
        sys.exit(1)
