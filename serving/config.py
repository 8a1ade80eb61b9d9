"""Settings of the HTTP service (the ``serve`` section of ``ragline.yaml``)."""

from __future__ import annotations

import hashlib
import hmac

from pydantic import Field, SecretStr, field_validator

from ingestion.config import NAME_PATTERN, StrictModel

from .cache.config import CacheConfig
from .gateway.llamacpp import LlamaCppConfig
from .observability import TracingConfig
from .prompts import PromptConfig

__all__ = ["ApiKeyConfig", "AuthConfig", "ServeConfig"]


class ApiKeyConfig(StrictModel):
    """A static API key and what its holder may see."""

    name: str = Field(pattern=NAME_PATTERN, description="Who holds the key (logged).")
    key: SecretStr = Field(
        description="The key itself; put it in an environment variable: ${VAR}."
    )
    labels: list[str] = Field(
        default_factory=list,
        description="Document access labels the holder has (public documents "
        "are always visible).",
    )
    collections: list[str] | None = Field(
        default=None, description="Collections the holder may use; unset means all."
    )

    @field_validator("key")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("an API key needs at least 16 characters")
        return value

    def matches(self, presented: str) -> bool:
        """Constant-time comparison of a presented key with this one."""
        want = hashlib.sha256(self.key.get_secret_value().encode()).digest()
        got = hashlib.sha256(presented.encode()).digest()
        return hmac.compare_digest(want, got)


class AuthConfig(StrictModel):
    """Static API keys, sent as ``Authorization: Bearer <key>`` or ``X-API-Key``."""

    api_keys: list[ApiKeyConfig] = Field(min_length=1)


class ServeConfig(StrictModel):
    """The ``/ask`` and ``/search`` service."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_question_chars: int = Field(
        default=2000, ge=1, description="Longer questions are refused with a 400."
    )
    max_request_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Larger request bodies get a 413."
    )
    index_check_seconds: float = Field(
        default=1.0,
        ge=0,
        description="How often the service looks for a newer committed index "
        "version or a promoted generation.",
    )
    auth: AuthConfig | None = Field(
        default=None,
        description="Unset runs the service open: every caller is anonymous and "
        "sees public documents only.",
    )
    cache: CacheConfig = CacheConfig()
    prompt: PromptConfig = PromptConfig()
    generator: LlamaCppConfig = LlamaCppConfig()
    tracing: TracingConfig = TracingConfig()
