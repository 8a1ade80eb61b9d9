"""Fixtures of the evaluation tests: the packaged chat model as judge, loaded once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from serving.gateway.llamacpp import LlamaCppConfig, LlamaCppProvider


@pytest.fixture(scope="session")
def judge_llama() -> Iterator[LlamaCppProvider]:
    """SmolLM2-135M-Instruct with room for RAGAS's few-shot prompts, loaded once."""
    provider = LlamaCppProvider(LlamaCppConfig(seed=1234, n_ctx=4096))
    provider.warm_up()
    yield provider
    asyncio.run(provider.close())
