"""The stream consumer flow: apply a streaming source's events until stopped.

The consumer runs in a thread of the flow run; the flow's own thread waits
for it. Cancelling the run in Prefect (the runner or worker sends SIGTERM,
which Prefect turns into an exception in the flow's thread) or an interrupt
sets the consumer's stop event, and the flow waits for the batch in flight
to be committed before it ends. Events not yet acknowledged are delivered
again to the next consumer, so stopping never loses one.
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Any

from prefect import flow

from ingestion.streaming.consumer import ConsumerStats

from ._steps import RunLog
from .context import FlowRuntime, using_runtime

__all__ = ["stream_ingest"]

log = RunLog(__name__)

_POLL_SECONDS = 0.5


@flow(name="stream-ingest", flow_run_name="stream-ingest/{source}")
def stream_ingest(
    source: str,
    config: str | None = None,
    max_events: int | None = None,
    idle_exit_s: float | None = None,
) -> dict[str, Any]:
    """Consume a streaming source until cancelled (or until a limit ends it)."""
    with using_runtime(config) as runtime:
        log.info("stream consumer starting: source=%s", source)
        stats = _consume_until_stopped(runtime, source, max_events, idle_exit_s)
        summary = {k: v for k, v in asdict(stats).items() if k != "lags"}
        log.info(
            "stream consumer stopped: source=%s events=%d applied=%d "
            "dead_lettered=%d failures=%d",
            source,
            stats.events,
            stats.applied,
            stats.dead_lettered,
            stats.failures,
        )
        return summary


def _consume_until_stopped(
    runtime: FlowRuntime,
    source: str,
    max_events: int | None,
    idle_exit_s: float | None,
) -> ConsumerStats:
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def consume() -> None:
        try:
            outcome["stats"] = runtime.consume(
                source, stop, max_events=max_events, idle_exit_s=idle_exit_s
            )
        except BaseException as err:  # noqa: BLE001 - re-raised in the flow thread
            outcome["error"] = err

    worker = threading.Thread(target=consume, name=f"consume-{source}", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(_POLL_SECONDS)
    finally:
        # Cancellation, SIGTERM or Ctrl-C: let the batch in flight commit.
        stop.set()
        worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["stats"]
