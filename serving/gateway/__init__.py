"""The routing core's seam: providers that generate answers, and the fake for tests.

:mod:`serving.gateway.providers` holds the :class:`Provider` protocol, the
request and result types and :class:`ScriptedProvider`;
:mod:`serving.gateway.llamacpp` runs a GGUF chat model in this process. The
routing core knows nothing of retrieval.
"""

from .llamacpp import LlamaCppConfig, LlamaCppProvider, packaged_model_path
from .providers import (
    Attempt,
    ChatMessage,
    GenerationRequest,
    GenerationResult,
    Provider,
    Role,
    ScriptedProvider,
    StreamEvent,
    TokenDelta,
    Usage,
)

__all__ = [
    "Attempt",
    "ChatMessage",
    "GenerationRequest",
    "GenerationResult",
    "LlamaCppConfig",
    "LlamaCppProvider",
    "Provider",
    "Role",
    "ScriptedProvider",
    "StreamEvent",
    "TokenDelta",
    "Usage",
    "packaged_model_path",
]
