"""Query micro-batching: concurrent queries share one embedding forward pass.

A transformer encodes sixteen short queries in little more time than one, so
under concurrent load the service gains throughput by waiting a few
milliseconds for company. The first query of a batch opens a window of
``window_ms``; every query that arrives before it closes, up to
``max_batch``, is encoded with it in one call on a worker thread, and each
caller gets its own row back. With batching off, each query is encoded on its
own as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from index.vectors.base import VectorArray
from ingestion.embedding import Embedder

from .config import BatchingConfig

__all__ = ["QueryEmbedder"]

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    text: str
    future: asyncio.Future[VectorArray]


class QueryEmbedder:
    """Embeds queries for an asyncio service, batching those that arrive together."""

    def __init__(
        self, embedder: Embedder, config: BatchingConfig | None = None
    ) -> None:
        self._embedder = embedder
        self._config = config or BatchingConfig()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0
        self.queries = 0

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    async def embed(self, text: str) -> VectorArray:
        """The embedding of ``text`` as a one-row array."""
        if not self._config.enabled:
            self.batches += 1
            self.queries += 1
            return await asyncio.to_thread(self._embedder.embed, [text])
        queue = self._ensure_worker()
        future: asyncio.Future[VectorArray] = asyncio.get_running_loop().create_future()
        await queue.put(_Pending(text, future))
        return await future

    async def close(self) -> None:
        """Stop the batching worker; queries still waiting get an error."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(RuntimeError("the query embedder closed"))
            self._queue = None

    def _ensure_worker(self) -> asyncio.Queue[_Pending]:
        if self._queue is None or self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(
                self._run(self._queue), name="ragline-query-batcher"
            )
        return self._queue

    async def _run(self, queue: asyncio.Queue[_Pending]) -> None:
        while True:
            batch = await self._collect(queue)
            await self._encode(batch)

    async def _collect(self, queue: asyncio.Queue[_Pending]) -> list[_Pending]:
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.window_ms / 1000
        while len(batch) < self._config.max_batch:
            # Take what is already queued without waiting; then wait out the window.
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _encode(self, batch: list[_Pending]) -> None:
        live = [item for item in batch if not item.future.done()]
        if not live:
            return
        self.batches += 1
        self.queries += len(live)
        try:
            vectors = await asyncio.to_thread(
                self._embedder.embed, [item.text for item in live]
            )
        # Any failure belongs to every caller of the batch: hand it to each.
        except Exception as err:  # noqa: BLE001
            logger.warning("query batch failed: size=%d error=%s", len(live), err)
            for item in live:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        for row, item in enumerate(live):
            if not item.future.done():
                item.future.set_result(vectors[row : row + 1])
