"""The governed routing core: every model call goes through it.

:mod:`serving.gateway.providers` holds the :class:`Provider` protocol, the
request and result types and :class:`ScriptedProvider`;
:mod:`serving.gateway.llamacpp` runs a GGUF chat model in this process,
:mod:`serving.gateway.openai_compat` and :mod:`serving.gateway.anthropic`
call model servers over HTTP, and :mod:`serving.gateway.routing` serves
virtual models from several of them with fallback and circuit breakers. The
routing core knows nothing of retrieval.
"""

from .anthropic import AnthropicConfig, AnthropicProvider
from .llamacpp import LlamaCppConfig, LlamaCppProvider, packaged_model_path
from .openai_compat import OpenAICompatibleConfig, OpenAICompatibleProvider
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
    "AnthropicConfig",
    "AnthropicProvider",
    "Attempt",
    "ChatMessage",
    "GenerationRequest",
    "GenerationResult",
    "LlamaCppConfig",
    "LlamaCppProvider",
    "OpenAICompatibleConfig",
    "OpenAICompatibleProvider",
    "Provider",
    "Role",
    "ScriptedProvider",
    "StreamEvent",
    "TokenDelta",
    "Usage",
    "packaged_model_path",
]
