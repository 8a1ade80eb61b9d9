"""Virtual models: one name served by several real targets, surviving their failures.

A :class:`Router` is itself a :class:`~serving.gateway.providers.Provider`.
``request.model`` names a *virtual model* (``chat``, ``smollm2``; unset
means the default one), and the router serves it by choosing among the
model's *targets*, the real providers that the composition root built and
handed over by name. What holds:

**Choosing.** The model's ``policy`` puts its targets in an order, and the
router tries them in that order until one answers:

- ``priority``: lowest ``priority`` first (ties keep the listed order).
- ``weighted``: the first target is drawn at random in proportion to
  ``weight`` (a canary takes its share of traffic); the rest follow in
  priority order, as fallbacks.
- ``least_latency``: the lowest moving average of recent latencies first
  (an exponentially weighted average of successful calls: the whole
  generation, or the time to the first event of a stream); targets with no
  successful call yet come before all others. A target keeps its average
  while it serves nothing, until fallback traffic refreshes it.
- ``sticky``: rendezvous hashing of ``metadata["user"]`` (weighted by
  ``weight``) gives every user an order of their own, stable across processes,
  so the same user lands on the same target while it is healthy and on the
  same fallback when it is not. A request without a user is placed as
  ``weighted`` places it.

**Skipping.** A target whose circuit breaker (:mod:`.breaker`, one per
target, shared by every virtual model that uses it) is open is skipped without
a call (``breaker_open``). A target whose ``max_concurrency`` slots are all
busy is passed over (``saturated``) rather than queued; only when no other
target has answered does the router wait, within the time budget, for a slot
on the first saturated target it passed.

**Fitting.** A prompt that does not fit a target's ``context_window`` with
room for the answer (``max_tokens``, or the model's ``answer_tokens`` when the
request sets none) is measured with that target's ``count_tokens``, each
message counting :data:`MESSAGE_OVERHEAD_TOKENS` more for the chat template's
markers. Too long, it is built again with ``request.repack`` when the request
has one, or else the oldest turns other than system messages and the last
message are dropped until it fits. A prompt that still does not fit skips the
target (``prompt_too_long``); when no target can take it the request fails
with :class:`~ingestion.errors.RequestError`. A prompt that would fit even
at one token per byte is not counted at all. The target gets the request with
``model`` unset, since it serves the model it was configured with.

**Failing over.** A retryable failure (``UpstreamError.retryable``: time-outs,
connection errors, 408, 409, 429, 5xx; also any other ``ProviderError`` or
``OSError`` a target raises, and the router's own time-outs) counts against
the target's breaker and is retried on the same target up to ``retries``
times, after an exponential backoff with full jitter that is never shorter
than the upstream's ``retry_after``; when that wait would not fit in the time
left, the router moves on to the next target instead. A non-retryable
``UpstreamError`` (another 4xx) or a ``RequestError`` is raised at once: it
would fail the same way anywhere. When every target is open, saturated,
failing or the time budget is spent,
:class:`~ingestion.errors.ProviderUnavailable` is raised, with ``retry_after``
the seconds until the earliest open breaker lets trial calls through (else the
shortest wait an upstream asked for, else ``None``).

**Streaming.** A stream fails over only until its first event has been
received; the router yields nothing before that. A failure after the first
token reached the caller cannot be repaired elsewhere (the caller already
holds part of an answer), so it is raised to the caller as an
:class:`~ingestion.errors.UpstreamError` and counts against the target. The
time budget ``timeout`` covers the whole stream.

**Recording.** Every :class:`~serving.gateway.providers.GenerationResult`
carries ``attempts``, one :class:`~serving.gateway.providers.Attempt` per
target tried or skipped, in order, the last being the one that answered.
Outcomes are those of ``Attempt`` plus ``saturated`` and ``prompt_too_long``.
Errors raised while serving a request (the router's own and those of targets
passed on) carry the same list in an ``attempts`` attribute.

**Cancelling.** Cancelling the caller's task (or leaving a stream early)
stops the call in flight; it is recorded as ``cancelled`` and is not held
against the target.

**Health checks.** With ``health_check`` set, :meth:`Router.start` runs a
background task that calls each target's ``async def health() -> bool`` every
``interval`` seconds and reports the outcome to its breaker, like any call: a
failed probe counts as a failure, and after an open breaker's cooldown a probe
may be the trial call that closes it. Targets without ``health`` (llama.cpp
in process) are skipped, and fed by real traffic alone, unless
``probe_with_generation`` is set, in which case a one-token generation is the
probe. :meth:`Router.close` stops the task and closes every target: the
router owns the providers it was given.

**Cost.** Per request the router does pure-Python bookkeeping: a dictionary
look-up, a sort of a few targets, a breaker check and a semaphore. It holds no
lock across an await except a target's concurrency slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from pydantic import Field, model_validator

from ingestion.config import NAME_PATTERN, StrictModel
from ingestion.errors import (
    ConfigError,
    NotFound,
    ProviderError,
    ProviderUnavailable,
    RequestError,
    UpstreamError,
)

from .breaker import BreakerConfig, BreakerListener, BreakerState, CircuitBreaker
from .providers import (
    Attempt,
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    Provider,
    StreamEvent,
)

__all__ = [
    "MESSAGE_OVERHEAD_TOKENS",
    "HealthCheckConfig",
    "Policy",
    "Router",
    "RouterConfig",
    "TargetConfig",
    "TargetStatus",
    "UnknownModel",
    "VirtualModelConfig",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

Policy = Literal["priority", "weighted", "least_latency", "sticky"]

MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens counted per message beyond its content: the chat template's markers."""

_STICKY_KEY = "user"
_HASH_SPAN = float(2**64)


class TargetConfig(StrictModel):
    """One real provider behind a virtual model."""

    target: str = Field(
        description="Name of the provider target, as the composition root names it."
    )
    priority: int = Field(
        default=0,
        description="Order of trial under the priority policy, and of fallback under "
        "the others: lower first; ties keep the listed order.",
    )
    weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Share of first choices under the weighted and sticky policies; "
        "0 makes the target a fallback only.",
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Calls in flight at once on this target; unset is no limit. "
        "Every virtual model that uses the target must give the same value.",
    )


class VirtualModelConfig(StrictModel):
    """A model name callers use, served by one or more targets."""

    name: str = Field(pattern=NAME_PATTERN, description="The name callers ask for.")
    policy: Policy = Field(
        default="priority",
        description="How targets are ordered: priority, weighted, least_latency or "
        "sticky (by metadata['user']).",
    )
    targets: tuple[TargetConfig, ...] = Field(
        min_length=1, description="The real providers that serve this model."
    )
    retries: int = Field(
        default=1,
        ge=0,
        le=10,
        description="Extra tries on the same target after a retryable failure, "
        "before falling back to the next one.",
    )
    backoff_base: float = Field(
        default=0.1,
        gt=0.0,
        description="Seconds; the n-th retry waits a random time up to "
        "backoff_base * 2**n (full jitter), capped by backoff_max.",
    )
    backoff_max: float = Field(
        default=2.0, gt=0.0, description="Seconds; the longest backoff before a retry."
    )
    timeout: float = Field(
        default=60.0,
        gt=0.0,
        description="Seconds for the whole request, every try and wait included "
        "(for a stream, until its last event).",
    )
    attempt_timeout: float | None = Field(
        default=None,
        gt=0.0,
        description="Seconds for one try, so that a hung target leaves time for the "
        "next; unset lets one try use all the time left.",
    )
    answer_tokens: int = Field(
        default=256,
        ge=1,
        description="Tokens kept free for the answer when fitting a prompt into a "
        "context window, for requests that set no max_tokens.",
    )

    @model_validator(mode="after")
    def _targets_are_distinct_and_can_be_chosen(self) -> VirtualModelConfig:
        names = [t.target for t in self.targets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(
                f"Virtual model {self.name!r} lists the target(s) "
                f"{', '.join(repeated)} more than once; list each target once."
            )
        if self.policy in ("weighted", "sticky") and not any(
            t.weight > 0 for t in self.targets
        ):
            raise ConfigError(
                f"Virtual model {self.name!r} uses the {self.policy} policy but "
                "every target has weight 0; give at least one target a weight."
            )
        return self


class HealthCheckConfig(StrictModel):
    """Background probes of the targets, whose outcomes feed the breakers."""

    interval: float = Field(default=10.0, gt=0.0, description="Seconds between probes.")
    timeout: float = Field(
        default=2.0, gt=0.0, description="Seconds a probe may take before it fails."
    )
    probe_with_generation: bool = Field(
        default=False,
        description="Probe targets that have no health check of their own with a "
        "one-token generation; off, such targets are not probed.",
    )


class RouterConfig(StrictModel):
    """The virtual models, and how their targets are guarded."""

    models: tuple[VirtualModelConfig, ...] = Field(
        min_length=1, description="The virtual models callers may ask for."
    )
    default_model: str | None = Field(
        default=None,
        description="Virtual model for requests that name none; unset takes the "
        "first one listed.",
    )
    breaker: BreakerConfig = Field(
        default_factory=BreakerConfig,
        description="Circuit breaker settings, applied to each target.",
    )
    health_check: HealthCheckConfig | None = Field(
        default=None, description="Background health probes; unset runs none."
    )
    latency_smoothing: float = Field(
        default=0.2,
        gt=0.0,
        le=1.0,
        description="Weight of the newest latency in each target's moving average "
        "(least_latency policy); higher reacts faster.",
    )

    @model_validator(mode="after")
    def _names_are_unique_and_known(self) -> RouterConfig:
        names = [m.name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(
                f"The virtual model name(s) {', '.join(repeated)} appear more than "
                "once; give each virtual model its own name."
            )
        if self.default_model is not None and self.default_model not in names:
            raise ConfigError(
                f"default_model {self.default_model!r} is not a virtual model; "
                f"choose one of: {', '.join(names)}."
            )
        return self


class UnknownModel(RequestError, NotFound):
    """``request.model`` names no virtual model; ``known`` lists those that exist."""

    def __init__(self, model: str, known: Sequence[str]) -> None:
        super().__init__(
            f"The model {model!r} is not served here; ask for one of: "
            f"{', '.join(known)}."
        )
        self.model = model
        self.known = tuple(known)


@dataclass(frozen=True, slots=True)
class TargetStatus:
    """A target's health as the router sees it, for metrics and admin views.

    ``latency_ms`` is the moving average of successful calls (``None`` before
    the first); ``retry_after`` the seconds until an open breaker lets trial
    calls through (0 unless open).
    """

    name: str
    state: BreakerState
    latency_ms: float | None
    in_flight: int
    max_concurrency: int | None
    failures: int
    calls: int
    retry_after: float


class _Target:
    """A provider with its breaker, concurrency slots and latency average."""

    __slots__ = (
        "breaker",
        "in_flight",
        "latency",
        "limit",
        "name",
        "provider",
        "slots",
    )

    def __init__(
        self,
        name: str,
        provider: Provider,
        breaker: CircuitBreaker,
        limit: int | None,
    ) -> None:
        self.name = name
        self.provider = provider
        self.breaker = breaker
        self.limit = limit
        self.slots = asyncio.Semaphore(limit) if limit is not None else None
        self.latency: float | None = None
        self.in_flight = 0

    def observe(self, seconds: float, smoothing: float) -> None:
        if self.latency is None:
            self.latency = seconds
        else:
            self.latency += smoothing * (seconds - self.latency)


@dataclass(frozen=True, slots=True)
class _Entry:
    """A target as one virtual model uses it."""

    target: _Target
    priority: int
    weight: float


class _VirtualModel:
    __slots__ = ("by_priority", "config", "cumulative", "name")

    def __init__(self, config: VirtualModelConfig, entries: list[_Entry]) -> None:
        self.name = config.name
        self.config = config
        # sorted() is stable, so equal priorities keep the listed order.
        self.by_priority = tuple(sorted(entries, key=lambda e: e.priority))
        self.cumulative = tuple(
            sum(e.weight for e in self.by_priority[: i + 1])
            for i in range(len(self.by_priority))
        )


@dataclass(slots=True)
class _Lease:
    """One admitted call on one target, until it is settled."""

    target: _Target
    ticket: int
    started: float
    first_event: float | None = None
    settled: bool = False


@dataclass(slots=True)
class _Run:
    """What one request has seen so far."""

    model: _VirtualModel
    request: GenerationRequest
    deadline: float
    attempts: list[Attempt]
    too_long: set[str]
    upstream_waits: list[float]
    last_error: BaseException | None = None


class _Saturated:
    """Marks a target passed over because its slots were busy."""


_SATURATED = _Saturated()

Call = Callable[[Provider, GenerationRequest], Awaitable[_T]]


async def _call_generate(
    provider: Provider, request: GenerationRequest
) -> GenerationResult:
    return await provider.generate(request)


async def _open_stream(
    provider: Provider, request: GenerationRequest
) -> tuple[AsyncIterator[StreamEvent], StreamEvent]:
    """Starts a stream and waits for its first event, the end of the failover window."""
    events = provider.stream(request)
    try:
        first = await anext(events)
    except StopAsyncIteration as err:
        raise UpstreamError(
            f"The stream of target {provider.name!r} ended without a result.",
            retryable=True,
        ) from err
    except BaseException:
        await _close_stream(events)
        raise
    return events, first


async def _close_stream(events: AsyncIterator[StreamEvent]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


class Router:
    """Serves virtual models from real targets; see the module docstring.

    Example::

        config = RouterConfig.model_validate({
            "models": [{
                "name": "chat",
                "targets": [{"target": "vllm"}, {"target": "llamacpp", "priority": 1}],
            }],
        })
        async with Router(config, {"vllm": vllm, "llamacpp": llama}) as router:
            result = await router.generate(GenerationRequest(messages, model="chat"))

    ``clock``, ``rng`` and ``sleep`` are there for tests: the clock measures
    latencies, time budgets and breaker cooldowns; ``rng`` draws weighted
    choices and backoff jitter; ``sleep`` waits between retries.
    ``on_breaker_change`` is called with (target, old, new) on every breaker
    transition.
    """

    def __init__(
        self,
        config: RouterConfig,
        targets: Mapping[str, Provider],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        on_breaker_change: BreakerListener | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._smoothing = config.latency_smoothing
        self._targets = self._build_targets(config, targets, on_breaker_change)
        self._models = {
            m.name: _VirtualModel(m, self._entries(m)) for m in config.models
        }
        self._default = self._models[config.default_model or config.models[0].name]
        self._health_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- the Provider protocol -------------------------------------------------

    @property
    def name(self) -> str:
        return "router"

    @property
    def context_window(self) -> int:
        """The largest context window among the targets."""
        return max(t.provider.context_window for t in self._targets.values())

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for the default model's first target in priority order."""
        return self._default.by_priority[0].target.provider.count_tokens(text)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        run = self._new_run(request)
        lease, result = await self._route(run, _call_generate)
        self._succeed(run, lease)
        return replace(result, attempts=tuple(run.attempts))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        run = self._new_run(request)
        lease, (events, event) = await self._route(run, _open_stream)
        try:
            while not isinstance(event, GenerationResult):
                yield event
                event = await self._next_event(run, lease, events)
            self._succeed(run, lease)
            yield replace(event, attempts=tuple(run.attempts))
        finally:
            if not lease.settled:
                self._settle(run, lease, "cancelled", verdict=None)
            await _close_stream(events)

    async def close(self) -> None:
        """Stops the health checks and closes every target; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._stop_health_checks()
        await asyncio.gather(*(t.provider.close() for t in self._targets.values()))

    # -- the router's own surface -----------------------------------------------

    async def start(self) -> None:
        """Starts the background health checks, when configured; idempotent."""
        self._check_open()
        health = self._config.health_check
        if health is None or self._health_task is not None:
            return
        self._health_task = asyncio.create_task(
            self._health_loop(health), name="router-health-checks"
        )

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def models(self) -> tuple[str, ...]:
        """The virtual model names callers may ask for, in configured order."""
        return tuple(self._models)

    @property
    def default_model(self) -> str:
        """The virtual model that serves requests naming none."""
        return self._default.name

    def breaker(self, target: str) -> CircuitBreaker:
        """The circuit breaker of ``target``."""
        try:
            return self._targets[target].breaker
        except KeyError:
            raise NotFound(
                f"The router has no target {target!r}; its targets are: "
                f"{', '.join(self._targets)}."
            ) from None

    def targets(self) -> dict[str, Provider]:
        """The target providers by name, in configured order."""
        return {name: t.provider for name, t in self._targets.items()}

    def status(self) -> tuple[TargetStatus, ...]:
        """Every target's breaker state, moving latency and load."""
        return tuple(_status(t) for t in self._targets.values())

    async def check_health(self) -> dict[str, bool | None]:
        """Probes every target once and feeds its breaker.

        Returns target -> healthy, or ``None`` for a target that was not
        probed (no health check of its own, or an open breaker still cooling
        down). The background task calls this every ``interval`` seconds.
        """
        health = self._config.health_check or HealthCheckConfig()
        targets = list(self._targets.values())
        outcomes = await asyncio.gather(*(self._probe(t, health) for t in targets))
        return {t.name: ok for t, ok in zip(targets, outcomes, strict=True)}

    # -- construction ------------------------------------------------------------

    def _build_targets(
        self,
        config: RouterConfig,
        providers: Mapping[str, Provider],
        listener: BreakerListener | None,
    ) -> dict[str, _Target]:
        limits: dict[str, int | None] = {}
        for model in config.models:
            for entry in model.targets:
                self._check_target(model, entry, providers, limits)
                limits[entry.target] = entry.max_concurrency
        return {
            name: _Target(
                name,
                providers[name],
                CircuitBreaker(
                    name, config.breaker, clock=self._clock, listener=listener
                ),
                limit,
            )
            for name, limit in limits.items()
        }

    @staticmethod
    def _check_target(
        model: VirtualModelConfig,
        entry: TargetConfig,
        providers: Mapping[str, Provider],
        limits: Mapping[str, int | None],
    ) -> None:
        if entry.target not in providers:
            known = ", ".join(providers) or "none"
            raise ConfigError(
                f"Virtual model {model.name!r} names the target {entry.target!r}, "
                f"which is not configured (configured targets: {known}). Fix the "
                "name or configure the target."
            )
        if entry.target in limits and limits[entry.target] != entry.max_concurrency:
            raise ConfigError(
                f"The target {entry.target!r} has max_concurrency "
                f"{limits[entry.target]} in one virtual model and "
                f"{entry.max_concurrency} in {model.name!r}; the limit protects the "
                "target itself, so give it the same value everywhere."
            )

    def _entries(self, model: VirtualModelConfig) -> list[_Entry]:
        return [
            _Entry(self._targets[t.target], t.priority, t.weight) for t in model.targets
        ]

    # -- one request -------------------------------------------------------------

    def _new_run(self, request: GenerationRequest) -> _Run:
        self._check_open()
        model = self._model_for(request)
        return _Run(
            model=model,
            request=request,
            deadline=self._clock() + model.config.timeout,
            attempts=[],
            too_long=set(),
            upstream_waits=[],
        )

    def _model_for(self, request: GenerationRequest) -> _VirtualModel:
        if request.model is None:
            return self._default
        model = self._models.get(request.model)
        if model is None:
            raise UnknownModel(request.model, list(self._models))
        return model

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError("The router is closed; it takes no more requests.")

    async def _route(self, run: _Run, call: Call[_T]) -> tuple[_Lease, _T]:
        """Tries the targets in policy order until one answers."""
        passed_over: list[tuple[_Target, GenerationRequest]] = []
        for entry in self._order(run.model, run.request):
            target = entry.target
            if target.breaker.state is BreakerState.OPEN:
                run.attempts.append(Attempt(target.name, "breaker_open", 0.0))
                continue
            fitted = self._fit(run, entry)
            if fitted is None:
                continue
            answer = await self._try_target(run, target, fitted, call, wait=False)
            if isinstance(answer, tuple):
                return answer
            if isinstance(answer, _Saturated):
                passed_over.append((target, fitted))
        if passed_over:
            target, fitted = passed_over[0]
            answer = await self._try_target(run, target, fitted, call, wait=True)
            if isinstance(answer, tuple):
                return answer
        raise self._exhausted(run) from run.last_error

    async def _try_target(
        self,
        run: _Run,
        target: _Target,
        request: GenerationRequest,
        call: Call[_T],
        *,
        wait: bool,
    ) -> tuple[_Lease, _T] | _Saturated | None:
        """Calls one target, retrying retryable failures; None moves on to the next."""
        config = run.model.config
        for number in range(config.retries + 1):
            remaining = run.deadline - self._clock()
            if remaining <= 0:
                return None
            lease = await self._admit(run, target, wait=wait, remaining=remaining)
            if not isinstance(lease, _Lease):
                return lease
            limit = remaining
            if config.attempt_timeout is not None:
                limit = min(limit, config.attempt_timeout)
            try:
                async with asyncio.timeout(limit):
                    value = await call(target.provider, request)
            except (ProviderError, TimeoutError, OSError) as err:
                if self._fail(run, lease, err):
                    _with_attempts(err, run)
                    raise
                delay = self._backoff(run, number, err)
            except RequestError as err:
                self._settle(run, lease, "error", verdict=None, error=err)
                _with_attempts(err, run)
                raise
            except asyncio.CancelledError:
                self._settle(run, lease, "cancelled", verdict=None)
                raise
            except Exception as err:
                self._settle(run, lease, "error", verdict=None, error=err)
                logger.exception(
                    "target raised an unexpected error: model=%s target=%s",
                    run.model.name,
                    target.name,
                )
                _with_attempts(err, run)
                raise
            else:
                lease.first_event = self._clock()
                return lease, value
            if delay is None or target.breaker.state is BreakerState.OPEN:
                return None
            await self._sleep(delay)
        return None

    async def _admit(
        self, run: _Run, target: _Target, *, wait: bool, remaining: float
    ) -> _Lease | _Saturated | None:
        """Takes a concurrency slot and a breaker ticket for one call."""
        slots = target.slots
        if slots is not None and not slots.locked():
            await slots.acquire()  # a free slot is taken without suspending
        elif slots is not None:
            if not wait:
                run.attempts.append(Attempt(target.name, "saturated", 0.0))
                return _SATURATED
            started = self._clock()
            try:
                async with asyncio.timeout(remaining):
                    await slots.acquire()
            except TimeoutError:
                waited = (self._clock() - started) * 1000.0
                run.attempts.append(Attempt(target.name, "saturated", waited))
                return _SATURATED
        ticket = target.breaker.allow()
        if ticket is None:
            if slots is not None:
                slots.release()
            run.attempts.append(Attempt(target.name, "breaker_open", 0.0))
            return None
        target.in_flight += 1
        return _Lease(target, ticket, self._clock())

    def _fail(self, run: _Run, lease: _Lease, err: BaseException) -> bool:
        """Settles a failed call; True when falling back cannot help."""
        status = err.status if isinstance(err, UpstreamError) else None
        if isinstance(err, UpstreamError) and not err.retryable:
            self._settle(run, lease, "error", verdict=None, status=status, error=err)
            return True
        if isinstance(err, TimeoutError):
            outcome = "timeout"
        elif status == 429:
            outcome = "rate_limited"
        else:
            outcome = "error"
        if isinstance(err, UpstreamError) and err.retry_after is not None:
            run.upstream_waits.append(err.retry_after)
        run.last_error = err
        self._settle(run, lease, outcome, verdict=False, status=status, error=err)
        logger.info(
            "upstream call failed: model=%s target=%s outcome=%s status=%s",
            run.model.name,
            lease.target.name,
            outcome,
            status,
        )
        return False

    def _backoff(self, run: _Run, number: int, err: BaseException) -> float | None:
        """Seconds to wait before retrying the same target, or None to move on."""
        config = run.model.config
        if number >= config.retries:
            return None
        ceiling = min(config.backoff_max, config.backoff_base * 2**number)
        delay = self._rng.uniform(0.0, ceiling)
        if isinstance(err, UpstreamError) and err.retry_after is not None:
            delay = max(delay, err.retry_after)
        if delay >= run.deadline - self._clock():
            return None
        return delay

    def _succeed(self, run: _Run, lease: _Lease) -> None:
        target = lease.target
        first = lease.first_event if lease.first_event is not None else self._clock()
        target.observe(first - lease.started, self._smoothing)
        self._settle(run, lease, "ok", verdict=True)
        logger.debug(
            "upstream call answered: model=%s target=%s latency_ms=%.1f",
            run.model.name,
            target.name,
            run.attempts[-1].latency_ms,
        )

    def _settle(
        self,
        run: _Run,
        lease: _Lease,
        outcome: str,
        *,
        verdict: bool | None,
        status: int | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Records the attempt, tells the breaker, and frees the slot; once only."""
        if lease.settled:
            return
        lease.settled = True
        target = lease.target
        latency_ms = (self._clock() - lease.started) * 1000.0
        message = _describe(error) if error is not None else None
        run.attempts.append(Attempt(target.name, outcome, latency_ms, status, message))
        if verdict is True:
            target.breaker.record_success(lease.ticket)
        elif verdict is False:
            target.breaker.record_failure(lease.ticket)
        else:
            target.breaker.release(lease.ticket)
        target.in_flight -= 1
        if target.slots is not None:
            target.slots.release()

    async def _next_event(
        self, run: _Run, lease: _Lease, events: AsyncIterator[StreamEvent]
    ) -> StreamEvent:
        """The next event of a stream already under way; failures reach the caller."""
        try:
            async with asyncio.timeout(max(0.0, run.deadline - self._clock())):
                return await anext(events)
        except (ProviderError, TimeoutError, OSError, StopAsyncIteration) as err:
            failure = _mid_stream_error(run, lease, err)
            status = failure.status
            outcome = "timeout" if isinstance(err, TimeoutError) else "error"
            self._settle(
                run, lease, outcome, verdict=False, status=status, error=failure
            )
            logger.info(
                "stream failed after its first event: model=%s target=%s outcome=%s",
                run.model.name,
                lease.target.name,
                outcome,
            )
            _with_attempts(failure, run)
            if failure is err:
                raise
            raise failure from err

    def _exhausted(self, run: _Run) -> RequestError | ProviderUnavailable:
        """The error for a request that no target answered."""
        model = run.model
        if run.too_long and len(run.too_long) == len(model.by_priority):
            return _with_attempts(
                RequestError(
                    f"The prompt is too long for every target of the model "
                    f"{model.name!r}, even after dropping older turns; shorten it "
                    "or ask for fewer max_tokens."
                ),
                run,
            )
        retry_after = self._retry_after(run)
        spent = run.deadline - self._clock() <= 0
        why = f"the {model.config.timeout:g} s time budget ran out; " if spent else ""
        advice = (
            f"retry after {retry_after:.1f} s"
            if retry_after is not None
            else "retry later"
        )
        error = ProviderUnavailable(
            f"No target of the model {model.name!r} could answer ({why}tried: "
            f"{_summary(run.attempts)}); {advice}. If this persists, check the "
            "targets' health or add a fallback target to the model.",
            retry_after=retry_after,
        )
        logger.warning(
            "model unavailable: model=%s attempts=%d retry_after=%s",
            model.name,
            len(run.attempts),
            retry_after,
        )
        return _with_attempts(error, run)

    def _retry_after(self, run: _Run) -> float | None:
        waits = [
            e.target.breaker.retry_after()
            for e in run.model.by_priority
            if e.target.breaker.state is BreakerState.OPEN
        ]
        if waits:
            return min(waits)
        return min(run.upstream_waits) if run.upstream_waits else None

    # -- choosing ------------------------------------------------------------------

    def _order(
        self, model: _VirtualModel, request: GenerationRequest
    ) -> Sequence[_Entry]:
        policy = model.config.policy
        if policy == "priority" or len(model.by_priority) == 1:
            return model.by_priority
        if policy == "least_latency":
            return sorted(model.by_priority, key=_latency_key)
        if policy == "sticky":
            user = request.metadata.get(_STICKY_KEY)
            if user is not None:
                return _rendezvous(model.by_priority, str(user))
        return self._weighted(model)

    def _weighted(self, model: _VirtualModel) -> Sequence[_Entry]:
        entries = model.by_priority
        point = self._rng.random() * model.cumulative[-1]
        for index, bound in enumerate(model.cumulative):
            if point < bound:
                return (entries[index], *entries[:index], *entries[index + 1 :])
        return entries

    # -- fitting the context window --------------------------------------------------

    def _fit(self, run: _Run, entry: _Entry) -> GenerationRequest | None:
        """The request as this target gets it, or None when the prompt cannot fit."""
        request = run.request
        provider = entry.target.provider
        answer = request.max_tokens or run.model.config.answer_tokens
        budget = provider.context_window - answer
        messages: Sequence[ChatMessage] = request.messages
        if _upper_bound(messages) > budget:
            messages = self._shrink(request, budget, provider) or ()
        if not messages:
            run.too_long.add(entry.target.name)
            run.attempts.append(
                Attempt(
                    entry.target.name,
                    "prompt_too_long",
                    0.0,
                    error=f"the prompt and {answer} answer tokens exceed the "
                    f"context window of {provider.context_window} tokens",
                )
            )
            return None
        return replace(request, messages=messages, model=None)

    @staticmethod
    def _shrink(
        request: GenerationRequest, budget: int, provider: Provider
    ) -> Sequence[ChatMessage] | None:
        """Messages that fit ``budget`` tokens, or None when none do."""
        count = provider.count_tokens
        sizes = [count(m.content) + MESSAGE_OVERHEAD_TOKENS for m in request.messages]
        if sum(sizes) <= budget:
            return request.messages
        if request.repack is not None:
            overhead = MESSAGE_OVERHEAD_TOKENS * len(request.messages)
            try:
                repacked = tuple(request.repack(budget - overhead, count))
            except RequestError as err:
                logger.debug("repacking failed: target=%s error=%s", provider.name, err)
                return None
            used = sum(count(m.content) + MESSAGE_OVERHEAD_TOKENS for m in repacked)
            return repacked if repacked and used <= budget else None
        return _drop_oldest_turns(request.messages, sizes, budget)

    # -- health checks ----------------------------------------------------------------

    async def _health_loop(self, health: HealthCheckConfig) -> None:
        while True:
            try:
                await self.check_health()
            except Exception:
                logger.exception("health check round failed; the next one follows")
            await asyncio.sleep(health.interval)

    async def _stop_health_checks(self) -> None:
        task, self._health_task = self._health_task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _probe(self, target: _Target, health: HealthCheckConfig) -> bool | None:
        check = _health_check(target.provider, health)
        if check is None:
            return None
        ticket = target.breaker.allow()
        if ticket is None:
            return None
        try:
            async with asyncio.timeout(health.timeout):
                healthy = bool(await check())
        except (ProviderError, TimeoutError, OSError) as err:
            logger.debug("health probe raised: target=%s error=%s", target.name, err)
            healthy = False
        except BaseException:
            target.breaker.release(ticket)  # a trial place must never leak
            raise
        if healthy:
            target.breaker.record_success(ticket)
        else:
            logger.warning("health check failed: target=%s", target.name)
            target.breaker.record_failure(ticket)
        return healthy


# -- helpers ----------------------------------------------------------------------------


def _health_check(
    provider: Provider, health: HealthCheckConfig
) -> Callable[[], Awaitable[bool]] | None:
    """The target's own health check, a one-token generation, or None."""
    check = getattr(provider, "health", None)
    if check is not None:
        return check
    if not health.probe_with_generation:
        return None

    async def generate_one_token() -> bool:
        await provider.generate(
            GenerationRequest([ChatMessage("user", "ping")], max_tokens=1)
        )
        return True

    return generate_one_token


def _upper_bound(messages: Sequence[ChatMessage]) -> int:
    """At least as many tokens as the messages take, found without a tokenizer.

    Every token of a byte-level or byte-fallback tokenizer covers at least one
    byte, save one prefix token per text; an ASCII character is one byte, any
    other at most four.
    """
    total = 0
    for message in messages:
        content = message.content
        size = len(content) if content.isascii() else 4 * len(content)
        total += size + 1 + MESSAGE_OVERHEAD_TOKENS
    return total


def _drop_oldest_turns(
    messages: Sequence[ChatMessage], sizes: list[int], budget: int
) -> Sequence[ChatMessage] | None:
    """Drops the oldest turns other than system messages and the last one."""
    keep = list(range(len(messages)))
    total = sum(sizes)
    droppable = [i for i in keep[:-1] if messages[i].role != "system"]
    for index in droppable:  # oldest first
        if total <= budget:
            break
        keep.remove(index)
        total -= sizes[index]
    if total > budget:
        return None
    return tuple(messages[i] for i in keep)


def _latency_key(entry: _Entry) -> tuple[bool, float]:
    latency = entry.target.latency
    return (latency is not None, latency or 0.0)


def _rendezvous(entries: Sequence[_Entry], key: str) -> list[_Entry]:
    """Entries ordered by weighted rendezvous score for ``key``, highest first."""

    def score(entry: _Entry) -> float:
        if entry.weight <= 0:
            return 0.0
        digest = hashlib.blake2b(
            f"{entry.target.name}\x00{key}".encode(), digest_size=8
        ).digest()
        unit = (int.from_bytes(digest, "big") + 0.5) / _HASH_SPAN
        return -entry.weight / math.log(unit)

    return sorted(entries, key=score, reverse=True)


def _status(target: _Target) -> TargetStatus:
    breaker = target.breaker
    return TargetStatus(
        name=target.name,
        state=breaker.state,
        latency_ms=None if target.latency is None else target.latency * 1000.0,
        in_flight=target.in_flight,
        max_concurrency=target.limit,
        failures=breaker.failures,
        calls=breaker.calls,
        retry_after=breaker.retry_after(),
    )


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _summary(attempts: Sequence[Attempt]) -> str:
    if not attempts:
        return "no target"
    parts = []
    for attempt in attempts:
        status = f" {attempt.status}" if attempt.status is not None else ""
        parts.append(f"{attempt.target} {attempt.outcome}{status}")
    return ", ".join(parts)


def _mid_stream_error(run: _Run, lease: _Lease, err: BaseException) -> UpstreamError:
    if isinstance(err, UpstreamError):
        return err
    return UpstreamError(
        f"The target {lease.target.name!r} of the model {run.model.name!r} failed "
        f"after the answer had begun ({_describe(err)}); a partial answer cannot "
        "be continued on another target, so send the request again.",
        retryable=True,
    )


_E = TypeVar("_E", bound=BaseException)


def _with_attempts(error: _E, run: _Run) -> _E:
    """``error`` with the request's attempts attached, for the audit record."""
    error.attempts = tuple(run.attempts)  # type: ignore[attr-defined]
    return error
