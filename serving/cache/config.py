"""Settings of the answer cache (the ``cache:`` section of the settings file)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from ingestion.config import StrictModel

__all__ = ["CacheConfig"]


class CacheConfig(StrictModel):
    """Where finished answers are cached, for how long, and how alike questions match.

    ``memory`` keeps the cache in the serving process (one replica only);
    ``redis`` shares it between replicas through the server at ``redis_url``.
    """

    enabled: bool = True
    backend: Literal["memory", "redis"] = "memory"
    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"),
        description="redis://[[user]:password@]host:port/db, rediss://… or "
        "unix://…; write the password as ${VAR} to keep it out of the file.",
    )
    ttl_seconds: int = Field(
        default=3600, ge=1, description="How long an answer stays in the cache."
    )
    max_entries: int = Field(
        default=10_000,
        ge=1,
        description="In process: the most answers kept; the least recently used "
        "goes first. Redis bounds its memory with the TTL and its maxmemory policy.",
    )
    max_entries_per_scope: int = Field(
        default=1000,
        ge=1,
        description="The most answers of one scope a semantic lookup compares "
        "against; the oldest drops out of semantic lookups first (its exact key "
        "stays). Every lookup reads all of them, so keep this in the thousands.",
    )
    semantic: bool = Field(
        default=True,
        description="Also answer questions whose embedding is close to a cached "
        "question's, within the same scope.",
    )
    semantic_threshold: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="The least cosine similarity of a semantic hit.",
    )
    key_prefix: str = Field(
        default="ragline:cache:",
        min_length=1,
        pattern=r"^\S+$",
        description="Prefix of every Redis key the cache writes; clear() deletes "
        "every key under it.",
    )
    timeout_s: float = Field(
        default=0.25,
        gt=0.0,
        description="Redis connect and read timeout; a slower cache is a miss.",
    )
