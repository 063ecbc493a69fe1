"""Bounds how long a request waits for a model that is at zero replicas to start.

A request to a model at zero waits in the handle's queue, which is what makes Serve start a replica.
`ColdStartGuard` wraps a model client: while Serve reports no running replica, a call may wait for one
up to `timeout_s`; once a replica runs the call goes on unbounded (its own timeouts apply); if none runs
by then, the call is cancelled and the client gets a 503 with Retry-After. Never imports torch.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from deployments.errors import OverloadedError
from deployments.types import EmbedRequest, EmbedResult, GenerateChunk, GenerateRequest, GenerateResult, ModelCard


class ColdStartGuard:
    def __init__(self, client: Any, model_id: str, running: Callable[[], Awaitable[int]], timeout_s: float,
                 poll_s: float = 0.5):
        """`running()`: the model's running replicas as Serve reports them (cached by readiness.py)."""
        self.client, self.model_id, self.running = client, model_id, running
        self.timeout_s, self.poll_s = timeout_s, poll_s

    async def card(self) -> ModelCard:
        return await self.client.card()

    async def generate(self, req: GenerateRequest) -> GenerateResult:
        return await self._bounded(self.client.generate(req))

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        return await self._bounded(self.client.embed(req))

    async def embed_many(self, reqs: list[EmbedRequest]) -> list:
        return await self._bounded(self.client.embed_many(reqs))

    async def images(self, req: Any) -> Any:
        return await self._bounded(self.client.images(req))

    async def score(self, req: Any) -> Any:
        return await self._bounded(self.client.score(req))

    async def tokenize(self, req: Any) -> Any:
        return await self._bounded(self.client.tokenize(req))

    async def detokenize(self, tokens: list[int]) -> str:
        return await self._bounded(self.client.detokenize(tokens))

    async def generate_stream(self, req: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        stream = self.client.generate_stream(req)
        try:
            first = await self._bounded(stream.__anext__())
        except StopAsyncIteration:
            return
        except BaseException:
            await stream.aclose()
            raise
        yield first
        async for chunk in stream:
            yield chunk

    async def _bounded(self, call: Awaitable[Any]) -> Any:
        if await self.running() > 0:
            return await call
        task = asyncio.ensure_future(call)
        deadline = time.monotonic() + self.timeout_s
        try:
            while not task.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    task.cancel()
                    await asyncio.wait({task})   # the call's own cleanup (handle cancel) runs first
                    raise OverloadedError(
                        f"The model `{self.model_id}` is starting from zero replicas and did not start within "
                        f"{self.timeout_s:g} s; retry shortly.", code="model_starting",
                        retry_after_s=max(1, round(self.timeout_s)))
                await asyncio.wait({task}, timeout=min(self.poll_s, left))
                if not task.done() and await self.running() > 0:
                    break   # a replica runs: the call is being served, under its own timeouts
            return await task
        except asyncio.CancelledError:
            task.cancel()
            raise
