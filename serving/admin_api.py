"""Admin routes: API keys, the audit log and the state of the model targets.

Every route needs a caller with admin rights in the policy (``admin: true``
on its team or one of its roles); without a policy nobody has them, so these
routes answer 403 until one is configured.

* ``POST /admin/keys``: create a key; the response holds it, the one time it
  is ever shown.
* ``GET /admin/keys``: list keys (never their secrets); ``team`` and
  ``include_revoked`` filter.
* ``DELETE /admin/keys/{key_id}``: revoke a key.
* ``GET /admin/audit``: audit records, newest first, filtered like
  ``ragline audit``.
* ``GET /admin/targets``: each model target's breaker state and latency.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ingestion.errors import NotFound

from .gateway.core import Gateway
from .gateway.identity import Identity

__all__ = ["CreateKeyRequest", "admin_router"]


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(description="Who holds the key.")
    team: str = Field(description="The team the key acts for.")
    roles: list[str] = Field(default_factory=list)
    labels: list[str] = Field(
        default_factory=list, description="Document access labels of the key itself."
    )
    expires_at: datetime | None = Field(
        default=None, description="When the key stops working (ISO 8601)."
    )
    description: str = ""


def admin_router(gateway: Gateway) -> APIRouter:
    """The ``/admin`` routes over the gateway."""
    router = APIRouter(prefix="/admin", tags=["admin"])

    async def admin(request: Request) -> Identity:
        identity = await gateway.identify(request.headers)
        gateway.check_admin(identity)
        return identity

    def keys() -> Any:
        if gateway.key_store is None:
            raise NotFound(
                "API keys are off: the settings have no gateway.identity.api_keys "
                "section. Add one to manage keys here."
            )
        return gateway.key_store

    @router.post("/keys", status_code=201)
    async def create_key(body: CreateKeyRequest, request: Request) -> dict[str, Any]:
        """Create an API key; the response is the only time the key is shown."""
        await admin(request)
        store = keys()
        gateway.policy.check_grant(body.team, body.roles)
        record, plaintext = await asyncio.to_thread(
            store.create,
            body.user,
            body.team,
            body.roles,
            body.labels,
            body.expires_at,
            body.description,
        )
        return {"key": plaintext, **_key(record)}

    @router.get("/keys")
    async def list_keys(
        request: Request, team: str | None = None, include_revoked: bool = False
    ) -> dict[str, Any]:
        """The API keys, oldest first; secrets are never listed."""
        await admin(request)
        records = await asyncio.to_thread(keys().list, team, include_revoked)
        return {"keys": [_key(r) for r in records]}

    @router.delete("/keys/{key_id}")
    async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
        """Revoke a key: it stops working at once here, within seconds elsewhere."""
        await admin(request)
        record = await asyncio.to_thread(keys().revoke, key_id)
        return _key(record)

    @router.get("/audit")
    async def audit(
        request: Request,
        since: datetime | None = None,
        until: datetime | None = None,
        user: str | None = None,
        team: str | None = None,
        key_id: str | None = None,
        route: str | None = None,
        status: int | None = None,
        limit: int = 100,
    ) -> dict[str, Any]:
        """Audit records matching every filter given, newest first."""
        await admin(request)
        if gateway.audit is None:
            raise NotFound("The audit log is off (gateway.audit.enabled: false).")
        await gateway.audit.flush()
        entries = await gateway.audit.aquery(
            since=since,
            until=until,
            user=user,
            team=team,
            key_id=key_id,
            route=route,
            status=status,
            limit=max(1, min(limit, 1000)),
        )
        return {"records": [e.to_dict() for e in entries]}

    @router.get("/targets")
    async def targets(request: Request) -> dict[str, Any]:
        """Each model target's breaker state, moving latency and load."""
        await admin(request)
        return {"targets": [asdict(s) for s in gateway.router.status()]}

    return router


def _key(record: Any) -> dict[str, Any]:
    return {
        "id": record.key_id,
        "hint": record.hint,
        "user": record.user,
        "team": record.team,
        "roles": list(record.roles),
        "labels": list(record.labels),
        "description": record.description,
        "created_at": _iso(record.created_at),
        "expires_at": _iso(record.expires_at),
        "revoked_at": _iso(record.revoked_at),
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
