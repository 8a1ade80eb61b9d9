"""What every flow shares: logging to both sinks and the retry policy of tasks."""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff

from ingestion.errors import ConfigError, GenerationError, NotFound

__all__ = ["RETRIES", "RETRY_DELAYS", "RunLog", "retryable"]

RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=10)
"""10 s, 20 s, 40 s between attempts (with jitter)."""


class RunLog:
    """Logs a line to the module logger and, inside a run, to Prefect's run logger.

    The module logger reaches ragline's own handlers (and its secret masking);
    the run logger attaches the line to the flow or task run in Prefect's UI.
    """

    def __init__(self, name: str) -> None:
        self.module = logging.getLogger(name)

    def log(self, level: int, msg: str, *args: Any) -> None:
        self.module.log(level, msg, *args)
        try:
            run_logger = get_run_logger()
        except MissingContextError:
            return
        run_logger.log(level, msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        self.log(logging.ERROR, msg, *args)


_PERMANENT = (ConfigError, NotFound, GenerationError)


def retryable(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry a failed task unless its error is one that retrying cannot fix.

    Bad settings, unknown names and a pipeline that no longer matches the
    live generation need a person; an unreachable source or database may
    come back.
    """
    error = getattr(state, "data", None)
    return not isinstance(error, _PERMANENT)
