"""The governed core: every request passes the same checks, every model call the same door.

:class:`Gateway` holds the parts (identity, policy, router, budgets, rate
limits, loop guard, audit log) and runs them in one order for every governed
route, ``/ask``, ``/search``, ``/v1/*`` and the admin routes alike:

1. **Identify** the caller from its credentials (401 when they are missing
   or bad).
2. **Decide** with the policy whether its team and roles may use the
   collection, the virtual model, or admin operations (403).
3. **Guard**: the loop guard refuses the same request sent again and again,
   and the rate limiter requests over the per-minute limits (429).
4. **Call the model** through :class:`GovernedProvider`: it reserves the
   worst case of the call in every budget that applies (429 when one is
   spent), routes the request, then settles the real usage, so concurrent
   requests never spend past a hard limit.
5. **Record**: the service's request middleware opens a
   :class:`RequestRecord` (:meth:`Gateway.open_record`) before the route
   runs, and :meth:`Gateway.close_record` writes one audit record from it
   once the response has been sent, a stream included.

The record of the request in flight lives in a context variable, so the
steps need not pass it along: the model call deep inside ``/ask`` adds its
attempts, tokens and cost to the same record the route started.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ingestion.errors import RaglineError

from ..auth import Authenticator as StaticKeys
from ..service import Caller
from .audit import AuditEntry, AuditLog
from .budgets import Budgets, Reservation, Subjects
from .identity import ANONYMOUS, Authenticator, Identity
from .loopguard import LoopGuard
from .policy import Decision, Policy, PolicyDenied
from .providers import (
    Attempt,
    GenerationRequest,
    GenerationResult,
    StreamEvent,
    TokenDelta,
    Usage,
)
from .ratelimit import RateLimiter
from .routing import Router

__all__ = [
    "GOVERNED_PREFIXES",
    "Gateway",
    "GovernedProvider",
    "RequestRecord",
    "current_record",
]

logger = logging.getLogger(__name__)

# Tokens each message adds for the chat template's markers, in estimates.
_MESSAGE_OVERHEAD = 4
# Completion tokens reserved when a request sets no max_tokens.
_DEFAULT_COMPLETION = 256

GOVERNED_PREFIXES = ("/ask", "/search", "/v1/", "/admin/", "/ingest/", "/eval/")
"""Paths whose requests are governed, and audited."""


@dataclass
class RequestRecord:
    """What one request did so far; the audit record is made from it at the end."""

    request_id: str
    route: str
    started: float = field(default_factory=time.perf_counter)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    identity: Identity | None = None
    model: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False
    cited_chunk_ids: list[str] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def entry(self, status: int) -> AuditEntry:
        identity = self.identity
        latency = dict(self.stages)
        latency["total_ms"] = round(1000 * (time.perf_counter() - self.started), 3)
        return AuditEntry(
            request_id=self.request_id,
            route=self.route,
            time=self.time,
            user=identity.user if identity else None,
            team=identity.team if identity else None,
            key_id=identity.key_id if identity else None,
            model=self.model,
            attempts=tuple(self.attempts),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost=self.cost,
            latency_ms=latency,
            cache_hit=self.cache_hit,
            cited_chunk_ids=tuple(self.cited_chunk_ids),
            policy=tuple(self.decisions),
            status=status,
            error=self.error,
        )


_record: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "ragline_request_record", default=None
)


def current_record() -> RequestRecord | None:
    """The record of the request being served, if it is a governed one."""
    return _record.get()


class Gateway:
    """Identity, policy, limits, budgets and audit around one router.

    ``static_keys`` serves the older ``serve.auth`` keys when no ``identity``
    is configured: each key becomes an identity of team ``static``, and its
    own collection list and labels stand in for a policy.
    """

    def __init__(
        self,
        *,
        authenticator: Authenticator,
        policy: Policy,
        router: Router,
        budgets: Budgets | None,
        limiter: RateLimiter | None,
        loop_guard: LoopGuard | None,
        audit: AuditLog | None,
        ask_model: str | None = None,
        static_keys: StaticKeys | None = None,
        key_store: Any = None,
    ) -> None:
        self.authenticator = authenticator
        self.policy = policy
        self.router = router
        self.budgets = budgets
        self.limiter = limiter
        self.loop_guard = loop_guard
        self.audit = audit
        self.ask_model = ask_model or router.default_model
        self.key_store = key_store
        self._static = static_keys
        # The static key holders seen, by name (one entry per configured key).
        self._static_callers: dict[str, Caller] = {}
        self.provider = GovernedProvider(router, budgets, limiter)

    @property
    def is_open(self) -> bool:
        """Whether every caller is anonymous (no identity, no static keys)."""
        return self.authenticator.is_open and (
            self._static is None or self._static.is_open
        )

    async def start(self) -> None:
        """Starts the router's background health checks, if configured."""
        await self.router.start()

    async def close(self) -> None:
        for part in (self.budgets, self.limiter, self.loop_guard):
            if part is not None:
                await part.close()
        if self.audit is not None:
            await self.audit.close()
        await self.router.close()

    # -- the steps ------------------------------------------------------------

    async def identify(self, headers: Mapping[str, str]) -> Identity:
        """Who is calling; raises ``Unauthenticated`` (401)."""
        if self.authenticator.is_open and self._static is not None:
            caller = self._static.caller(headers)
            self._static_callers[caller.user] = caller
            identity = Identity(
                user=caller.user,
                team="static",
                key_id=None if caller.user == "anonymous" else f"static:{caller.user}",
                method="anonymous" if caller.user == "anonymous" else "api_key",
                labels=frozenset(caller.scope.labels),
            )
        else:
            identity = await self.authenticator.authenticate_async(headers)
        record = _record.get()
        if record is not None:
            record.identity = identity
        return identity

    def caller(self, identity: Identity, collection: str) -> Caller:
        """The caller ``/ask`` and ``/search`` serve, once the collection is allowed."""
        if self._static is not None and self.authenticator.is_open:
            caller = self._static_callers[identity.user]
            if not caller.may_use(collection):
                decision = Decision(
                    check="collection",
                    target=collection,
                    allowed=False,
                    reason="the static key does not list it",
                    user=identity.user,
                    team=identity.team,
                    key_id=identity.key_id,
                )
                self._note(decision)
                raise PolicyDenied(
                    f"The key of {identity.user!r} may not use the collection "
                    f"{collection!r}; ask for a key that lists it.",
                    decision,
                )
            return caller
        self.check(lambda: self.policy.check_collection(identity, collection))
        return self.check(lambda: self.policy.caller(identity))

    def check_model(self, identity: Identity, model: str) -> None:
        record = _record.get()
        if record is not None:
            record.model = record.model or model
        self.check(lambda: self.policy.check_model(identity, model))

    def check_admin(self, identity: Identity) -> None:
        self.check(lambda: self.policy.check_admin(identity))

    def check_ingest(self, identity: Identity, source: str) -> None:
        self.check(lambda: self.policy.check_ingest(identity, source))

    def check(self, step: Any) -> Any:
        """Run a policy check, noting its decision in the record either way."""
        try:
            outcome = step()
        except PolicyDenied as denied:
            self._note(denied.decision)
            raise
        if isinstance(outcome, Decision):
            self._note(outcome)
        return outcome

    async def guard(self, identity: Identity, route: str, body: Any) -> None:
        """The loop guard and the request rate limits; raises ``Throttled`` (429)."""
        if self.loop_guard is not None:
            who = identity.key_id or f"user:{identity.user}"
            await self.loop_guard.check(who, route, body)
        if self.limiter is not None:
            await self.limiter.acquire(_subjects(identity))

    # -- recording ------------------------------------------------------------

    def governs(self, path: str) -> bool:
        """Whether requests to ``path`` are governed, and so audited."""
        return path.startswith(GOVERNED_PREFIXES)

    def open_record(
        self, request_id: str, route: str
    ) -> tuple[RequestRecord, contextvars.Token[RequestRecord | None]]:
        """Starts the record of a request and makes it the current one.

        Hand the token back to :meth:`close_record` when the response has been
        sent in full (a stream's last event included).
        """
        record = RequestRecord(request_id=request_id, route=route)
        return record, _record.set(record)

    async def close_record(
        self,
        record: RequestRecord,
        token: contextvars.Token[RequestRecord | None],
        status: int,
    ) -> None:
        """Ends the current record and audits it with the status the client got.

        A record the audit log refuses is logged as lost, never raised: the
        client already has its answer.
        """
        _record.reset(token)
        try:
            await self.write(record, status)
        except RaglineError:
            logger.error(
                "audit record lost: request_id=%s", record.request_id, exc_info=True
            )

    def _note(self, decision: Decision) -> None:
        record = _record.get()
        if record is not None:
            record.decisions.append(decision.to_json())

    async def write(self, record: RequestRecord, status: int) -> None:
        if self.audit is not None:
            await self.audit.record(record.entry(status))


def _subjects(identity: Identity) -> Subjects:
    team = None if identity.method == "anonymous" else identity.team
    return Subjects(key_id=identity.key_id, team=team)


class GovernedProvider:
    """The router behind budgets: reserve the worst case, call, settle the real use.

    The caller is the identity of the request in flight (see
    :func:`current_record`); outside a governed request the call is charged
    to nobody. Tokens and cost are added to the request's record, with the
    targets the router tried.
    """

    def __init__(
        self,
        router: Router,
        budgets: Budgets | None,
        limiter: RateLimiter | None,
    ) -> None:
        self._router = router
        self._budgets = budgets
        self._limiter = limiter

    @property
    def name(self) -> str:
        return self._router.name

    @property
    def context_window(self) -> int:
        return self._router.context_window

    @property
    def loaded(self) -> bool:
        return bool(getattr(self._router, "loaded", True))

    def count_tokens(self, text: str) -> int:
        return self._router.count_tokens(text)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        record, reservation = await self._reserve(request)
        try:
            result = await self._router.generate(request)
        except BaseException as err:
            await self._failed(record, reservation, err)
            raise
        await self._settle(record, reservation, result)
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        record, reservation = await self._reserve(request)
        written = 0
        try:
            async for event in self._router.stream(request):
                if isinstance(event, TokenDelta):
                    written += 1
                    yield event
                else:
                    await self._settle(record, reservation, event)
                    reservation = None
                    yield event
        except BaseException as err:
            await self._failed(record, reservation, err, written)
            raise
        finally:
            if reservation is not None and not reservation.done:
                # Left early: charge what was written, estimated from the deltas.
                await self._charge_partial(record, reservation, request, written)

    async def close(self) -> None:
        await self._router.close()

    # -- budgets --------------------------------------------------------------

    async def _reserve(
        self, request: GenerationRequest
    ) -> tuple[RequestRecord | None, Reservation | None]:
        record = _record.get()
        model = request.model or self._router.default_model
        if record is not None:
            record.model = record.model or model
        if self._budgets is None or not self._budgets.config.enabled:
            return record, None
        identity = record.identity if record and record.identity else ANONYMOUS
        subjects = _subjects(identity)
        if not self._budgets.budgets_for(subjects):
            return record, None
        prompt = self._estimate(request)
        reservation = await self._budgets.reserve(
            subjects, model, prompt, request.max_tokens or _DEFAULT_COMPLETION
        )
        return record, reservation

    def estimate_prompt_tokens(self, request: GenerationRequest) -> int:
        """The prompt tokens a budget reservation assumes for ``request``."""
        return self._estimate(request)

    def _estimate(self, request: GenerationRequest) -> int:
        return sum(
            self._router.count_tokens(m.content) + _MESSAGE_OVERHEAD
            for m in request.messages
        )

    async def _settle(
        self,
        record: RequestRecord | None,
        reservation: Reservation | None,
        result: GenerationResult,
    ) -> None:
        if record is not None:
            record.attempts.extend(result.attempts)
            record.prompt_tokens += result.usage.prompt_tokens
            record.completion_tokens += result.usage.completion_tokens
        if self._budgets is not None:
            cost = self._budgets.cost(
                record.model if record and record.model else self._router.default_model,
                result.usage.prompt_tokens,
                result.usage.completion_tokens,
            )
            if record is not None:
                record.cost += cost
            if reservation is not None:
                await self._budgets.settle(reservation, result.usage)
        if self._limiter is not None and record is not None and record.identity:
            await self._limiter.add_tokens(
                _subjects(record.identity), result.usage.total_tokens
            )

    async def _failed(
        self,
        record: RequestRecord | None,
        reservation: Reservation | None,
        err: BaseException,
        written: int = 0,
    ) -> None:
        if record is not None:
            record.attempts.extend(getattr(err, "attempts", ()) or ())
            if isinstance(err, RaglineError):
                record.error = str(err)
        if reservation is not None and self._budgets is not None and not written:
            await self._budgets.release(reservation)

    async def _charge_partial(
        self,
        record: RequestRecord | None,
        reservation: Reservation,
        request: GenerationRequest,
        written: int,
    ) -> None:
        if self._budgets is None:
            return
        if not written:
            await self._budgets.release(reservation)
            return
        usage = Usage(self._estimate(request), written)
        await self._budgets.settle(reservation, usage)
        if record is not None:
            record.prompt_tokens += usage.prompt_tokens
            record.completion_tokens += usage.completion_tokens
