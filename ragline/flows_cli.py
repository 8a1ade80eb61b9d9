"""``ragline flows``: run ragline's Prefect flows on their schedules.

Two ways to run them:

* ``ragline flows serve`` runs every deployment in this one process (each
  flow run in a child process), against the Prefect API named by
  ``PREFECT_API_URL`` or, without one, Prefect's temporary local server.
* ``ragline flows deploy`` registers the deployments with a Prefect server
  for a *process* work pool; a ``prefect worker`` of that pool runs them.

Deployments are named ``<flow>/<what>``: ``ingest-source/<source>`` (on the
source's ``schedule``), ``ingest-all/all``, ``reindex-collection/<collection>``
(on ``flows.reindex.schedule``), ``check-freshness/all`` (on
``flows.freshness.schedule``) and ``stream-ingest/<source>`` for streams.
Each points at ``ragline/deployments.py``, loaded from the folder that holds
the ``ragline`` package, so no image or code upload is needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from ingestion.config import Schedule
from ingestion.embedding import set_offline_environment
from ingestion.errors import ConfigError

from .settings import Settings, load_settings

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Schedule as PrefectSchedule

__all__ = ["DeploymentSpec", "app", "deployment_specs", "runner_deployments"]

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="Run the ingestion, reindex and freshness flows with Prefect.",
    no_args_is_help=True,
)
out = Console()

CODE_ROOT = Path(__file__).resolve().parent.parent
"""The folder that holds the ``ragline`` package: the deployments' working directory."""

ENTRYPOINT_FILE = "ragline/deployments.py"


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment to create: which flow, its name, schedule and parameters."""

    flow: str
    """Attribute name of the flow in ``ragline/deployments.py``."""
    name: str
    schedule: Schedule | None
    parameters: dict[str, Any]
    description: str

    @property
    def entrypoint(self) -> str:
        return f"{ENTRYPOINT_FILE}:{self.flow}"


def deployment_specs(settings: Settings, config_path: Path) -> list[DeploymentSpec]:
    """Every deployment the settings call for, with absolute config paths."""
    config = str(config_path.resolve())
    specs = []
    for source in settings.sources:
        if source.streaming:
            specs.append(
                DeploymentSpec(
                    "stream_ingest",
                    source.name,
                    None,
                    {"source": source.name, "config": config},
                    f"Consume the stream {source.name} until cancelled.",
                )
            )
            continue
        specs.append(
            DeploymentSpec(
                "ingest_source",
                source.name,
                source.schedule,
                {"source": source.name, "config": config},
                f"Sync the source {source.name} into {source.collection}.",
            )
        )
    specs.append(
        DeploymentSpec(
            "ingest_all", "all", None, {"config": config}, "Sync every batch source."
        )
    )
    for collection in settings.collections:
        specs.append(
            DeploymentSpec(
                "reindex_collection",
                collection.name,
                settings.flows.reindex.schedule,
                {"collection": collection.name, "config": config},
                f"Rebuild {collection.name} when its pipeline changed; promote what "
                "the gate passes.",
            )
        )
    specs.append(
        DeploymentSpec(
            "check_freshness",
            "all",
            settings.flows.freshness.schedule,
            {"config": config},
            "Alert on sources past their max_staleness.",
        )
    )
    return specs


def runner_deployments(
    specs: list[DeploymentSpec], code_root: Path = CODE_ROOT
) -> list[RunnerDeployment]:
    """Prefect deployments of the specs, each loading its flow from ``code_root``."""
    from prefect import flow as prefect_flow
    from prefect.client.schemas.objects import (
        ConcurrencyLimitConfig,
        ConcurrencyLimitStrategy,
    )

    flows: dict[str, Any] = {}
    deployments = []
    for spec in specs:
        if spec.flow not in flows:
            flows[spec.flow] = prefect_flow.from_source(
                source=str(code_root), entrypoint=spec.entrypoint
            )
        deployments.append(
            flows[spec.flow].to_deployment(
                name=spec.name,
                schedules=[_prefect_schedule(spec.schedule)] if spec.schedule else None,
                parameters=spec.parameters,
                description=spec.description,
                tags=["ragline"],
                # A run still going when the next is due: skip the new one
                # rather than doing the same work twice at once.
                concurrency_limit=ConcurrencyLimitConfig(
                    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
                ),
            )
        )
    return deployments


def _prefect_schedule(schedule: Schedule) -> PrefectSchedule:
    from prefect.schedules import Cron, Interval

    if schedule.interval is not None:
        return Interval(schedule.interval, timezone=schedule.timezone)
    assert schedule.cron is not None  # guaranteed by Schedule's validator
    return Cron(schedule.cron, timezone=schedule.timezone)


def _settings(ctx: typer.Context) -> tuple[Settings, Path]:
    root = ctx.find_root()
    config = Path(root.params.get("config") or "ragline.yaml")
    return load_settings(config), config.resolve()


@app.command("deploy")
def deploy(
    ctx: typer.Context,
    work_pool: Annotated[
        str,
        typer.Option(
            "--work-pool",
            "-p",
            help="A process work pool; create it with "
            "`prefect work-pool create NAME --type process`.",
        ),
    ] = "ragline",
) -> None:
    """Create or update the deployments on the Prefect server of PREFECT_API_URL."""
    set_offline_environment()
    from prefect.deployments.runner import deploy as prefect_deploy

    from flows.ingest import ensure_sync_limit

    settings, config_path = _settings(ctx)
    specs = deployment_specs(settings, config_path)
    deployments = runner_deployments(specs)
    try:
        prefect_deploy(
            *deployments,
            work_pool_name=work_pool,
            build=False,
            push=False,
            print_next_steps_message=False,
            ignore_warnings=True,
        )
    except ValueError as err:
        raise ConfigError(
            f"Cannot deploy to the work pool {work_pool!r}: {err}"
        ) from err
    ensure_sync_limit(settings.flows.sync_concurrency)
    for spec in specs:
        when = _describe(spec.schedule)
        out.print(f"{spec.flow.replace('_', '-')}/{spec.name}  {when}", highlight=False)
    out.print(
        f"{len(specs)} deployment(s) on work pool {work_pool}; start a worker with "
        f"`prefect worker start --pool {work_pool}`.",
        highlight=False,
    )


@app.command("serve")
def serve(ctx: typer.Context) -> None:
    """Run every deployment on its schedule in this process until interrupted."""
    set_offline_environment()
    from prefect import serve as prefect_serve

    from flows.ingest import ensure_sync_limit

    settings, config_path = _settings(ctx)
    specs = deployment_specs(settings, config_path)
    deployments = runner_deployments(specs)
    ensure_sync_limit(settings.flows.sync_concurrency)
    prefect_serve(*deployments, print_starting_message=True)


def _describe(schedule: Schedule | None) -> str:
    if schedule is None:
        return "(run on demand)"
    if schedule.interval is not None:
        return f"every {schedule.interval}"
    return f"cron '{schedule.cron}' {schedule.timezone}"
