"""Merges concurrent embedding requests for one model into one DeploymentHandle call.

A one-sentence request costs more in Ray hops than in model time. Requests go out at once while
fewer than `max_in_flight` calls are outstanding (no added latency when idle); beyond that they
queue and leave together, up to `max_batch` per call, as soon as a call returns; at most
`max_pending` wait, and beyond that the answer is 503. Per-request errors come back in their own
slots. (Serve's @serve.batch keeps one queue per decorated function, shared by every instance, so
two embedding models must not share it; this is per instance.)
"""
from __future__ import annotations

import asyncio
from typing import Any

from deployments.errors import ModelHubError, OverloadedError
from deployments.types import EmbedRequest, EmbedResult, ModelCard


class EmbeddingCoalescer:
    def __init__(self, client: Any, max_batch: int, max_in_flight: int, max_pending: int = 4096):
        self.client = client
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self._pending: list[tuple[EmbedRequest, asyncio.Future]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    async def card(self) -> ModelCard:
        return await self.client.card()

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        if len(self._pending) >= self.max_pending:
            raise OverloadedError("Too many embedding requests are queued for this model; retry shortly.")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((req, future))
        self._dispatch()
        result = await future
        if isinstance(result, ModelHubError):
            raise result
        return result

    def _dispatch(self) -> None:
        while self._pending and self._in_flight < self.max_in_flight:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            batch = [(r, f) for r, f in batch if not f.done()]    # callers that gave up
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[EmbedRequest, asyncio.Future]]) -> None:
        try:
            results = await self.client.embed_many([r for r, _ in batch])
        except Exception as exc:  # the whole call failed: every request in it sees the error
            results = [exc] * len(batch)
        finally:
            self._in_flight -= 1
            self._dispatch()
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception) and not isinstance(result, ModelHubError):
                future.set_exception(result)
            else:
                future.set_result(result)
