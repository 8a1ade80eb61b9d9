"""Pushing change events over HTTP: ``POST /ingest/{source}``.

The body is one change event, the same JSON a producer would append to the
stream itself::

    {"op": "upsert", "key": "tickets/4711", "content": "...", "title": "..."}
    {"op": "delete", "key": "tickets/4711"}

The route appends the event to the durable stream of the streaming source and
answers ``202 Accepted`` with the message id once the stream has stored it,
so an accepted push survives a restart of the service or the consumer. The
consumer makes it queryable within seconds.

The caller needs the ``ingest`` right for the source in the policy (or no
policy at all, when the service runs open). While the source's backlog is
over its ``max_backlog`` the route answers 503 with ``Retry-After``: the
embedder is behind, and producers should slow down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request

from ingestion.errors import NotFound
from ingestion.streaming.events import EventPayload

from .gateway.core import Gateway

__all__ = ["ingest_router"]

PushEvent = Callable[[str, Mapping[str, Any]], str]


def ingest_router(
    gateway: Gateway, push: PushEvent, streams: Callable[[], Mapping[str, str]]
) -> APIRouter:
    """The push route; ``streams()`` maps each streaming source to its collection."""
    router = APIRouter(tags=["ingest"])

    @router.post("/ingest/{source}", status_code=202)
    async def push_event(
        source: str, event: EventPayload, request: Request
    ) -> dict[str, Any]:
        """Append one change event to a streaming source; 202 once it is stored."""
        identity = await gateway.identify(request.headers)
        gateway.check_ingest(identity, source)
        collection = streams().get(source)
        if collection is None:
            names = ", ".join(sorted(streams())) or "none"
            raise NotFound(
                f"No streaming source named {source!r}; the streaming sources "
                f"are: {names}."
            )
        gateway.caller(identity, collection)
        body = event.model_dump(mode="json", exclude_none=True)
        await gateway.guard(identity, f"/ingest/{source}", body)
        message_id = await asyncio.to_thread(push, source, body)
        return {
            "accepted": True,
            "source": source,
            "collection": collection,
            "message_id": message_id,
        }

    return router
