"""Batching for the loopback server: requests that arrive together for a local model share one call.

A ``batched`` backend (a local model: `steerkit.backends.hf_local.HFLocalBackend`) answers many
requests in one ``generate`` call far faster than one by one. `RequestBatcher` queues the requests
the server's handlers receive and joins those waiting into one call, at most ``max_batch`` at a time;
requests that arrive while a batch runs form the next one.
"""

from __future__ import annotations

import asyncio

from steerkit.clients import Backend, Reply, Request


class RequestBatcher:
    """Joins queued requests into ``backend.generate`` calls; create it on the serving event loop."""

    def __init__(self, backend: Backend, max_batch: int) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Request, asyncio.Future[Reply]]] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._batch_forever())

    async def generate(self, request: Request) -> Reply:
        """The reply to ``request``, generated in a batch with the requests waiting beside it."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        await self._queue.put((request, future))
        return await future

    def cancel(self) -> None:
        self._task.cancel()

    async def _batch_forever(self) -> None:
        """Join the requests waiting for a batched backend into one ``generate`` call at a time."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(r, f) for r, f in batch if not f.done()]  # skip requests whose client left
            if not batch:
                continue
            try:
                replies = await self.backend.generate([r for r, _ in batch])
            except Exception as exc:  # noqa: BLE001 - the waiting handlers answer 500 with it
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), reply in zip(batch, replies, strict=True):
                if not f.done():
                    f.set_result(reply)
