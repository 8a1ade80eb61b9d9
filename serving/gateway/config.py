"""Settings of the governed routing core (the ``gateway`` section of ``ragline.yaml``).

Every part has a default that runs on one laptop with no server to set up:
the in-process llama.cpp model as the one target, one virtual model named
``default``, an open service (no identity, no policy), budgets and the audit
log in the catalog database, rate limits and the loop guard in memory. A
cluster points budgets, rate limits and the loop guard at one Redis.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ingestion.config import NAME_PATTERN, StrictModel

from .anthropic import AnthropicConfig
from .audit import AuditConfig
from .budgets import BudgetsConfig
from .identity import IdentityConfig
from .llamacpp import LlamaCppConfig
from .loopguard import LoopGuardConfig
from .openai_compat import OpenAICompatibleConfig
from .policy import PolicyConfig
from .ratelimit import RateLimitsConfig
from .routing import RouterConfig

__all__ = ["GatewayConfig", "LlamaCppTargetConfig", "ProviderConfig"]


class LlamaCppTargetConfig(LlamaCppConfig):
    """A GGUF chat model run in the service's own process."""

    type: Literal["llamacpp"] = "llamacpp"
    name: str = Field(
        default="local", pattern=NAME_PATTERN, description="The target's name."
    )


ProviderConfig = Annotated[
    LlamaCppTargetConfig | OpenAICompatibleConfig | AnthropicConfig,
    Field(discriminator="type"),
]


class GatewayConfig(StrictModel):
    """Model targets, virtual models, identity, policy, budgets, limits and audit."""

    providers: tuple[ProviderConfig, ...] = Field(
        default=(),
        description="The real model targets. Empty runs serve.generator in "
        "process as the one target, named 'local'.",
    )
    routing: RouterConfig | None = Field(
        default=None,
        description="Virtual models over the targets. Unset serves one virtual "
        "model, 'default', from every target in the order listed.",
    )
    ask_model: str | None = Field(
        default=None,
        description="The virtual model /ask answers with; unset uses the "
        "routing's default model.",
    )
    identity: IdentityConfig | None = Field(
        default=None,
        description="API keys and JWT bearer tokens. Unset (and no serve.auth) "
        "runs the service open: every caller is anonymous.",
    )
    policy: PolicyConfig | None = Field(
        default=None,
        description="What each team and role may use. Unset opens every "
        "collection and model to every caller and gives nobody admin rights.",
    )
    budgets: BudgetsConfig = BudgetsConfig()
    rate_limits: RateLimitsConfig = RateLimitsConfig()
    loop_guard: LoopGuardConfig = LoopGuardConfig()
    audit: AuditConfig = AuditConfig()

    @model_validator(mode="after")
    def _names_agree(self) -> GatewayConfig:
        names = [p.name for p in self.providers]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"provider names must be unique; repeated: {', '.join(repeated)}"
            )
        known = set(names) or {"local"}
        if self.routing is not None:
            for model in self.routing.models:
                for target in model.targets:
                    if target.target not in known:
                        raise ValueError(
                            f"virtual model {model.name!r} names the target "
                            f"{target.target!r}, which is not among the providers "
                            f"({', '.join(sorted(known))})"
                        )
            models = {m.name for m in self.routing.models}
            if self.ask_model is not None and self.ask_model not in models:
                raise ValueError(
                    f"ask_model {self.ask_model!r} is not a virtual model of the "
                    f"routing ({', '.join(sorted(models))})"
                )
        elif self.ask_model not in (None, "default"):
            raise ValueError(
                "ask_model names a virtual model, but there is no routing section; "
                "the one virtual model is 'default'"
            )
        return self
